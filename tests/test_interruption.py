"""SIGKILL at several points of the commands that write: the earlier result stays intact and
loadable, the killed run's staging folders are removed by the next run, and a rerun succeeds.

The kill is injected in a subprocess that runs the real ``mergekit-ext`` command (click's
``main``) after patching one of our writing steps to kill itself, the way
tests/test_continual.py does for ``continual add``.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import invoke, mergekit_env, random_adapter

pytestmark = pytest.mark.slow

# Where to die: "writer:N" on the N-th tensor saved through io.tensor_writer, "marker" once
# the output is complete in its staging folder, "swap" between the two renames of the
# fallback swap (no exchange rename on this filesystem), "learned" while writing a learned file.
_KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from mergekit_ext import io

    where, arguments = sys.argv[1], sys.argv[2:]

    def die(*_args, **_kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    if where.startswith("writer:"):
        limit, count = int(where.split(":")[1]), [0]
        real_writer = io.tensor_writer

        class Killing:
            def __init__(self, inner):
                self.inner = inner
            def save_tensor(self, name, tensor, clone=False):
                count[0] += 1
                if count[0] == limit:
                    die()
                self.inner.save_tensor(name, tensor, clone=clone)
            def finalize(self):
                self.inner.finalize()

        io.tensor_writer = lambda folder, **kwargs: Killing(real_writer(folder, **kwargs))
    elif where == "marker":
        io.outputs.write_marker = die  # patched where atomic_output_dir looks it up
    elif where == "swap":
        io.outputs.exchange = lambda first, second: False
        real_replace = os.replace
        def replace(source, destination):
            real_replace(source, destination)
            if ".old-" in os.fspath(destination):
                die()  # the old output is retired, the new one not yet in place
        os.replace = replace
    elif where == "learned":
        import safetensors.torch
        def save_file(tensors, filename, metadata=None):
            open(filename, "wb").write(b"partial")
            die()
        safetensors.torch.save_file = save_file
    from mergekit_ext.cli import main
    main(arguments)
    """
)


def _digest(path: Path) -> dict:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _killed(where: str, *arguments) -> None:
    result = subprocess.run(
        [sys.executable, "-c", _KILL_SCRIPT, where, *map(str, arguments)],
        env=mergekit_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == -9, result.stderr[-3000:]


def _leftovers(folder: Path) -> list:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and any(m in p.name for m in (".partial-", ".old-", ".tmp-", ".staging-")))


def _check_rerun(out: Path, before: dict, rerun) -> None:
    """After a kill: OUT is the earlier result (after the next run's recovery); the rerun succeeds and leaves nothing."""
    from mergekit_ext import io

    io.clean_stale_outputs(out)  # what every writing command does first
    assert _digest(out) == before
    assert _leftovers(out.parent) == []
    result = rerun()
    assert result.exit_code == 0, result.output
    assert _leftovers(out.parent) == []


@pytest.mark.parametrize("where", ["writer:3", "marker", "swap"])
def test_killed_tall_compress_keeps_the_earlier_bundle(tiny_family, tmp_path, where):
    from mergekit_ext.methods.consensus.format import read_bundle

    out = tmp_path / "bundle"
    arguments = ["tall", "compress", "--base", tiny_family["base"], tiny_family["ft0"], tiny_family["ft1"], out]
    assert invoke(*arguments).exit_code == 0
    before = _digest(out)
    _killed(where, *arguments, "--names", "a,b", "--overwrite")
    _check_rerun(out, before, lambda: invoke(*arguments, "--overwrite"))
    read_bundle(out)


@pytest.mark.parametrize("where", ["marker", "swap"])
def test_killed_merge_keeps_the_earlier_model(tiny_family, tmp_path, where):
    import yaml
    from conftest import load_model

    config = tmp_path / "config.yml"
    config.write_text(yaml.safe_dump({
        "merge_method": "consensus_ta",
        "base_model": str(tiny_family["base"]),
        "models": [{"model": str(tiny_family["ft0"])}, {"model": str(tiny_family["ft1"])}],
    }))
    out = tmp_path / "merged"
    assert invoke("merge", config, out).exit_code == 0
    before = _digest(out)
    _killed(where, "merge", config, out, "--overwrite")
    _check_rerun(out, before, lambda: invoke("merge", config, out, "--overwrite"))
    load_model(out)


def test_killed_rmm_build_keeps_the_earlier_bundle(tiny_family, tmp_path):
    from mergekit_ext.methods.rmm.format import read_bundle

    adapters = [random_adapter(tiny_family["base"], tmp_path / f"ad{i}", seed=i + 1, init_seed=0) for i in range(2)]
    out = tmp_path / "rmm"
    arguments = ["rmm", "build", "--base", tiny_family["base"], *adapters, "-k", "1", out]
    assert invoke(*arguments).exit_code == 0
    before = _digest(out)
    _killed("marker", *arguments, "--overwrite")
    _check_rerun(out, before, lambda: invoke(*arguments, "--overwrite"))
    read_bundle(out)


