"""Successive halving on items: a seeded subset of every validation task first, the rest only for a trial that can still win.

Real Optuna studies and real lm-eval runs on the test zoo; the only thing
wrapped is ``lm_eval_items``, to count which documents lm-eval was asked for.
"""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from test_tune import tiny_space, write_space

from mergekit_ext.tune.halving import split_items
from mergekit_ext.tune.space import SpaceError, parse_space

LIMIT = 8  # documents per validation task: the subset is 2 of them


def test_the_subset_is_a_seeded_fraction_of_each_task():
    subset, rest = split_items("zoo_reverse_val", 100, 0.25, seed=0)
    assert (subset, rest) == split_items("zoo_reverse_val", 100, 0.25, seed=0)  # same seed, same items
    assert len(subset) == 25 and sorted(subset + rest) == list(range(100)) and not set(subset) & set(rest)
    assert subset != split_items("zoo_reverse_val", 100, 0.25, seed=1)[0]  # another seed, other items
    assert subset != split_items("zoo_dup_val", 100, 0.25, seed=0)[0]  # each task its own draw
    assert subset != list(range(25))  # random, not the first items
    assert len(split_items("t", 3, 0.1, seed=0)[0]) == 1  # at least one item


@pytest.fixture(scope="module")
def zoo(test_zoo):
    return test_zoo


@pytest.fixture
def counted(monkeypatch):
    """Every document lm-eval is asked to score through ``lm_eval_items``: a list of {task: [indices]}."""
    import mergekit_ext.evaluate.harness as harness

    calls = []
    real = harness.lm_eval_items

    def counting(model, samples, *args, **kwargs):
        calls.append({task: list(indices) for task, indices in samples.items()})
        return real(model, samples, *args, **kwargs)

    monkeypatch.setattr(harness, "lm_eval_items", counting)
    return calls


def _finished(method: str, space, value: float, stderr: float):
    """A finished trial of ``method`` whose subset scores are all ``value`` ± ``stderr``."""
    import optuna

    subset = {task: {"task": task, "metric": "acc,none", "value": value, "stderr": stderr} for task in space.validation_tasks}
    return optuna.trial.create_trial(
        value=value, intermediate_values={0: value}, user_attrs={"method": method, "params": {}, "subset": subset, "validation": subset}
    )


def _run_one(space, out, **options):
    import optuna

    from mergekit_ext.tune.study import RunOptions, make_objective, make_pruner, make_sampler

    study = optuna.create_study(direction="maximize", sampler=make_sampler(space), pruner=make_pruner(space))
    return study, make_objective(space, out, RunOptions(progress=False, threads=1, **options))


@pytest.mark.slow  # one merge and two lm-eval runs on the test zoo (~5 s)
def test_a_passing_trial_is_scored_on_every_item_once_and_equals_a_full_scoring(zoo, tmp_path, counted):
    """The first trial of its method is never stopped, even far below another method's best; its combined score is lm-eval's."""
    from mergekit_ext.tune.halving import Halving
    from mergekit_ext.tune.scoring import EvalSettings, score_model

    space = parse_space(tiny_space(zoo, methods={"task_arithmetic": {"lambda": [0.3]}}, limit=LIMIT, halving=True), tmp_path / "space.yml")
    assert space.halves and space.halving_fraction == 0.25
    study, objective = _run_one(space, tmp_path / "out", keep=True)
    study.add_trial(_finished("ties", space, 1.0, 0.001))  # another method's far better trial: no rival of task_arithmetic
    study.optimize(objective, n_trials=1)
    trial = study.trials[-1]
    assert trial.state.name == "COMPLETE" and trial.user_attrs["method"] == "task_arithmetic"

    halving = Halving.for_tasks(space.include_path, space.validation_tasks, 0.25, space.seed, LIMIT)
    assert counted == [halving.subsets, halving.rests]  # the subset, then only the items not yet scored
    for task in space.validation_tasks:
        assert len(halving.subsets[task]) == 2 and sorted(halving.subsets[task] + halving.rests[task]) == list(range(LIMIT))
    subset = trial.user_attrs["subset"]
    assert trial.intermediate_values == {0: pytest.approx(sum(s["value"] for s in subset.values()) / len(subset))}

    kept = tmp_path / "out" / "trials" / f"trial-{trial.number:04d}"
    full = score_model(kept, space.validation_tasks, EvalSettings(space.include_path, limit=LIMIT, threads=1))
    for task in space.validation_tasks:
        recorded = trial.user_attrs["validation"][task]
        assert (recorded["value"], recorded["stderr"], recorded["samples"]) == (full[task].value, full[task].stderr, LIMIT)
    assert trial.value == pytest.approx(sum(full[t].value for t in space.validation_tasks) / len(space.validation_tasks))


@pytest.mark.slow  # one merge and one lm-eval run on the test zoo (~3 s)
def test_a_hopeless_trial_is_stopped_after_the_subset(zoo, tmp_path, counted):
    """Far below its own method's best finished trial on the same items: pruned, the rest never scored, its merge removed."""
    from optuna.trial import TrialState

    # λ 8 breaks the merge; 8 items per task make the subset's standard error small enough to tell.
    document = tiny_space(zoo, methods={"task_arithmetic": {"lambda": [8.0]}}, limit=2 * LIMIT, halving=True, halving_fraction=0.5)
    space = parse_space(document, tmp_path / "space.yml")
    study, objective = _run_one(space, tmp_path / "out")
    study.add_trial(_finished("task_arithmetic", space, 1.0, 0.001))
    study.optimize(objective, n_trials=1)
    trial = study.trials[-1]
    assert trial.state == TrialState.PRUNED and trial.user_attrs["pruned_after"] == "subset", trial.user_attrs
    assert len(counted) == 1 and all(len(indices) == LIMIT for indices in counted[0].values())
    assert set(trial.user_attrs["subset"]) == set(space.validation_tasks) and not trial.user_attrs.get("validation")
    assert list(trial.intermediate_values) == [0]
    assert not any((tmp_path / "out" / "trials").iterdir())


