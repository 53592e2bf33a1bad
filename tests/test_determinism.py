"""Determinism: every method and command run twice on the same inputs (and seed) writes
byte-identical files. Timestamps are kept out of what must be reproducible (the learned
AdaRank file has none); the continual state's history keeps ``added_at``, which is
the one field left out of the comparison."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml
from conftest import invoke, random_adapter

pytestmark = pytest.mark.slow

MERGES = {
    "consensus_ta": {},
    "consensus_ties": {},
    "cart": {},
    "tsv_m": {},
    "iso_c": {},
    "iso_cts": {},
    "rmm": {"k": 1},
    "opcm": {},
}


def _digest(path: Path) -> dict:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    digest = {}
    for file in files:
        data = file.read_bytes()
        if file.name == "state.json":  # the history's added_at is a timestamp by design
            state = json.loads(data)
            for entry in state["models"]:
                entry.pop("added_at", None)
            data = json.dumps(state, sort_keys=True).encode()
        digest[str(file.relative_to(path.parent) if path.is_file() else file.relative_to(path))] = hashlib.sha256(data).hexdigest()
    return digest


def _twice(tmp_path: Path, run) -> None:
    """Run into the same path twice (the model card names the folder) and compare the bytes."""
    import shutil

    outputs = []
    out = tmp_path / "first"
    for attempt in range(2):
        if attempt:
            shutil.move(out, tmp_path / "kept")
        result = run(out)
        assert result is None or result.exit_code == 0, result.output
        outputs.append(_digest(out))
    kept = tmp_path / "kept"
    shutil.rmtree(kept) if kept.is_dir() else kept.unlink()
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize("method", sorted(MERGES))
def test_merge_is_byte_identical(tiny_family, tmp_path, method):
    config = {"merge_method": method, "models": [{"model": str(tiny_family[name])} for name in ("ft0", "ft1", "ft2")]}
    config["base_model"] = str(tiny_family["base"])
    if MERGES[method]:
        config["parameters"] = MERGES[method]
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(config))
    _twice(tmp_path, lambda out: invoke("merge", path, out))


def test_tall_compress_and_recover_are_byte_identical(tiny_family, tmp_path):
    _twice(tmp_path, lambda out: invoke("tall", "compress", "--base", tiny_family["base"], tiny_family["ft0"], tiny_family["ft1"], out))
    _twice(tmp_path / "r", lambda out: invoke("tall", "recover", tmp_path / "first", "ft0", out))


def test_continual_is_byte_identical(tiny_family, tmp_path):
    def run(out):
        assert invoke("continual", "init", out, tiny_family["ft0"], "--base", tiny_family["base"]).exit_code == 0
        return invoke("continual", "add", out, tiny_family["ft1"])

    _twice(tmp_path, run)


def test_adapter_commands_are_byte_identical(tiny_family, tmp_path):
    adapters = [random_adapter(tiny_family["base"], tmp_path / f"ad{i}", seed=i + 1, init_seed=0) for i in range(2)]
    _twice(tmp_path / "lora", lambda out: invoke("lora", "merge", "--base", tiny_family["base"], "--method", "consensus_ta", *adapters, "-r", "2", out))
    _twice(tmp_path / "rmm", lambda out: invoke("rmm", "build", "--base", tiny_family["base"], *adapters, "-k", "1", out))


def test_adarank_learned_file_is_byte_identical(tiny_family, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("abc\nhello\nzz\n")

    def run(out):
        return invoke("adarank", "learn", tiny_family["ft0"], tiny_family["ft1"], "--base", tiny_family["base"], "--prompts", prompts,
                      "--out", out, "--steps", "3", "--seed", "1", "--quiet")

    _twice(tmp_path, run)
