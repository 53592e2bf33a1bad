"""`mergekit-ext tune` with several workers on one study: a real PostgreSQL server, SIGKILL, the report step.

Workers are separate `tune` processes, each with its own OUT_DIR, sharing one
study through `--storage`. The server comes from the `postgres_server`
fixture (tests/postgres_server.py): these tests fail in CI when it cannot
start and are skipped elsewhere.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from postgres_server import postgres_server, postgres_url  # noqa: F401  (fixtures)
from test_tune import GRID, LIMIT, subprocess_env, tiny_space, write_space

COMMAND = "from mergekit_ext.cli import main; main()"
HEARTBEAT = 2  # seconds; a killed worker's trial is re-queued after 6 silent heartbeats
PAIR = {"task_arithmetic": {"lambda": [0.3, 1.0]}}  # a 2-point grid for the tests that need fewer trials
PAIR_GRID = {"task_arithmetic(lambda=0.3)", "task_arithmetic(lambda=1)"}


@pytest.fixture(scope="module")
def zoo(test_zoo):
    return test_zoo


def worker(space: Path, out: Path, storage: str, *extra: str) -> subprocess.Popen:
    argv = [sys.executable, "-c", COMMAND, "tune", str(space), str(out), "--storage", storage, "--limit", str(LIMIT)]
    argv += ["--quiet", "--threads", "1", "--heartbeat", str(HEARTBEAT), *extra]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=subprocess_env())


def finish(processes, timeout: float = 240) -> list:
    logs = []
    deadline = time.monotonic() + timeout
    for process in processes:
        try:
            logs.append(process.communicate(timeout=max(1, deadline - time.monotonic()))[0])
        except subprocess.TimeoutExpired:
            process.kill()
            logs.append(process.communicate()[0])
    return logs


def study_trials(storage: str):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name="tune", storage=storage).get_trials(deepcopy=False)


def assert_each_setting_ran_once(trials, grid=GRID) -> None:
    """Every grid point finished, and no setting was merged and scored twice."""
    from optuna.trial import TrialState

    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert sorted(t.user_attrs["setting"] for t in complete) == sorted(grid)
    assert not any("repeat_of" in t.user_attrs for t in trials)


def comparable(report: dict) -> dict:
    """A report without what differs between workers by design: where its files are."""
    return {k: v for k, v in report.items() if k != "files"}


@pytest.fixture(scope="module")
def shared_study(zoo, postgres_server, tmp_path_factory):  # noqa: F811
    """Three workers on one PostgreSQL study of the 4-point grid; (storage, outs, processes, logs, seconds)."""
    root = tmp_path_factory.mktemp("tune-workers")
    space = write_space(root / "space.yml", tiny_space(zoo))
    storage = postgres_server.new_database()
    outs = [root / f"worker-{index}" for index in range(3)]
    started = time.monotonic()
    processes = [worker(space, out, storage) for out in outs]
    logs = finish(processes)
    return storage, outs, processes, logs, time.monotonic() - started


@pytest.mark.slow
def test_three_workers_on_postgres_run_each_trial_once_and_agree(shared_study):
    storage, outs, processes, logs, seconds = shared_study
    for process, log in zip(processes, logs):
        assert process.returncode == 0, log[-3000:]
    trials = study_trials(storage)
    assert_each_setting_ran_once(trials)
    ran = {t.user_attrs["worker"]["pid"] for t in trials if "worker" in t.user_attrs}
    assert ran <= {p.pid for p in processes} and len(ran) >= 2, "the trials were not shared between workers"
    # Every worker waited for the others' trials, so each wrote the same choice and the same report.
    bests = [yaml.safe_load((out / "best.yml").read_text()) for out in outs]
    reports = [comparable(json.loads((out / "report.json").read_text())) for out in outs]
    assert bests[0] == bests[1] == bests[2]
    assert reports[0] == reports[1] == reports[2]
    assert reports[0]["study"]["storage"].startswith("postgresql://")
    print(f"3 workers, {len(GRID)} trials: {seconds:.1f} s wall")


@pytest.mark.slow
def test_report_step_reads_the_study_alone(shared_study, tmp_path, monkeypatch):
    """`tune report --storage URL OUT` needs no SPACE file and no worker; the test scores come from the study."""
    import mergekit_ext.engine
    from mergekit_ext.tune.cli import tune_group

    storage, outs, _, _, _ = shared_study

    def no_work(*args, **kwargs):
        raise AssertionError("every score is in the study already")

    monkeypatch.setattr(mergekit_ext.engine, "run_merge_atomic", no_work)
    monkeypatch.setattr("mergekit_ext.evaluate.lm_eval_results", no_work)
    before = len(study_trials(storage))
    out = tmp_path / "report"
    result = CliRunner().invoke(tune_group, ["report", "--storage", storage, str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    assert len(study_trials(storage)) == before
    ours = comparable(json.loads((out / "report.json").read_text()))
    theirs = comparable(json.loads((outs[0] / "report.json").read_text()))
    assert ours == theirs
    assert yaml.safe_load((out / "best.yml").read_text()) == yaml.safe_load((outs[0] / "best.yml").read_text())


@pytest.mark.slow
def test_the_study_holds_what_optuna_dashboard_shows(shared_study):
    """The dashboard lists a study's user attrs and each trial's params, values and user attrs."""
    import optuna

    storage = shared_study[0]
    study = optuna.load_study(study_name="tune", storage=storage)
    assert study.user_attrs["space"]["tune"]["tasks"]["validation"] == study.user_attrs["validation_tasks"]
    assert study.metric_names == ["validation mean"]
    complete = [t for t in study.get_trials() if t.state == optuna.trial.TrialState.COMPLETE]
    for trial in complete:
        assert set(trial.params) == {"setting"} and trial.values == [trial.value]
        assert {"method", "params", "setting", "validation", "worker", "seconds"} <= set(trial.user_attrs)
        # With halving one value (the subsets' mean), else the running mean after each of the 2 tasks.
        assert sorted(trial.intermediate_values) == ([0] if study.user_attrs["space"]["tune"]["halving"] else [0, 1])
    # A JSON round trip (what a dashboard reads from the database) keeps every attribute.
    assert json.loads(json.dumps(study.user_attrs)) == study.user_attrs


@pytest.mark.slow
def test_a_worker_killed_mid_trial_is_replaced_through_the_heartbeat(zoo, postgres_url, tmp_path):  # noqa: F811
    from optuna.trial import TrialState

    space = write_space(tmp_path / "space.yml", tiny_space(zoo, methods=PAIR))
    victim = worker(space, tmp_path / "victim", postgres_url)
    survivor = worker(space, tmp_path / "survivor", postgres_url)
    killed = None
    deadline = time.monotonic() + 180
    try:
        while killed is None and time.monotonic() < deadline and victim.poll() is None:
            time.sleep(0.3)
            try:
                trials = study_trials(postgres_url)
            except Exception:  # the study is being created
                continue
            by = {t.user_attrs.get("worker", {}).get("pid") for t in trials}
            running = [
                t for t in trials
                if t.state == TrialState.RUNNING and t.user_attrs.get("worker", {}).get("pid") == victim.pid and "setting" in t.user_attrs
            ]  # mid-trial: its setting chosen, its merge or scoring under way
            if running and survivor.pid in by:  # both workers past start-up: only the heartbeat can find the dead one
                victim.send_signal(signal.SIGKILL)
                killed = running[0]
    finally:
        if killed is None:
            victim.kill()
            survivor.kill()
    victim_log, survivor_log = finish([victim, survivor])
    assert killed is not None, f"the victim never ran a trial beside the survivor:\n{victim_log[-2000:]}\n{survivor_log[-2000:]}"
    assert survivor.returncode == 0, survivor_log[-3000:]

    trials = {t.number: t for t in study_trials(postgres_url)}
    dead = trials[killed.number]
    assert dead.state == TrialState.FAIL and "error" not in dead.user_attrs
    assert "stopped" not in dead.user_attrs  # failed by the heartbeat, not by the same-machine process check
    retries = [t for t in trials.values() if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    assert retries[0].user_attrs["setting"] == dead.user_attrs["setting"] and retries[0].params == dead.params
    assert retries[0].user_attrs["worker"]["pid"] == survivor.pid
    assert_each_setting_ran_once(trials.values(), PAIR_GRID)
    assert (tmp_path / "survivor" / "best.yml").is_file() and not (tmp_path / "victim" / "best.yml").exists()


@pytest.mark.slow
def test_a_worker_with_another_space_is_refused_with_one_line(zoo, postgres_url, tmp_path):  # noqa: F811
    from mergekit_ext.tune.space import parse_space
    from mergekit_ext.tune.study import open_study

    open_study(parse_space(tiny_space(zoo, limit=LIMIT), tmp_path / "space.yml"), postgres_url, shared=True)
    other = write_space(tmp_path / "other.yml", tiny_space(zoo, methods={"task_arithmetic": {"lambda": [0.5]}}))
    out = tmp_path / "out"
    process = worker(other, out, postgres_url)
    log = finish([process], timeout=120)[0]
    assert process.returncode == 1
    lines = log.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: study 'tune' in postgresql://") and "another space" in lines[0], log
    assert not out.exists()


@pytest.mark.slow  # its space names the trained test zoo, built by the fixture
@pytest.mark.parametrize(
    "url, says",
    [
        ("postgresql://nobody@127.0.0.1:1/nothing", "cannot open the study storage"),
        ("notadb://x", "cannot open the study storage"),
        ("mysql://u@127.0.0.1:1/x", "--storage mysql://"),
    ],
    ids=["server-unreachable", "unknown-scheme", "driver-missing"],
)
def test_a_bad_storage_url_fails_in_one_line_and_leaves_no_out(zoo, tmp_path, url, says):
    from mergekit_ext.tune.cli import tune_group

    space = write_space(tmp_path / "space.yml", tiny_space(zoo))
    out = tmp_path / "out"
    result = CliRunner().invoke(tune_group, [str(space), str(out), "--storage", url, "--quiet"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and says in lines[0], result.output
    assert not out.exists()


@pytest.mark.slow
def test_two_local_workers_on_one_sqlite_file(zoo, tmp_path):
    """SQLite serves two workers of one machine (Optuna's RDB storage with a 60 s lock timeout): measured here."""
    space = write_space(tmp_path / "space.yml", tiny_space(zoo, methods=PAIR))
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    processes = [worker(space, tmp_path / f"w{index}", storage) for index in range(2)]
    logs = finish(processes)
    for process, log in zip(processes, logs):
        assert process.returncode == 0, log[-3000:]
    trials = study_trials(storage)
    assert_each_setting_ran_once(trials, PAIR_GRID)
    assert len({t.user_attrs["worker"]["pid"] for t in trials}) == 2  # both workers ran a trial
    reports = [comparable(json.loads((tmp_path / f"w{index}" / "report.json").read_text())) for index in range(2)]
    assert reports[0] == reports[1]


@pytest.mark.slow
def test_report_of_a_missing_or_foreign_study_fails_in_one_line(zoo, postgres_url, tmp_path):  # noqa: F811
    import optuna

    from mergekit_ext.tune.cli import tune_group

    out = tmp_path / "report"
    result = CliRunner().invoke(tune_group, ["report", "--storage", postgres_url, str(out), "--study-name", "nope"])
    shown = postgres_url.replace("://tune@", "://…@")  # the user name (or password) is never printed
    assert result.exit_code == 1 and result.output.strip().splitlines() == [f"Error: {shown} holds no study 'nope' (it holds: none)"]
    optuna.create_study(storage=postgres_url, study_name="foreign")  # made by someone else: no space stored
    result = CliRunner().invoke(tune_group, ["report", "--storage", postgres_url, str(out), "--study-name", "foreign"])
    assert result.exit_code == 1 and "was not made by mergekit-ext tune" in result.output
    assert not out.exists()
