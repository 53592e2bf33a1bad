"""Every marked table in README.md and docs/*.md equals what its committed result file renders to (issue 31, item 1)."""

from __future__ import annotations

import pytest

from benchmarks import render_readme


def test_every_table_matches_its_result_file():
    stale = {
        str(path.relative_to(render_readme.REPO)): names
        for path in render_readme.documents()
        if (names := render_readme.stale_tables(path.read_text(encoding="utf-8")))
    }
    assert not stale, f"tables differ from their result files: {stale}; run: python -m benchmarks.render_readme"


def test_every_renderer_has_its_table_marked_once():
    locations = render_readme.table_locations()
    twice = {name: [str(path) for path in paths] for name, paths in locations.items() if len(paths) > 1}
    assert not twice, f"a table is marked twice: {twice}"
    assert set(render_readme.RENDERERS) <= set(locations), f"renderers without a table: {set(render_readme.RENDERERS) - set(locations)}"


def test_tables_live_in_the_readme_and_the_docs():
    """The README's headline tables stay in it; the others may move into docs/ and are still checked."""
    locations = render_readme.table_locations()
    assert locations["quality-hard"] == [render_readme.README]
    assert locations["demo"] == [render_readme.README]
    assert all(path.parent == render_readme.DOCS for path in locations["adarank"])


def test_adarank_table_agrees_with_the_benchmarks_own_reports():
    """Every score of the rendered AdaRank table is one that `adarank_bench.py --render` wrote
    into results/adarank.md or results/adarank-schedule.md (same runs, same selection)."""
    import re

    reports = "".join((render_readme.RESULTS / name).read_text(encoding="utf-8") for name in ("adarank.md", "adarank-schedule.md"))
    scores = re.findall(r"\d\.\d{3} ± \d\.\d{3}", render_readme.RENDERERS["adarank"]())
    assert len(scores) == 4 * 4
    assert [score for score in scores if score not in reports] == []


@pytest.mark.parametrize("name", sorted(render_readme.RENDERERS))
def test_a_changed_number_is_caught(name):
    """The check can fail: one digit changed in a table is reported, wherever it lives, and rendering restores it."""
    path = render_readme.table_file(name)
    assert path is not None, f"table '{name}' is marked nowhere"
    text = path.read_text(encoding="utf-8")
    begin = text.index(f"<!-- begin table:{name} -->")
    digit = next(i for i in range(begin, len(text)) if text[i].isdigit() and text[i - 1] == ".")
    changed = text[:digit] + str((int(text[digit]) + 1) % 10) + text[digit + 1 :]
    assert render_readme.stale_tables(changed) == [name]
    assert render_readme.render(changed) == text


def test_check_fails_on_a_stale_docs_page(tmp_path, monkeypatch, capsys):
    """`--check` reads docs/*.md as well as README.md, and names the page whose table is stale."""
    docs = tmp_path / "docs"
    docs.mkdir()
    readme = tmp_path / "README.md"
    readme.write_text("# x\n", encoding="utf-8")
    table = render_readme.RENDERERS["defaults-worst-case"]()
    page = docs / "page.md"
    page.write_text(f"<!-- begin table:defaults-worst-case -->\n{table}<!-- end table:defaults-worst-case -->\n", encoding="utf-8")
    monkeypatch.setattr(render_readme, "README", readme)
    monkeypatch.setattr(render_readme, "DOCS", docs)
    assert render_readme.main(["--check"]) == 0
    page.write_text(page.read_text(encoding="utf-8").replace("0.53", "0.54", 1), encoding="utf-8")
    assert render_readme.main(["--check"]) == 1
    assert "page.md: table 'defaults-worst-case' differs" in capsys.readouterr().err
    assert render_readme.main([]) == 0
    assert render_readme.main(["--check"]) == 0


def test_a_pending_table_stays_empty_until_its_file_exists(tmp_path, monkeypatch):
    """A table listed in PENDING may be marked before its benchmark has written its file, empty;
    text in it, or its file appearing without a renderer, is an error."""
    monkeypatch.setattr(render_readme, "PENDING", {"later": "later.json"})
    monkeypatch.setattr(render_readme, "RESULTS", tmp_path)
    empty = "<!-- begin table:later -->\n<!-- end table:later -->\n"
    assert render_readme.stale_tables(empty) == []
    assert render_readme.render(empty) == empty
    typed = "<!-- begin table:later -->\n| 0.5 |\n<!-- end table:later -->\n"
    assert render_readme.stale_tables(typed) == ["later"]
    with pytest.raises(KeyError, match="must stay empty"):
        render_readme.render(typed)
    (tmp_path / "later.json").write_text("{}", encoding="utf-8")
    assert render_readme.stale_tables(empty) == ["later"]
    with pytest.raises(KeyError, match="needs its renderer"):
        render_readme.render(empty)


def test_an_unknown_table_is_an_error():
    with pytest.raises(KeyError, match="no renderer"):
        render_readme.render("<!-- begin table:nope -->\n| x |\n<!-- end table:nope -->\n")
