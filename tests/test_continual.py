"""`mergekit-ext continual`: a persisted state that takes one model at a time."""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import invoke, mergekit_env
from test_opcm import (
    paper_projection,  # the paper's formula, written once for both test files
)

from mergekit_ext import io
from mergekit_ext.methods.opcm import format as continual
from mergekit_ext.methods.opcm.kernel import ContinualOptions
from mergekit_ext.modeling import load_state_dict

MODELS = ("ft0", "ft1", "ft2")


def _invoke(*args):
    return invoke("continual", *args)


def _copy_family(tiny_family, root: Path) -> dict:
    """Private copies, so a test can delete models once they are merged."""
    return {name: Path(shutil.copytree(path, root / name)) for name, path in tiny_family.items()}


def _is_matrix(name: str, tensor: torch.Tensor) -> bool:
    # Written independently of tensors.is_block_matrix: Llama block weights.
    return tensor.dim() == 2 and name.startswith("model.layers.")


def _global_norm(tensors: dict) -> float:
    return float(torch.sqrt(sum(t.double().square().sum() for t in tensors.values())))


def _paper_opcm(base: dict, models: list, alpha=0.5) -> list:
    """The paper's algorithm as FusionBench runs it: merged models after each step."""
    merged = dict(models[0])
    norms = [_global_norm({n: models[0][n] - base[n] for n in base})]
    lambda_previous = 1.0
    history = [(dict(merged), 1.0)]
    for model in models[1:]:
        norms.append(_global_norm({n: model[n] - base[n] for n in base}))
        unscaled = {}
        for name, theta0 in base.items():
            merged_delta, task_delta = merged[name] - theta0, model[name] - theta0
            if _is_matrix(name, theta0):
                task_delta = paper_projection(merged_delta, task_delta, alpha, zero_diagonal=True)
            unscaled[name] = lambda_previous * merged_delta + task_delta
        lambda_t = _global_norm(unscaled) / (sum(norms) / len(norms))
        merged = {name: base[name] + unscaled[name] / lambda_t for name in base}
        lambda_previous = lambda_t
        history.append((dict(merged), 1.0 / lambda_t))
    return history


