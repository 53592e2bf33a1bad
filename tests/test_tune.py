"""`mergekit-ext tune`: search on validation, report on test, resume after a kill, refuse bad spaces.

The main run happens once per module, as a user would run it: a subprocess
killed (SIGKILL) mid-trial once the study holds a finished trial, then run
again to completion. The other tests read what it left behind.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from conftest import mergekit_env

from mergekit_ext.tune.cli import tune_command
from mergekit_ext.tune.space import (
    DEFAULT_SPACES,
    SpaceError,
    default_method_names,
    load_space,
    parse_space,
)
from mergekit_ext.tune.study import read_metric, score_config

LIMIT = 8  # documents per task: lm-eval stays fast, scores still differ between settings
COMMAND = "from mergekit_ext.tune.cli import tune_command; tune_command()"
GRID = {"task_arithmetic(lambda=0.3)", "task_arithmetic(lambda=1)", "ties(density=0.5)", "ties(density=1)"}


@pytest.fixture(scope="module")
def zoo(test_zoo):
    return test_zoo


def tiny_space(zoo, **tune_overrides) -> dict:
    """Two experts, two tasks; task_arithmetic lambda {0.3, 1.0} x ties density {0.5, 1.0}."""
    tasks = zoo.tasks[:2]
    tune = {
        "methods": {"task_arithmetic": {"lambda": [0.3, 1.0]}, "ties": {"density": [0.5, 1.0]}},
        "tasks": {"validation": [zoo.lm_eval_task(t, "validation") for t in tasks], "test": [zoo.lm_eval_task(t, "test") for t in tasks]},
        "include_path": str(zoo.task_dir),
        "reference": {zoo.lm_eval_task(t, "test"): str(zoo.expert(t)) for t in tasks},
    }
    tune.update(tune_overrides)
    return {
        "base_model": str(zoo.base),
        "models": [{"model": str(zoo.expert(t))} for t in tasks],
        "dtype": "float32",
        "tune": tune,
    }


def write_space(path: Path, document: dict) -> Path:
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def subprocess_env() -> dict:
    env = mergekit_env()
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return env


def load_trials(out: Path):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name="tune", storage=f"sqlite:///{out / 'study.db'}").get_trials(deepcopy=False)


@pytest.fixture(scope="module")
def killed_and_resumed(zoo, tmp_path_factory):
    """Run tune, SIGKILL it mid-trial after >= 1 finished trial, run it again; (out, trials at the kill, rerun)."""
    from optuna.trial import TrialState

    root = tmp_path_factory.mktemp("tune")
    space = write_space(root / "space.yml", tiny_space(zoo))
    out = root / "out"
    argv = [sys.executable, "-c", COMMAND, str(space), str(out), "--limit", str(LIMIT), "--keep", "--quiet", "--threads", "1"]
    first = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=subprocess_env())
    at_kill = None
    deadline = time.monotonic() + 150
    try:
        while time.monotonic() < deadline and first.poll() is None:
            time.sleep(0.2)
            if not (out / "study.db").is_file():
                continue
            try:
                trials = load_trials(out)
            except Exception:  # the study is being created
                continue
            states = [t.state for t in trials]
            if TrialState.COMPLETE in states and TrialState.RUNNING in states:
                first.send_signal(signal.SIGKILL)
                at_kill = trials
                break
    finally:
        if first.poll() is None and at_kill is None:
            first.kill()
        log = first.communicate()[0]
    assert at_kill is not None, f"never saw a finished and a running trial together (rc {first.returncode}):\n{log[-3000:]}"
    assert first.returncode == -signal.SIGKILL
    assert not (out / "best.yml").exists()

    second = subprocess.run(argv, capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    return out, at_kill, second


@pytest.mark.slow
def test_resume_after_kill_keeps_finished_trials_and_completes(killed_and_resumed):
    from optuna.trial import TrialState

    out, at_kill, second = killed_and_resumed
    trials = {t.number: t for t in load_trials(out)}
    finished_before = [t for t in at_kill if t.state == TrialState.COMPLETE]
    killed = [t for t in at_kill if t.state == TrialState.RUNNING]
    assert finished_before and len(killed) == 1
    # Finished trials were kept as they were, not run again.
    for trial in finished_before:
        kept = trials[trial.number]
        assert kept.state == TrialState.COMPLETE
        assert kept.datetime_complete == trial.datetime_complete and kept.value == trial.value
    # The killed trial was failed and re-queued (same grid point) by Optuna's retry callback.
    assert trials[killed[0].number].state == TrialState.FAIL
    retries = [t for t in trials.values() if t.system_attrs.get("failed_trial") == killed[0].number]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    assert retries[0].params == trials[killed[0].number].params
    # The study completed: every grid point exactly once among the finished trials.
    complete = [t for t in trials.values() if t.state == TrialState.COMPLETE]
    assert sorted(t.params["setting"] for t in complete) == sorted(GRID)
    # Working folders: only the kept merges of complete trials remain.
    assert sorted(p.name for p in (out / "trials").iterdir()) == sorted(f"trial-{t.number:04d}" for t in complete)
    assert "re-queued" not in second.stdout  # --quiet


@pytest.mark.slow
def test_rerun_of_a_finished_study_runs_no_trial(killed_and_resumed, monkeypatch):
    """A third run finds the budget met: no merge, no new trial, test scores from the study's cache."""
    import mergekit_ext.engine

    out, _, _ = killed_and_resumed
    before = len(load_trials(out))

    def no_merge(*args, **kwargs):
        raise AssertionError("a finished study must not merge again")

    monkeypatch.setattr(mergekit_ext.engine, "run_merge_atomic", no_merge)
    monkeypatch.setattr("mergekit_ext.evaluate.lm_eval_results", no_merge)
    result = CliRunner().invoke(tune_command, [str(out.parent / "space.yml"), str(out), "--limit", str(LIMIT), "--keep", "--quiet"])
    assert result.exit_code == 0, result.output
    assert len(load_trials(out)) == before
    assert "best.yml" in result.output