@pytest.mark.slow  # needs the test zoo (built once per session, ~20 s)
@pytest.mark.parametrize(
    "tune, culprit",
    [
        ({"halving": "yes"}, "tune.halving must be true or false"),
        ({"halving_fraction": 1.0}, "tune.halving_fraction must be a number between 0 and 1"),
        ({"halving_fraction": 0}, "tune.halving_fraction must be a number between 0 and 1"),
        ({"halvng": True}, "did you mean 'halving'?"),
    ],
    ids=["not-a-bool", "fraction-one", "fraction-zero", "typo"],
)
def test_bad_halving_options_fail_in_one_line(zoo, tmp_path, tune, culprit):
    from mergekit_ext.tune.cli import tune_command

    space = write_space(tmp_path / "space.yml", tiny_space(zoo, **tune))
    with pytest.raises(SpaceError, match=culprit.replace("?", r"\?")):
        parse_space(tiny_space(zoo, **tune), space)
    result = CliRunner().invoke(tune_command, [str(space), str(tmp_path / "out")])
    assert result.exit_code != 0 and culprit in result.output.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # needs the test zoo (built once per session, ~20 s)
def test_halving_options_from_the_space_and_the_command_line(zoo, tmp_path):
    from mergekit_ext.tune.cli import tune_command
    from mergekit_ext.tune.space import load_space

    space = write_space(tmp_path / "space.yml", tiny_space(zoo, halving=True, halving_fraction=0.5))
    assert load_space(space).halving_fraction == 0.5 and load_space(space).halves
    assert not load_space(space, halving=False).halves
    assert load_space(write_space(tmp_path / "default.yml", tiny_space(zoo))).halves  # on unless the space or --no-halving says otherwise
    assert not load_space(space, prune=False).halves  # halving is a pruning rule: without the pruner every trial runs in full
    assert load_space(space, halving_fraction=0.1).halving_fraction == 0.1
    assert load_space(space).fingerprint() != load_space(space, halving_fraction=0.1).fingerprint()  # a rung on other items: another study
    result = CliRunner().invoke(tune_command, [str(space), str(tmp_path / "out"), "--halving-fraction", "2"])
    assert result.exit_code != 0 and "tune.halving_fraction must be a number between 0 and 1" in result.output


def _report(tmp_path, name, halving, trials, chosen):
    """A tune report.json with only what benchmarks/tune_bench.py reads of it."""
    import json

    methods = {m: {"chosen": {"params": params}, "validation": {"mean": val}, "test": {"mean": test, "mean_stderr": 0.01}} for m, (params, val, test) in chosen.items()}
    best = max(chosen, key=lambda m: chosen[m][1])
    report = {
        "halving": {"fraction": 0.25} if halving else None,
        "trials": trials,
        "methods": methods,
        "best": {"method": best, "params": chosen[best][0], "validation_mean": chosen[best][1], "test": {"mean": chosen[best][2], "mean_stderr": 0.01}},
    }
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(report))
    return path


def test_halving_comparison_counts_items_and_names_changed_choices(tmp_path):
    """benchmarks/tune_bench.py --compare-reports: items scored (a stopped trial counts its subset), time, changed choices."""
    from benchmarks.tune_bench import compare_reports, summarise_comparison

    def trial(state, items, seconds, part="validation"):
        return {"state": state, part: {"t": {"samples": items}}, "seconds": seconds, "cpu_seconds": seconds}

    plain = _report(tmp_path, "plain", False, [trial("COMPLETE", 40, 10), trial("PRUNED", 16, 4)],
                    {"tsv_m": ({"lambda": 2.0}, 0.68, 0.64), "rmm": ({"k": 6, "weight": 0.45}, 0.58, 0.55)})
    halved = _report(tmp_path, "halved", True, [trial("COMPLETE", 40, 12), trial("COMPLETE", 40, 12), trial("PRUNED", 10, 2, part="subset")],
                     {"tsv_m": ({"lambda": 1.0}, 0.71, 0.70), "rmm": ({"k": 6, "weight": 0.45}, 0.58, 0.55)})
    comparison = compare_reports(plain, halved, "a zoo")
    assert (comparison["tune"]["items"], comparison["tune_halving"]["items"]) == (56, 90)
    assert comparison["tune_halving"]["trial_states"] == {"COMPLETE": 2, "PRUNED": 1}
    text = summarise_comparison(comparison)
    assert "56 → 90 (+61 %)" in text and "14 → 26 (+86 %)" in text
    assert "tsv_m (lambda=2) (0.680 → 0.640 ± 0.010) → tsv_m (lambda=1) (0.710 → 0.700 ± 0.010)" in text
    assert "| tsv_m | (lambda=2) (0.680 → 0.640) | (lambda=1) (0.710 → 0.700) | +0.060 |" in text
    assert "| rmm | (k=6, weight=0.45) (0.580 → 0.550) | (k=6, weight=0.45) (0.580 → 0.550) | same |" in text
    with pytest.raises(SystemExit, match="must be a run without halving"):
        compare_reports(halved, plain, "a zoo")
