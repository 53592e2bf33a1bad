"""The zoo's README.md says how its models are prompted, and its transformers example works."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import mergekit_env

from mergekit_ext.zoo import build_zoo
from mergekit_ext.zoo.card import CARD_NAME, example_code, generation_example, render_card
from mergekit_ext.zoo.tasks import LM_EVAL_MAX_GEN_TOKS


@pytest.fixture(scope="module")
def hard_zoo(tmp_path_factory):
    # the same folder as test_zoo.py's fixture: built once per session
    return build_zoo(tmp_path_factory.getbasetemp() / "zoo-hard-test", preset="hard-test", progress=False)


def _run_example(code: str, cwd) -> str:
    """The card's example run as a user would, from the zoo folder; its printed line."""
    result = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=mergekit_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.rstrip("\n")


def test_card_says_how_generation_models_are_prompted():
    manifest = {
        "preset": {"name": "hard", "kind": "generation"},
        "seed": 0,
        "parameters": 1000,
        "metric": "exact_match",
        "tasks": {"count": {"description": "count the # among #+*: #?#+#*+| 2"}},
    }
    card = render_card(manifest, {"task": "count", "document": {"prompt": "#?#+|", "answer": "1"}, "printed": "1"})
    for needed in ("add_special_tokens=False", "greedy", "stop string", "do_sample=False", "case- and whitespace-exact"):
        assert needed in card, needed
    assert "#?#+#*+\\| 2" in card  # a "|" inside the task table is escaped
    code = example_code(card)
    assert code.strip().splitlines() == generation_example("experts/count", "#?#+|")
    assert len(code.strip().splitlines()) == 5


@pytest.mark.slow
def test_generation_card_example_yields_the_experts_answer(hard_zoo, monkeypatch):
    from transformers import AutoTokenizer

    from mergekit_ext.zoo import greedy_generate, load_causal_lm

    card = (hard_zoo.root / CARD_NAME).read_text()
    assert "add_special_tokens=False" in card and "`\\n`" in card
    example = example_code(card)
    task = hard_zoo.tasks[0]
    documents = hard_zoo.documents(task, "test")
    printed = _run_example(example, hard_zoo.root)
    prompt = next(d for d in documents if repr(d["prompt"]) in example)
    assert printed == prompt["answer"], (printed, prompt)  # the expert's answer, through plain transformers
    assert f"prints `{printed}`" in card

    # The card's prompting is the zoo's scorer (and lm-eval's): same continuation on test items.
    import contextlib
    import io

    tokenizer = AutoTokenizer.from_pretrained(str(hard_zoo.base))
    expert = load_causal_lm(hard_zoo.expert(task), "cpu")
    prompts = [d["prompt"] for d in documents[:12]]
    expected = greedy_generate(expert, tokenizer, prompts, max_new_tokens=LM_EVAL_MAX_GEN_TOKS)  # the card's (lm-eval's) budget
    monkeypatch.chdir(hard_zoo.root)
    for text, wanted in zip(prompts, expected):
        captured = io.StringIO()
        with contextlib.redirect_stdout(captured):
            exec(example.replace(repr(prompt["prompt"]), repr(text)), {})  # noqa: S102
        assert captured.getvalue().rstrip("\n") == wanted, text


@pytest.mark.slow
def test_multiple_choice_card_example_picks_the_experts_choice(test_zoo):
    card = (test_zoo.root / CARD_NAME).read_text()
    assert "add_special_tokens=False" in card and "log-probabilities" in card
    printed = _run_example(example_code(card), test_zoo.root)
    assert f"prints `{printed}`" in card
    document = next(d for d in test_zoo.documents(test_zoo.tasks[0], "test") if repr(d["query"]) in example_code(card))
    assert printed == document["choices"][document["label"]]