def test_killed_adarank_learn_keeps_the_earlier_file(tiny_family, tmp_path):
    from mergekit_ext.methods.adarank.format import open_learned_file

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("abc\nhello\nzz\n")
    out = tmp_path / "learned.safetensors"
    arguments = ["adarank", "learn", tiny_family["ft0"], tiny_family["ft1"], "--base", tiny_family["base"], "--prompts", prompts, "--out", out, "--steps", "1", "--quiet"]
    assert invoke(*arguments).exit_code == 0
    before = _digest(out)
    _killed("learned", *arguments, "--overwrite")
    assert _digest(out) == before
    assert any(".tmp-" in p.name for p in tmp_path.iterdir())  # the killed run's temporary file
    result = invoke(*arguments, "--overwrite")
    assert result.exit_code == 0, result.output
    assert not any(".tmp-" in p.name for p in tmp_path.iterdir())
    open_learned_file(out)


def test_killed_continual_add_mid_write_keeps_the_state(tiny_family, tmp_path):
    from mergekit_ext.methods.opcm import format as continual

    state = tmp_path / "state"
    continual.init_state(state, tiny_family["base"], tiny_family["ft0"], progress=False)
    before = _digest(state)
    _killed("writer:4", "continual", "add", state, tiny_family["ft1"])
    assert _digest(state) == before
    result = invoke("continual", "add", state, tiny_family["ft1"])
    assert result.exit_code == 0, result.output
    assert len(continual.read_state(state)["models"]) == 2
    assert not any(".staging-" in p.name or p.name.endswith(".lock") for p in tmp_path.iterdir())


def test_stale_staging_of_a_live_process_is_kept(tmp_path):
    """Only dead runs' folders are removed: a concurrent writer's staging folder survives."""
    import os

    from mergekit_ext import io

    live = tmp_path / f".out.partial-{os.getppid()}-abc"
    dead = tmp_path / ".out.partial-999999999-abc"
    live.mkdir()
    dead.mkdir()
    io.clean_stale_outputs(tmp_path / "out")
    assert live.exists() and not dead.exists()
    shutil.rmtree(live)


def test_second_writer_on_a_state_is_refused(tiny_family, tmp_path):
    """Two writers on one state never both proceed: the second fails at once, the state stays as it was."""
    import fcntl
    import os

    from mergekit_ext.methods.opcm import format as continual

    state = tmp_path / "state"
    continual.init_state(state, tiny_family["base"], tiny_family["ft0"], progress=False)
    before = _digest(state)
    descriptor = os.open(state, os.O_RDONLY | os.O_DIRECTORY)  # what a running `continual add` holds
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = invoke("continual", "add", state, tiny_family["ft1"])
        assert result.exit_code != 0 and "another process is writing" in result.output
        result = invoke("continual", "init", state, tiny_family["ft1"], "--base", tiny_family["base"], "--overwrite")
        assert result.exit_code != 0 and "another process is writing" in result.output
    finally:
        os.close(descriptor)
    assert _digest(state) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]  # no lock file beside it
    assert invoke("continual", "add", state, tiny_family["ft1"]).exit_code == 0


@pytest.mark.parametrize("command", ["continual-init", "tall-compress"])
def test_full_disk_ends_in_one_line_and_no_output(tiny_family, tmp_path, monkeypatch, command):
    import errno

    from mergekit_ext import io

    real_writer = io.tensor_writer

    class Full:
        def __init__(self, inner):
            self.inner, self.count = inner, 0

        def save_tensor(self, name, tensor, clone=False):
            self.count += 1
            if self.count == 3:
                raise OSError(errno.ENOSPC, "No space left on device (injected)")
            self.inner.save_tensor(name, tensor, clone=clone)

        def finalize(self):
            self.inner.finalize()

    monkeypatch.setattr(io, "tensor_writer", lambda folder, **kwargs: Full(real_writer(folder, **kwargs)))
    out = tmp_path / "out"
    if command == "continual-init":
        result = invoke("continual", "init", out, tiny_family["ft0"], "--base", tiny_family["base"])
    else:
        result = invoke("tall", "compress", "--base", tiny_family["base"], tiny_family["ft0"], tiny_family["ft1"], out)
    assert result.exit_code != 0
    assert "No space left on device" in result.output and "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if line.startswith("Error:")]) == 1
    assert list(tmp_path.iterdir()) == []