@pytest.mark.slow
def test_picks_the_validation_best_trial_and_reports_each_method(killed_and_resumed):
    from optuna.trial import TrialState

    out, _, _ = killed_and_resumed
    complete = [t for t in load_trials(out) if t.state == TrialState.COMPLETE]
    best = max(complete, key=lambda t: (t.value, -t.number))
    report = json.loads((out / "report.json").read_text())
    assert report["best"]["trial"] == best.number
    assert report["best"]["validation_mean"] == pytest.approx(best.value)
    # The value is the mean of the recorded validation scores, one per validation task.
    validation = best.user_attrs["validation"]
    assert list(validation) == report["tasks"]["validation"]
    assert best.value == pytest.approx(sum(s["value"] for s in validation.values()) / len(validation))
    assert all(s["metric"] == "acc,none" and s["stderr"] is not None and s["samples"] == LIMIT for s in validation.values())

    # best.yml is the best trial's config, absolute paths, runnable.
    config = yaml.safe_load((out / "best.yml").read_text())
    assert config["merge_method"] == best.user_attrs["method"]
    for name, value in best.user_attrs["params"].items():
        assert config["parameters"][name] == value
    assert all(Path(m["model"]).is_absolute() for m in config["models"]) and Path(config["base_model"]).is_absolute()
    assert "tune" not in config

    # Each method: its own validation-best trial, scored on test with stderrs; beside base, experts, plain TA.
    for method in ("task_arithmetic", "ties"):
        mine = [t for t in complete if t.user_attrs["method"] == method]
        chosen = max(mine, key=lambda t: (t.value, -t.number))
        entry = report["methods"][method]
        assert entry["chosen"]["trial"] == chosen.number
        assert set(entry["test"]["scores"]) == set(report["tasks"]["test"])
        assert all(s["stderr"] is not None for s in entry["test"]["scores"].values())
        assert entry["test"]["mean_normalized"] is not None
    assert set(report["baselines"]) == {"base", "reference", "task_arithmetic_plain"}
    assert report["baselines"]["reference"]["test"]["mean_normalized"] == pytest.approx(1.0)
    # Plain task arithmetic at its best λ: here the study's own task_arithmetic choice (λ only).
    plain = report["baselines"]["task_arithmetic_plain"]
    assert plain["lambda"] == report["methods"]["task_arithmetic"]["chosen"]["params"]["lambda"]
    assert plain["test"]["scores"] == report["methods"]["task_arithmetic"]["test"]["scores"]
    # Every expert on every test task, and per method the verdict against base and best expert.
    assert len(report["experts"]) == 2 and all(set(e["test"]["scores"]) == set(report["tasks"]["test"]) for e in report["experts"].values())
    verdicts = report["verdicts"]
    best_expert = max(report["experts"], key=lambda m: report["experts"][m]["test"]["mean"])
    assert verdicts["best_expert"] == best_expert
    for method, verdict in verdicts["methods"].items():
        test = report["methods"][method]["test"]
        gap = verdict["vs_best_expert"]
        assert gap["diff"] == pytest.approx(test["mean"] - report["experts"][best_expert]["test"]["mean"])
        assert verdict["below_base"] == (test["mean"] < report["baselines"]["base"]["test"]["mean"])
        assert verdict["beats_base_every_task"] == all(d["diff"] > 0 for d in verdict["vs_base"].values())
    beaten = any(v["vs_best_expert"]["beats"] for v in verdicts["methods"].values())
    assert (verdicts["summary"] == "no method beats your best expert") == (not beaten)
    assert len(report["trials"]) == len(load_trials(out))

    markdown = (out / "report.md").read_text()
    assert "task_arithmetic" in markdown and "ties" in markdown and "±" in markdown and "(best)" in markdown
    assert "## Against the base and the best single expert" in markdown and "task arithmetic (weight 1, best λ" in markdown
    for chart in ("trials.png", "methods.png"):
        assert (out / chart).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_best_yml_reproduces_bit_for_bit_in_stock_mergekit_yaml(killed_and_resumed, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file

    out, _, _ = killed_and_resumed
    report = json.loads((out / "report.json").read_text())
    merged = out / "trials" / f"trial-{report['best']['trial']:04d}"  # kept by --keep
    rerun = tmp_path / "rerun"
    executable = shutil.which("mergekit-yaml") or "mergekit-yaml"
    result = subprocess.run(
        [executable, str(out / "best.yml"), str(rerun), "--no-write-model-card", "--quiet"],
        capture_output=True, text=True, env=subprocess_env(), cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr

    def tensors(folder: Path) -> dict:
        state = {}
        for file in sorted(folder.glob("*.safetensors")):
            state.update(load_file(str(file)))
        return state

    ours, stock = tensors(merged), tensors(rerun)
    assert ours and sorted(ours) == sorted(stock)
    for name in ours:
        assert ours[name].dtype == stock[name].dtype and torch.equal(ours[name], stock[name]), name


@pytest.mark.slow
def test_score_config_is_the_trial_runner(killed_and_resumed, zoo):
    """score_config (the benchmark-facing runner) gives the best trial's recorded validation scores."""
    from optuna.trial import TrialState

    out, _, _ = killed_and_resumed
    report = json.loads((out / "report.json").read_text())
    best = next(t for t in load_trials(out) if t.number == report["best"]["trial"] and t.state == TrialState.COMPLETE)
    tasks = report["tasks"]["validation"]
    scores = score_config(report["best"]["config"], tasks, zoo.task_dir, limit=LIMIT, threads=1)
    for task in tasks:
        assert scores[task].value == pytest.approx(best.user_attrs["validation"][task]["value"])
        assert scores[task].stderr == pytest.approx(best.user_attrs["validation"][task]["stderr"])


@pytest.mark.slow
def test_ranges_use_tpe_and_record_trials(zoo, tmp_path):
    """A range makes the space infinite: seeded TPE, --trials honoured, the sampled value in best.yml."""
    document = tiny_space(zoo, methods={"ties": {"density": {"low": 0.3, "high": 1.0}, "lambda": 1.0}}, reference=None)
    document["tune"]["tasks"] = {"validation": document["tune"]["tasks"]["validation"][:1], "test": document["tune"]["tasks"]["test"][:1]}
    space = write_space(tmp_path / "space.yml", document)
    out = tmp_path / "out"
    result = CliRunner().invoke(tune_command, [str(space), str(out), "--trials", "2", "--limit", str(LIMIT), "--quiet", "--threads", "1", "--seed", "3"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["sampler"] == "tpe" and len(report["trials"]) == 2
    densities = [t["params"]["density"] for t in report["trials"]]
    assert all(0.3 <= d <= 1.0 for d in densities) and all(t["params"]["lambda"] == 1.0 for t in report["trials"])
    config = yaml.safe_load((out / "best.yml").read_text())
    assert config["parameters"]["density"] in densities
    assert "reference" not in report["baselines"] and report["best"]["test"].get("mean_normalized") is None
    # No task_arithmetic in the space: plain task arithmetic's λ is chosen on validation in the final phase.
    plain = report["baselines"]["task_arithmetic_plain"]
    assert plain["lambda"] in (0.3, 0.5, 0.7, 1.0) and plain["chosen_by"].startswith("validation mean over lambda")
    assert not any((out / "trials").iterdir())  # no --keep: merges removed after scoring


@pytest.mark.slow
@pytest.mark.parametrize(
    "change, culprit",
    [
        (lambda d: d["tune"]["methods"].update(no_such_method={}), "unknown merge method 'no_such_method'"),
        (lambda d: d["tune"]["methods"].update(ties={"no_such_parameter": [1]}), "has no parameter 'no_such_parameter'"),
        (lambda d: d["tune"]["methods"].update(ties={"density": [0.5, 1.5]}), "tune.methods.ties.density"),
        (lambda d: d["tune"]["methods"].update(cart={"rank_ratio": [0.1, 2.0]}), "tune.methods.cart.rank_ratio"),
        (lambda d: d["tune"]["methods"].update(cart={"lambda": {"low": -1.0, "high": 1.0}}), "tune.methods.cart.lambda.low"),
        (lambda d: d["tune"]["tasks"].update(validation=[]), "empty task list"),
        (lambda d: d.update(models=[]), "no models"),
        (lambda d: d["tune"]["tasks"].update(test=["zoo_reverse", "not_a_task"]), "not_a_task"),
        (lambda d: d["tune"]["methods"].update(task_arithmetc={}), "did you mean 'task_arithmetic'?"),
        (lambda d: d["tune"]["methods"].update(ties={"densty": [0.5]}), "did you mean 'density'?"),
        (lambda d: d.update(parameters={"lambdaa": 9}), "parameters: no tried method has a parameter 'lambdaa'; did you mean 'lambda'?"),
        (lambda d: d["tune"]["methods"].update(task_arithmetic={"lambda": [0.5, float("nan")]}), "lambda must be a finite number"),
        (lambda d: d.update(parameters={"lambda": float("inf")}), "parameters.lambda: invalid value inf: lambda must be a finite number"),
        (lambda d: d["models"].append(dict(d["models"][0])), "models[2] repeats models[0]"),
        (lambda d: d["models"].append({"model": "zoo/experts/no_such_expert"}), "models[2]: model zoo/experts/no_such_expert not found"),
    ],
    ids=[
        "unknown-method", "unknown-parameter", "density-out-of-range", "rank-ratio-out-of-range", "range-below-bound",
        "empty-tasks", "no-models", "unknown-task", "method-typo", "parameter-typo", "top-level-typo", "nan-value",
        "infinite-top-level", "duplicate-model", "missing-relative-model",
    ],
)
def test_bad_space_fails_before_any_merge(zoo, tmp_path, monkeypatch, change, culprit):
    import mergekit_ext.engine

    def no_merge(*args, **kwargs):
        raise AssertionError("a bad space must fail before any merge")

    monkeypatch.setattr(mergekit_ext.engine, "run_merge_atomic", no_merge)
    document = tiny_space(zoo)
    change(document)
    (tmp_path / "zoo").symlink_to(zoo.root)  # `zoo/...` beside the SPACE file is a path, not a hub id
    space = write_space(tmp_path / "bad.yml", document)
    result = CliRunner().invoke(tune_command, [str(space), str(tmp_path / "out")])
    assert result.exit_code != 0
    message = result.output.strip().splitlines()[-1]
    assert message.startswith("Error: ") and str(space) in message and culprit in message, result.output
    assert not (tmp_path / "out").exists()
    with pytest.raises(SpaceError, match=re.escape(culprit)):
        load_space(space)


@pytest.mark.slow
def test_defaults_relative_paths_and_metric_reading(zoo, tmp_path):
    # Nothing but models and tasks: every method of this package (adarank excluded) plus task_arithmetic and ties.
    document = tiny_space(zoo)
    del document["tune"]["methods"]
    space = parse_space(document, tmp_path / "space.yml")
    names = default_method_names()
    assert list(space.methods) == names and "adarank" not in names and {"task_arithmetic", "ties"} <= set(names)
    assert space.defaults_used and space.finite and space.target_trials == len(space.settings())
    for name, entry in DEFAULT_SPACES.items():
        if name in space.methods:
            assert set(space.methods[name].parameters) == set(entry)
    assert space.config("task_arithmetic", {"lambda": 0.5})["parameters"] == {"weight": 1.0, "lambda": 0.5}

    # Relative paths: from the working directory, else from the SPACE file's folder.
    (tmp_path / "models").symlink_to(zoo.root)
    relative = tiny_space(zoo)
    relative["base_model"] = "models/base"
    relative["tune"]["include_path"] = "./models/tasks"
    space = load_space(write_space(tmp_path / "space.yml", relative))
    assert space.base_config["base_model"] == str(tmp_path / "models" / "base")
    assert space.include_path == tmp_path / "models" / "tasks"

    # lm-eval's result dicts: the first metric, or the one asked for; stderr beside it.
    result = {"alias": "t", "exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.05, "exact_match,flexible": 0.5}
    score = read_metric("t", result)
    assert (score.metric, score.value, score.stderr) == ("exact_match,strict-match", 0.25, 0.05)
    assert read_metric("t", result, "exact_match,flexible").stderr is None
    assert read_metric("t", {"acc,none": 0.5, "acc_stderr,none": "N/A"}, "acc").stderr is None


@pytest.mark.slow
def test_a_hopeless_trial_is_pruned_after_its_first_task(zoo, tmp_path):
    """Each validation task's running mean is an intermediate value; a pruner that says stop ends the trial there."""
    import optuna

    from mergekit_ext.tune.study import (
        HopelessPruner,
        RunOptions,
        make_objective,
        make_pruner,
        make_sampler,
    )

    class Hopeless(optuna.pruners.BasePruner):
        def prune(self, study, trial) -> bool:
            return True

    space = parse_space(tiny_space(zoo, methods={"task_arithmetic": {"lambda": [0.3]}}, limit=LIMIT, halving=False), tmp_path / "space.yml")
    assert isinstance(make_pruner(space), HopelessPruner)
    assert isinstance(make_pruner(parse_space(tiny_space(zoo, prune=False), tmp_path / "space.yml")), optuna.pruners.NopPruner)
    study = optuna.create_study(direction="maximize", sampler=make_sampler(space), pruner=Hopeless())
    study.optimize(make_objective(space, tmp_path / "out", RunOptions(progress=False, threads=1)), n_trials=1)
    trial = study.trials[0]
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert trial.user_attrs["pruned_after"] == 1 and list(trial.user_attrs["validation"]) == space.validation_tasks[:1]
    assert trial.intermediate_values == {0: trial.user_attrs["validation"][space.validation_tasks[0]]["value"]}
    assert not any((tmp_path / "out" / "trials").iterdir())


@pytest.mark.slow
def test_a_study_of_another_space_is_refused(zoo, tmp_path):
    from mergekit_ext.tune.study import TuneError, default_storage, open_study

    first = parse_space(tiny_space(zoo, limit=LIMIT), tmp_path / "space.yml")
    other = parse_space(tiny_space(zoo, limit=LIMIT + 1), tmp_path / "space.yml")
    open_study(first, default_storage(tmp_path))
    open_study(first, default_storage(tmp_path))  # the same space: loaded
    with pytest.raises(TuneError, match="another space"):
        open_study(other, default_storage(tmp_path))


def test_hopeless_means_significantly_worse_than_the_best_at_the_same_step():
    """Pruned: more than 2 standard errors of the difference below its method's best finished trial (never its first)."""
    import optuna

    from mergekit_ext.tune.study import HopelessPruner

    def attrs(method, values, stderr):
        return {"method": method, "validation": {f"t{i}": {"value": v, "stderr": stderr} for i, v in enumerate(values)}}

    study = optuna.create_study(direction="maximize")
    study.add_trial(optuna.trial.create_trial(value=0.8, intermediate_values={0: 0.8, 1: 0.8}, user_attrs=attrs("ties", [0.8, 0.8], 0.02)))

    def verdict(method, first, stderr):
        trial = optuna.trial.create_trial(state=optuna.trial.TrialState.RUNNING, intermediate_values={0: first}, user_attrs=attrs(method, [first], stderr))
        return HopelessPruner().prune(study, trial)

    assert verdict("ties", 0.6, 0.02)  # gap 0.2 > 2 * sqrt(0.02^2 + 0.02^2)
    assert not verdict("ties", 0.75, 0.02)  # within the noise
    assert not verdict("ties", 0.6, 0.2)  # noisy scores (e.g. --limit): not hopeless
    assert not verdict("cart", 0.1, 0.02)  # cart's first trial runs in full
    study.add_trial(optuna.trial.create_trial(value=0.3, intermediate_values={0: 0.3, 1: 0.3}, user_attrs=attrs("cart", [0.3, 0.3], 0.02)))
    assert not verdict("cart", 0.3, 0.02)  # far below ties, but as good as cart's best: its method's ordering needs it
    assert verdict("cart", 0.1, 0.02)  # hopeless against cart's own best


@pytest.mark.slow
def test_output_inside_an_input_model_is_refused_before_anything_is_written(zoo, tmp_path):
    space = write_space(tmp_path / "space.yml", tiny_space(zoo))
    inside = zoo.expert(zoo.tasks[0]) / "tune-out"
    result = CliRunner().invoke(tune_command, [str(space), str(inside), "--limit", "2"])
    assert result.exit_code != 0 and "inside the input" in result.output
    assert not inside.exists()


def test_verdicts_mark_a_merge_below_the_base_and_say_when_no_method_beats_the_best_expert():
    from mergekit_ext.tune.report import verdict_lines
    from mergekit_ext.tune.study import verdicts

    def entry(values, stderr=0.01):
        scores = {t: {"value": v, "stderr": stderr} for t, v in zip(("a", "b"), values)}
        return {"scores": scores, "mean": sum(values) / 2, "mean_stderr": (2 * stderr**2) ** 0.5 / 2}

    methods = {
        "ties": {"chosen": {"label": "ties()"}, "validation": {"mean": 0.7}, "test": entry([0.50, 0.52])},
        "cart": {"chosen": {"label": "cart()"}, "validation": {"mean": 0.6}, "test": entry([0.70, 0.66])},
    }
    baselines = {"base": {"test": entry([0.60, 0.55])}}
    experts = {"/m/a": {"test": entry([0.90, 0.40])}, "/m/b": {"test": entry([0.50, 0.90])}}
    result = verdicts(methods, baselines, experts, ["a", "b"])
    assert result["best_expert"] == "/m/b" and result["summary"] == "no method beats your best expert"
    ties, cart = result["methods"]["ties"], result["methods"]["cart"]
    assert ties["below_base"] and not ties["beats_base_every_task"]
    assert not cart["below_base"] and cart["beats_base_every_task"]
    assert cart["vs_best_expert"]["diff"] == pytest.approx(0.68 - 0.70) and not cart["vs_best_expert"]["beats"]
    assert cart["vs_best_expert"]["z"] == pytest.approx(-2.0)  # -0.02 / sqrt(2 * (sqrt(2) * 0.01 / 2)^2)
    text = "\n".join(verdict_lines({"methods": methods, "verdicts": result}))
    assert "**below the base**" in text and text.count("below the base") == 1
    assert text.startswith("**No method beats your best expert.**")
    experts["/m/b"]["test"] = entry([0.45, 0.50])
    assert verdicts(methods, baselines, experts, ["a", "b"])["summary"] == "1 method(s) beat your best expert on the mean: cart"


@pytest.mark.slow
def test_a_resumed_tpe_study_does_not_run_a_setting_twice(zoo, tmp_path, monkeypatch):
    """TPE may suggest a setting the study already scored: its result is copied, nothing is merged again."""
    import optuna

    import mergekit_ext.engine
    from mergekit_ext.tune.study import RunOptions, make_objective

    document = tiny_space(zoo, methods={"task_arithmetic": {"lambda": [0.3]}, "ties": {"density": {"low": 0.3, "high": 1.0}}}, reference=None)
    space = parse_space(document, tmp_path / "space.yml")
    assert not space.finite
    study = optuna.create_study(direction="maximize")
    objective = make_objective(space, tmp_path / "out", RunOptions(progress=False, threads=1))
    study.enqueue_trial({"method": "task_arithmetic", "task_arithmetic.lambda": 0.3})
    study.optimize(objective, n_trials=1)
    first = study.trials[0]
    assert first.state == optuna.trial.TrialState.COMPLETE and "repeat_of" not in first.user_attrs

    def no_merge(*args, **kwargs):
        raise AssertionError("a setting the study has scored must not be merged again")

    monkeypatch.setattr(mergekit_ext.engine, "run_merge_atomic", no_merge)
    study.enqueue_trial({"method": "task_arithmetic", "task_arithmetic.lambda": 0.3})
    study.optimize(objective, n_trials=1)
    again = study.trials[1]
    assert again.state == optuna.trial.TrialState.COMPLETE and again.user_attrs["repeat_of"] == first.number
    assert again.value == first.value and again.user_attrs["validation"] == first.user_attrs["validation"]