def _files_digest(folder: Path) -> dict:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.mark.slow
def test_opcm_state_after_three_adds_equals_paper_algorithm(tiny_family, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    paths = _copy_family(tiny_family, tmp_path / "models")
    state = tmp_path / "state"
    result = _invoke("init", state, paths["ft0"], "--base", paths["base"])
    assert result.exit_code == 0, result.output
    # One model gives that model, bit for bit.
    first = load_state_dict(state)
    for name, tensor in load_state_dict(paths["ft0"]).items():
        assert torch.equal(first[name], tensor), name
    accumulator_1 = load_state_dict(state / "continual")

    base = load_state_dict(paths["base"])
    models = [load_state_dict(paths[name]) for name in MODELS]
    expected = _paper_opcm(base, models)

    # Earlier models are deleted before each add: add needs only base, state and new model.
    for step, name in enumerate(MODELS[1:], start=2):
        shutil.rmtree(paths[MODELS[step - 2]])
        result = _invoke("add", state, paths[name])
        assert result.exit_code == 0, result.output
        merged = load_state_dict(state)
        expected_merged, expected_scale = expected[step - 1]
        for tensor_name, tensor in expected_merged.items():
            torch.testing.assert_close(merged[tensor_name], tensor, rtol=1e-4, atol=2e-6, msg=tensor_name)
        data = continual.read_state(state)
        assert len(data["models"]) == step
        assert data["models"][-1]["scale"] == pytest.approx(expected_scale, rel=1e-5)
        if step == 2:
            # The projected update is orthogonal to the merged task vector it was projected against.
            accumulator_2 = load_state_dict(state / "continual")
            for tensor_name, before in accumulator_1.items():
                if _is_matrix(tensor_name, before):
                    update = accumulator_2[tensor_name] - before
                    cosine = float((update * before).sum() / (update.norm() * before.norm()))
                    assert abs(cosine) < 1e-4, tensor_name

    data = continual.read_state(state)
    assert [entry["order"] for entry in data["models"]] == [1, 2, 3]
    assert [Path(entry["path"]).name for entry in data["models"]] == list(MODELS)
    assert data["models"][0]["content_hash"] == io.content_hash(tiny_family["ft0"])
    assert data["base"]["content_hash"] == io.content_hash(tiny_family["base"])
    for entry, model in zip(data["models"], models):
        assert entry["task_vector_norm"] == pytest.approx(_global_norm({n: model[n] - base[n] for n in base}), rel=1e-6)
    # λ_t grows about like √t: the merged task vector keeps the mean norm.
    assert data["models"][-1]["merged_task_vector_norm"] == pytest.approx(
        sum(e["task_vector_norm"] for e in data["models"]) / 3, rel=1e-5
    )

    shown = _invoke("show", state)
    assert shown.exit_code == 0 and "opcm" in shown.output and data["models"][2]["content_hash"][:16] in shown.output

    # The state is a normal Hugging Face model folder.
    model = AutoModelForCausalLM.from_pretrained(state, dtype=torch.float32)
    merged = load_state_dict(state)
    loaded = model.state_dict()
    for name in ("model.layers.0.self_attn.q_proj.weight", "lm_head.weight"):
        assert torch.equal(loaded[name], merged[name])
    tokenizer = AutoTokenizer.from_pretrained(state)
    assert tokenizer("ab=")["input_ids"]


def _ties_by_hand(merged_delta, task_delta, density):
    stacked = torch.stack([merged_delta, task_delta])
    trimmed = torch.zeros_like(stacked)
    for row in range(2):
        flat = stacked[row].reshape(-1)
        keep = torch.argsort(flat.abs(), descending=True)[: max(1, int(density * flat.numel()))]
        trimmed[row].view(-1)[keep] = flat[keep]
    elected = torch.where(trimmed.sum(0) >= 0, 1.0, -1.0)
    return (trimmed * (torch.sign(trimmed) == elected)).sum(0)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ta", "average", "ties"])
def test_baselines_match_their_formulas(tiny_family, tmp_path, method):
    state = tmp_path / "state"
    options = ContinualOptions(method=method, coefficient=0.3, density=0.2)
    continual.init_state(state, tiny_family["base"], tiny_family["ft0"], options=options, progress=False)
    for name in MODELS[1:]:
        continual.add_model(state, tiny_family[name], progress=False)
    merged = load_state_dict(state)
    base = load_state_dict(tiny_family["base"])
    models = [load_state_dict(tiny_family[name]) for name in MODELS]
    for name, theta0 in base.items():
        taus = [model[name] - theta0 for model in models]
        if method == "ta":
            expected = theta0 + 0.3 * sum(taus)
        elif method == "average":
            expected = sum(model[name] for model in models) / 3
        else:
            merged_delta = 0.3 * taus[0]
            for tau in taus[1:]:
                merged_delta = merged_delta + 0.3 * _ties_by_hand(merged_delta, tau, 0.2)
            expected = theta0 + merged_delta
        torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6, msg=name)


class _FailingWriter:
    """A real writer that fails like a full disk on its n-th tensor."""

    def __init__(self, inner, fail_at):
        self.inner, self.fail_at, self.count = inner, fail_at, 0

    def save_tensor(self, name, tensor, clone=False):
        self.count += 1
        if self.count == self.fail_at:
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        self.inner.save_tensor(name, tensor, clone=clone)

    def finalize(self):
        self.inner.finalize()


