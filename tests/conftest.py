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
# an explicit OMP_NUM_THREADS (a contributor sharing the machine) wins over the 2-thread default
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 0) or max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory):
    """A tiny Llama base and three 'fine-tunes' (seeded perturbations), as model folders."""
    from mergekit_ext.modeling import (
        char_tokenizer,
        llama_config,
        perturbed,
        random_model,
        save_model,
    )

    root = tmp_path_factory.mktemp("tiny_family")
    tokenizer = char_tokenizer()
    base = random_model(llama_config(len(tokenizer)), seed=0)
    paths = {"base": save_model(base, root / "base", tokenizer)}
    for index in range(3):
        paths[f"ft{index}"] = save_model(perturbed(base, seed=100 + index), root / f"ft{index}", tokenizer)
    return paths


@pytest.fixture(scope="session")
def test_zoo(tmp_path_factory):
    """The zoo's `test` preset, built once per session."""
    from mergekit_ext.zoo import build_zoo

    return build_zoo(tmp_path_factory.getbasetemp() / "zoo-test-preset", preset="test", progress=False)


def load_model(path):
    """A saved causal LM in float32, eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def merge_config(method, paths, names, *, parameters=None, weights=None, model_parameters=None, base=True, dtype="float32") -> dict:
    """A mergekit config dict: ``paths[name]`` for each of ``names`` (in order), ``paths["base"]`` as base.

    ``weights`` sets per-model ``weight`` (default 1.0 for every model when given,
    absent otherwise); ``model_parameters`` gives other per-model parameters.
    """
    models = []
    for name in names:
        entry = {"model": str(paths[name])}
        per_model = dict((model_parameters or {}).get(name, {}))
        if weights is not None:
            per_model["weight"] = weights.get(name, 1.0)
        if per_model:
            entry["parameters"] = per_model
        models.append(entry)
    config = {"merge_method": method, "dtype": dtype, "parameters": dict(parameters or {}), "models": models}
    if base:
        config["base_model"] = str(paths["base"])
    return config


def invoke(*args):
    """Run a ``mergekit-ext`` command in process (click's runner); returns the click result."""
    from click.testing import CliRunner

    from mergekit_ext.cli import main

    return CliRunner().invoke(main, [str(argument) for argument in args])


def model_logits(model_path, adapter=None) -> torch.Tensor:
    """Logits of a model folder (optionally with a peft adapter on top) on fixed tokens."""
    from peft import PeftModel

    model = load_model(model_path)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter)).eval()
    tokens = torch.arange(4, 28).reshape(2, 12)
    with torch.no_grad():
        return model(input_ids=tokens).logits


def mergekit_env() -> dict:
    """Environment for subprocesses: this checkout first on the path, offline."""
    env = dict(os.environ)
    # the checkout's startup hook too, so that stock mergekit-yaml registers this checkout's methods
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "startup"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
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
    """Run a config through mergekit's engine in this process (the package's one runner)."""
    from mergekit_ext.engine import run_merge_atomic

    run_merge_atomic(config, out)


def random_adapter(base, out, *, seed: int, target_modules=("q_proj", "v_proj"), **options) -> Path:
    """``modeling.random_lora_adapter`` on the attention's q and v projections unless told otherwise."""
    from mergekit_ext.modeling import random_lora_adapter

    return random_lora_adapter(base, out, seed=seed, target_modules=target_modules, **options)


def low_rank_approximation(matrix, rank: int, **svd_options):
    """Best rank-``rank`` approximation of ``matrix`` (Eckart–Young) through the package's truncated SVD."""
    from mergekit_ext.tensors import truncated_svd

    u, s, vh = truncated_svd(matrix, rank, **svd_options)
    return (u * s) @ vh
