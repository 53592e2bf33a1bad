"""Every marked README table equals what its committed result file renders to (issue 31, item 1)."""

from __future__ import annotations

import pytest

from benchmarks import render_readme


def test_every_readme_table_matches_its_result_file():
    text = render_readme.README.read_text(encoding="utf-8")
    stale = render_readme.stale_tables(text)
    assert not stale, f"README tables differ from their result files: {stale}; run: python -m benchmarks.render_readme"


def test_every_renderer_has_its_table_in_the_readme():
    marked = render_readme.marked_tables(render_readme.README.read_text(encoding="utf-8"))
    assert sorted(set(marked)) == sorted(marked), "a table is marked twice"
    assert set(render_readme.RENDERERS) <= set(marked)


@pytest.mark.parametrize("name", sorted(render_readme.RENDERERS))
def test_a_changed_number_is_caught(name):
    """The check can fail: one digit changed in a table is reported, and rendering restores it."""
    text = render_readme.README.read_text(encoding="utf-8")
    begin = text.index(f"<!-- begin table:{name} -->")
    digit = next(i for i in range(begin, len(text)) if text[i].isdigit() and text[i - 1] == ".")
    changed = text[:digit] + str((int(text[digit]) + 1) % 10) + text[digit + 1 :]
    assert render_readme.stale_tables(changed) == [name]
    assert render_readme.render(changed) == text


def test_an_unknown_table_is_an_error():
    with pytest.raises(KeyError, match="no renderer"):
        render_readme.render("<!-- begin table:nope -->\n| x |\n<!-- end table:nope -->\n")