@pytest.mark.slow
@pytest.mark.parametrize("failure", ["accumulate", "write model", "swap"])
def test_failed_add_leaves_previous_state_intact(tiny_family, tmp_path, monkeypatch, failure):
    from transformers import AutoModelForCausalLM

    state = tmp_path / "state"
    continual.init_state(state, tiny_family["base"], tiny_family["ft0"], progress=False)
    continual.add_model(state, tiny_family["ft1"], progress=False)
    before = _files_digest(state)

    real_writer = io.tensor_writer
    writers = []

    def failing_writer(folder, **kwargs):
        writers.append(folder)
        # First writer of an add is the accumulator's, the second the merged model's.
        fail = (failure == "accumulate" and len(writers) == 1) or (failure == "write model" and len(writers) == 2)
        return _FailingWriter(real_writer(folder, **kwargs), fail_at=5 if fail else -1)

    monkeypatch.setattr(io, "tensor_writer", failing_writer)
    if failure == "swap":
        # No atomic exchange, and the second rename fails: the first must be undone.
        monkeypatch.setattr(io.outputs, "exchange", lambda first, second: False)  # swap_into_place looks it up there
        real_replace = continual.os.replace

        def replace(source, destination):
            if Path(source).name.startswith(".state.staging-"):
                raise OSError(errno.ENOSPC, "No space left on device (injected)")
            real_replace(source, destination)

        monkeypatch.setattr(continual.os, "replace", replace)
    with pytest.raises(OSError, match="injected"):
        continual.add_model(state, tiny_family["ft2"], progress=False)
    monkeypatch.undo()

    assert _files_digest(state) == before
    assert [p.name for p in tmp_path.iterdir() if ".staging-" in p.name or ".retired" in p.name] == []
    assert len(continual.read_state(state)["models"]) == 2
    AutoModelForCausalLM.from_pretrained(state, dtype=torch.float32)
    # And the state still takes the model once the disk is back.
    continual.add_model(state, tiny_family["ft2"], progress=False)
    assert len(continual.read_state(state)["models"]) == 3


_KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from mergekit_ext import io
    from mergekit_ext.methods.opcm import format as continual

    real_writer = io.tensor_writer
    calls = []

    class Killing:
        def __init__(self, inner):
            self.inner, self.count = inner, 0
        def save_tensor(self, name, tensor, clone=False):
            self.count += 1
            if len(calls) == 2 and self.count == 7:
                os.kill(os.getpid(), signal.SIGKILL)  # mid-write of the merged model
            self.inner.save_tensor(name, tensor, clone=clone)
        def finalize(self):
            self.inner.finalize()

    def writer(folder, **kwargs):
        calls.append(folder)
        return Killing(real_writer(folder, **kwargs))

    io.tensor_writer = writer
    continual.add_model(sys.argv[1], sys.argv[2], progress=False)
    """
)


@pytest.mark.slow
def test_killed_add_leaves_previous_state_loadable(tiny_family, tmp_path):
    state = tmp_path / "state"
    continual.init_state(state, tiny_family["base"], tiny_family["ft0"], progress=False)
    before = _files_digest(state)
    killed = subprocess.run(
        [sys.executable, "-c", _KILL_SCRIPT, str(state), str(tiny_family["ft1"])],
        env=mergekit_env(),
        capture_output=True,
        text=True,
    )
    assert killed.returncode == -9, killed.stderr
    assert _files_digest(state) == before
    assert any(".staging-" in p.name for p in tmp_path.iterdir())  # the killed run's leftovers
    continual.add_model(state, tiny_family["ft1"], progress=False)
    assert len(continual.read_state(state)["models"]) == 2
    assert not any(".staging-" in p.name for p in tmp_path.iterdir())


@pytest.mark.slow
def test_bad_inputs_are_refused(tiny_family, tmp_path):
    from mergekit_ext.modeling import (
        char_tokenizer,
        gpt2_config,
        llama_config,
        random_model,
        save_model,
    )

    state = tmp_path / "state"
    assert _invoke("init", state, tiny_family["ft0"], "--base", tiny_family["base"]).exit_code == 0
    before = _files_digest(state)
    tokenizer = char_tokenizer()
    gpt2 = save_model(random_model(gpt2_config(len(tokenizer)), seed=1), tmp_path / "gpt2", tokenizer)
    wider = save_model(random_model(llama_config(len(tokenizer), hidden_size=48), seed=1), tmp_path / "wider", tokenizer)

    result = _invoke("add", state, gpt2)
    assert result.exit_code != 0 and "different architecture" in result.output
    result = _invoke("add", state, wider)
    assert result.exit_code != 0 and "has shape" in result.output and "wider" in result.output
    result = _invoke("add", state, tiny_family["ft1"], "--base", tiny_family["ft2"])
    assert result.exit_code != 0 and "made from another base" in result.output
    result = _invoke("add", state, tiny_family["ft0"])
    assert result.exit_code != 0 and "already in the state" in result.output
    result = _invoke("add", tiny_family["base"], tiny_family["ft1"])
    assert result.exit_code != 0 and "not a continual state" in result.output
    result = _invoke("init", state, tiny_family["ft1"], "--base", tiny_family["base"])
    assert result.exit_code != 0 and "already exists" in result.output
    result = _invoke("init", tiny_family["ft2"], tiny_family["ft1"], "--base", tiny_family["base"], "--overwrite")
    assert result.exit_code != 0 and "not written by mergekit-ext" in result.output  # the one OUT rule (io.check_replaceable)
    result = _invoke("init", tmp_path / "s2", tiny_family["ft1"], "--base", tiny_family["base"], "--alpha", "1.5")
    assert result.exit_code != 0 and "alpha" in result.output
    assert _files_digest(state) == before

    # The base at the recorded path changed under the state: refused by hash.
    moved_base = Path(shutil.copytree(tiny_family["base"], tmp_path / "base_copy"))
    state2 = tmp_path / "state2"
    continual.init_state(state2, moved_base, tiny_family["ft0"], progress=False)
    shutil.copy2(Path(tiny_family["ft2"]) / "model.safetensors", moved_base / "model.safetensors")
    result = _invoke("add", state2, tiny_family["ft1"])
    assert result.exit_code != 0 and "made from another base" in result.output


_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from mergekit_ext.methods.opcm import format as continual

    def status(key):
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024

    base, state, models = sys.argv[1], sys.argv[2], sys.argv[3:]
    continual.init_state(state, base, models[0], progress=False)
    peaks = []
    for model in models[1:]:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # reset the peak-RSS mark to the current RSS
        continual.add_model(state, model, progress=False)
        peaks.append(status("VmHWM"))
    print(json.dumps(peaks))
    """
)


@pytest.mark.slow
def test_add_peak_memory_does_not_grow_with_models_merged(tmp_path):
    from mergekit_ext.modeling import (
        char_tokenizer,
        llama_config,
        perturbed,
        random_model,
        save_model,
    )

    tokenizer = char_tokenizer()
    base = random_model(llama_config(len(tokenizer), hidden_size=256, intermediate_size=1024, layers=2), seed=0)
    model_bytes = sum(p.numel() * 4 for p in base.parameters())
    paths = [save_model(base, tmp_path / "base", tokenizer)]
    paths += [save_model(perturbed(base, seed=10 + i, scale=0.01), tmp_path / f"m{i}") for i in range(5)]
    result = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, str(paths[0]), str(tmp_path / "state"), *map(str, paths[1:])],
        # Large blocks straight from mmap, so freed tensors leave RSS at once and
        # the peak tracks live memory (glibc otherwise keeps freed heap, ±10 MB noise).
        env={**mergekit_env(), "MALLOC_MMAP_THRESHOLD_": "131072"},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    peaks = json.loads(result.stdout.strip().splitlines()[-1])  # peak RSS of adds #2 … #5
    assert len(peaks) == 4
    # Holding one more earlier model would add model_bytes; adds #3–#5 may not exceed add #2 by half of one.
    assert max(peaks[1:]) - peaks[0] < 0.5 * model_bytes, (peaks, model_bytes)
