"""Shared fixtures: tiny local models (never a hub download) and a mergekit runner."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory):
    """A tiny Llama base and three 'fine-tunes' (seeded perturbations), as model folders."""
    from mergekit_ext.modeling import char_tokenizer, llama_config, perturbed, random_model, save_model

    root = tmp_path_factory.mktemp("tiny_family")
    tokenizer = char_tokenizer()
    base = random_model(llama_config(len(tokenizer)), seed=0)
    paths = {"base": save_model(base, root / "base", tokenizer)}
    for index in range(3):
        paths[f"ft{index}"] = save_model(perturbed(base, seed=100 + index), root / f"ft{index}", tokenizer)
    return paths


def mergekit_env() -> dict:
    """Environment for subprocesses: this checkout first on the path, offline."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["HF_HUB_OFFLINE"] = "1"
    return env


def run_mergekit_yaml(config: dict, out: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run the stock ``mergekit-yaml`` command on a config dict, as a user would."""
    config_path = out.parent / f"{out.name}.yml"
    config_path.write_text(yaml.safe_dump(config))
    executable = shutil.which("mergekit-yaml") or "mergekit-yaml"
    result = subprocess.run(
        [executable, str(config_path), str(out), "--no-write-model-card", "--quiet", *extra],
        capture_output=True,
        text=True,
        env=mergekit_env(),
    )
    if check and result.returncode != 0:
        raise AssertionError(f"mergekit-yaml failed:\n{result.stdout}\n{result.stderr}")
    return result


def run_merge_in_process(config: dict, out: Path) -> None:
    """Run a config through mergekit's engine (``run_merge``) in this process."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    import mergekit_ext  # noqa: F401  (explicit registration route)

    run_merge(
        MergeConfiguration.model_validate(config),
        str(out),
        options=MergeOptions(write_model_card=False, quiet=True, copy_tokenizer=True),
    )
