"""Bad input through the real entry points (issue 17): one table, one line per case.

Every case runs ``mergekit-ext`` or the stock ``mergekit-yaml`` as a subprocess
and must end with: a non-zero exit; one line naming the culprit (for
``mergekit-ext``: one ``Error:`` line and no traceback; for ``mergekit-yaml``,
whose traceback we cannot suppress: the last line); no output and no leftovers
(staging folders, lock files) beside it; every input byte-identical. The cases
run concurrently (each is mostly interpreter start-up); adding one is one line.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from conftest import mergekit_env, random_adapter

# ~60 interpreter start-ups (about 5 CPU-seconds each): part of the full suite, not the quick subset.
pytestmark = pytest.mark.slow

# (id, command, arguments, culprit text the error line must contain, setup in the case folder)
# Placeholders: {base} {ft0} {ft1} {nan} {trunc} {inputs} {state} {bundle} {ad0} {ad1} {prompts}
# {badfile} (not an AdaRank file) {out} (the case's output) {precious} (a user's folder) {plain} (a
# user's file) {cstate} (a per-case copy of the state, see SETUP) {cfg} (the case's YAML, from CONFIGS).
CASES = [
    # mergekit-ext merge: outputs that would destroy an input or a user's folder
    ("merge-out-is-input", "ext", "merge {cfg} {ft0} --overwrite", "one of the inputs", "ta"),
    ("merge-out-inside-input", "ext", "merge {cfg} {ft0}/sub", "inside the input", "ta"),
    ("merge-out-contains-input", "ext", "merge {cfg} {inputs} --overwrite", "contains the input", "ta"),
    ("merge-overwrite-user-folder", "ext", "merge {cfg} {precious} --overwrite", "not written by mergekit-ext", "ta precious"),
    ("merge-overwrite-user-file", "ext", "merge {cfg} {plain} --overwrite", "did not write", "ta plain"),
    ("merge-existing-no-overwrite", "ext", "merge {cfg} {precious}", "already exists", "ta precious"),
    ("merge-truncated-model", "ext", "merge {cfg} {out}", "trunc", "truncated"),
    ("merge-nan-lambda", "ext", "merge {cfg} {out}", "lambda", "nan_lambda"),
    ("merge-inf-weight-cart", "ext", "merge {cfg} {out}", "weight", "inf_weight_cart"),
    ("merge-nan-tensor", "ext", "merge {cfg} {out}", "holds NaN", "nan_model"),
    ("merge-bad-dtype", "ext", "merge {cfg} {out}", "float17", "float17"),
    ("merge-rank-ratio-zero", "ext", "merge {cfg} {out}", "rank_ratio", "rank_ratio_zero"),
    ("merge-rmm-k-zero", "ext", "merge {cfg} {out}", "'k'", "rmm_k_zero"),
    ("merge-tsv-negative-lambda", "ext", "merge {cfg} {out}", "lambda", "tsv_negative"),
    ("merge-opcm-alpha", "ext", "merge {cfg} {out}", "alpha", "opcm_alpha"),
    ("merge-ties-density-zero", "ext", "merge {cfg} {out}", "density", "density_zero"),
    ("merge-iso-fraction", "ext", "merge {cfg} {out}", "common_space_fraction", "iso_fraction"),
    ("merge-adarank-not-a-file", "ext", "merge {cfg} {out}", "not-adarank", "adarank_bad"),
    # stock mergekit-yaml: planning-time refusals leave no output folder at all
    ("yaml-nan-lambda", "yaml", "", "lambda", "nan_lambda"),
    ("yaml-inf-weight-cart", "yaml", "", "weight", "inf_weight_cart"),
    ("yaml-rmm-nan-weight", "yaml", "", "weight", "rmm_nan_weight"),
    ("yaml-tsv-zero-weight", "yaml", "", "weight", "tsv_zero_weight"),
    ("yaml-adarank-not-a-file", "yaml", "", "not-adarank", "adarank_bad"),
    ("yaml-adarank-missing-file", "yaml", "", "not found", "adarank_missing"),
    ("yaml-nan-tensor", "yaml", "", "holds NaN", "nan_model"),
    # tall
    ("tall-out-is-base", "ext", "tall compress --base {base} {ft0} {ft1} {base} --overwrite", "one of the inputs", ""),
    ("tall-name-traversal", "ext", "tall compress --base {base} {ft0} {ft1} {out} --names ../evil,b", "cannot be used as a file name", ""),
    ("tall-name-hidden", "ext", "tall compress --base {base} {ft0} {ft1} {out} --names .x,b", "cannot be used as a file name", ""),
    ("tall-name-slash", "ext", "tall compress --base {base} {ft0} {ft1} {out} --names a/b,c", "cannot be used as a file name", ""),
    ("tall-nan-model", "ext", "tall compress --base {base} {ft0} {nan} {out}", "holds", ""),
    ("tall-nan-lambda", "ext", "tall compress --base {base} {ft0} {ft1} {out} --tall-lambda nan", "--tall-lambda", ""),
    ("tall-overwrite-user-folder", "ext", "tall compress --base {base} {ft0} {ft1} {precious} --overwrite", "not written by mergekit-ext", "precious"),
    ("tall-recover-into-bundle", "ext", "tall recover {bundle} ft0 {bundle}/x", "inside the input", ""),
    ("tall-recover-unknown-task", "ext", "tall recover {bundle} nope {out}", "nope", ""),
    # lora / rmm
    ("lora-out-is-adapter", "ext", "lora merge --base {base} --method task_arithmetic {ad0} {ad1} -r 2 {ad0} --overwrite", "one of the inputs", ""),
    ("lora-nan-weight", "ext", "lora merge --base {base} --method consensus_ta {ad0} {ad1} -r 2 {out} --param weight=nan", "weight", ""),
    ("lora-overwrite-user-folder", "ext", "lora merge --base {base} --method task_arithmetic {ad0} {ad1} -r 2 {precious} --overwrite", "not written by mergekit-ext", "precious"),
    ("rmm-out-is-adapter", "ext", "rmm build --base {base} {ad0} {ad1} -k 1 {ad1} --overwrite", "one of the inputs", ""),
    ("rmm-overwrite-user-file", "ext", "rmm build --base {base} {ad0} {ad1} -k 1 {plain} --overwrite", "did not write", "plain"),
    # continual
    ("continual-nan-coefficient", "ext", "continual init {out} {ft0} --base {base} --method ta --coefficient nan", "coefficient", ""),
    ("continual-inf-coefficient", "ext", "continual init {out} {ft0} --base {base} --method ta --coefficient inf", "coefficient", ""),
    ("continual-init-over-model", "ext", "continual init {ft1} {ft1} --base {base} --overwrite", "one of the inputs", ""),
    ("continual-init-inside-base", "ext", "continual init {base}/state {ft1} --base {base}", "inside the input", ""),
    ("continual-init-nan-model", "ext", "continual init {out} {nan} --base {base}", "holds", ""),
    ("continual-add-nan-model", "ext", "continual add {cstate} {nan}", "holds", "state"),
    ("continual-add-not-a-state", "ext", "continual add {precious} {ft1}", "not a continual state", "precious"),
    ("continual-add-truncated-model", "ext", "continual add {cstate} {trunc}", "trunc", "state"),
    ("continual-add-truncated-accumulator", "ext", "continual add {cstate} {ft1}", "continual", "state truncate_accumulator"),
    ("continual-add-bad-json", "ext", "continual add {cstate} {ft1}", "not valid JSON", "state bad_json"),
    # adarank
    ("adarank-inf-lr", "ext", "adarank learn {ft0} {ft1} --base {base} --prompts {prompts} --out {out}.safetensors --lr inf --steps 1", "--lr", ""),
    ("adarank-nan-prior", "ext", "adarank learn {ft0} {ft1} --base {base} --prompts {prompts} --out {out}.safetensors --prior nan --steps 1", "--prior", ""),
    ("adarank-bad-dtype", "ext", "adarank learn {ft0} {ft1} --base {base} --prompts {prompts} --out {out}.safetensors --merge-out {out} --dtype float17", "float17", ""),
    ("adarank-out-inside-model", "ext", "adarank learn {ft0} {ft1} --base {base} --prompts {prompts} --out {ft0}/x.safetensors", "inside the input", ""),
    ("adarank-overwrite-user-file", "ext", "adarank learn {ft0} {ft1} --base {base} --prompts {prompts} --out {plain} --overwrite", "did not write", "plain"),
    ("adarank-show-not-a-file", "ext", "adarank show {badfile}", "not-adarank", ""),
]

_TA = {"merge_method": "task_arithmetic", "base_model": "{base}", "models": [{"model": "{ft0}", "parameters": {"weight": 0.5}}, {"model": "{ft1}", "parameters": {"weight": 0.5}}]}


def _two(method, base=True, parameters=None, models=("{ft0}", "{ft1}"), model_parameters=None, **extra):
    config = {"merge_method": method, "models": [{"model": m, **({"parameters": model_parameters} if model_parameters else {})} for m in models]}
    if base:
        config["base_model"] = "{base}"
    if parameters:
        config["parameters"] = parameters
    config.update(extra)
    return config


CONFIGS = {
    "ta": _TA,
    "truncated": _two("consensus_ta", models=("{ft0}", "{trunc}")),
    "nan_lambda": _two("consensus_ta", parameters={"lambda": float("nan")}),
    "inf_weight_cart": _two("cart", base=False, model_parameters={"weight": float("inf")}),
    "nan_model": _two("consensus_ta", models=("{ft0}", "{nan}")),
    "float17": _two("consensus_ta", dtype="float17"),
    "rank_ratio_zero": _two("cart", base=False, parameters={"rank_ratio": 0}),
    "rmm_k_zero": _two("rmm", parameters={"k": 0}),
    "rmm_nan_weight": _two("rmm", model_parameters={"weight": float("nan")}),
    "tsv_negative": _two("tsv_m", parameters={"lambda": -1}),
    "tsv_zero_weight": _two("tsv_m", model_parameters={"weight": 0}),
    "opcm_alpha": _two("opcm", parameters={"alpha": 1.5}),
    "density_zero": _two("consensus_ties", model_parameters={"density": 0}),
    "iso_fraction": _two("iso_cts", parameters={"common_space_fraction": 2}),
    "adarank_bad": _two("adarank", parameters={"file": "{badfile}"}),
    "adarank_missing": _two("adarank", parameters={"file": "{inputs}/missing.safetensors"}),
}

# Names that must never be left beside an output.
LEFTOVER_MARKS = (".partial-", ".old-", ".tmp-", ".lock", ".staging-", ".retired")


def _digest(root: Path) -> dict:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Read-only inputs shared by every case: models, a bad one of each kind, a state, a bundle, adapters."""
    from safetensors.torch import load_file, save_file

    from mergekit_ext.methods.consensus.format import compress
    from mergekit_ext.methods.opcm.format import init_state
    from mergekit_ext.modeling import (
        char_tokenizer,
        llama_config,
        perturbed,
        random_model,
        save_model,
    )

    root = tmp_path_factory.mktemp("reliability")
    inputs = root / "inputs"
    tokenizer = char_tokenizer()
    base = random_model(llama_config(len(tokenizer)), seed=0)
    paths = {"inputs": inputs, "base": save_model(base, inputs / "base", tokenizer)}
    for index in range(2):
        paths[f"ft{index}"] = save_model(perturbed(base, seed=100 + index), inputs / f"ft{index}", tokenizer)
    paths["nan"] = Path(shutil.copytree(paths["ft1"], inputs / "nan"))
    tensors = load_file(paths["nan"] / "model.safetensors")
    name = sorted(tensors)[3]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, str(paths["nan"] / "model.safetensors"), metadata={"format": "pt"})
    paths["trunc"] = Path(shutil.copytree(paths["ft1"], inputs / "trunc"))
    weights = paths["trunc"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    paths["state"] = root / "state-template"
    init_state(paths["state"], paths["base"], paths["ft0"], progress=False)
    paths["bundle"] = inputs / "bundle"
    compress(paths["base"], [paths["ft0"], paths["ft1"]], paths["bundle"], progress=False)
    paths["ad0"] = random_adapter(paths["base"], inputs / "ad0", seed=1, init_seed=0)
    paths["ad1"] = random_adapter(paths["base"], inputs / "ad1", seed=2, init_seed=0)
    paths["prompts"] = inputs / "prompts.txt"
    paths["prompts"].write_text("abc\nhello\n")
    paths["badfile"] = inputs / "not-adarank.safetensors"
    paths["badfile"].write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    return root, paths


def _setup(case_dir: Path, setup: str, paths: dict) -> dict:
    local = {"out": case_dir / "out", "precious": case_dir / "precious", "plain": case_dir / "plain.txt", "cstate": case_dir / "cstate"}
    words = setup.split()
    if "precious" in words:
        local["precious"].mkdir()
        (local["precious"] / "notes.txt").write_text("a user's work\n")
    if "plain" in words:
        local["plain"].write_text("a user's file\n")
    if "state" in words:
        shutil.copytree(paths["state"], local["cstate"])
    if "truncate_accumulator" in words:
        accumulator = local["cstate"] / "continual" / "model.safetensors"
        accumulator.write_bytes(accumulator.read_bytes()[:100])
    if "bad_json" in words:
        (local["cstate"] / "continual" / "state.json").write_text("{ not json")
    return local


def _run_case(case, root: Path, paths: dict) -> dict:
    case_id, tool, arguments, _culprit, setup = case
    case_dir = root / "cases" / case_id
    case_dir.mkdir(parents=True)
    config_name = next((word for word in setup.split() if word in CONFIGS), None)
    local = _setup(case_dir, " ".join(word for word in setup.split() if word not in CONFIGS), paths)
    values = {**{key: str(value) for key, value in paths.items()}, **{key: str(value) for key, value in local.items()}}
    if config_name:
        text = yaml.safe_dump(CONFIGS[config_name])
        for key, value in values.items():
            text = text.replace("{" + key + "}", value)
        values["cfg"] = str(case_dir / "config.yml")
        Path(values["cfg"]).write_text(text)
    before = _digest(case_dir)
    entries_before = set(os.listdir(case_dir))
    if tool == "yaml":
        command = [shutil.which("mergekit-yaml"), values["cfg"], values["out"], "--quiet", "--no-write-model-card"]
    else:
        command = [shutil.which("mergekit-ext"), *[part.format(**values) for part in arguments.split()]]
    env = mergekit_env()
    env.pop("MERGEKIT_EXT_DEBUG", None)
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    return {
        "case_dir": case_dir,
        "result": result,
        "before": before,
        "after": _digest(case_dir),
        "new_entries": set(os.listdir(case_dir)) - entries_before,
    }


@pytest.fixture(scope="module")
def outcomes(world):
    root, paths = world
    inputs_before = _digest(paths["inputs"])
    state_before = _digest(paths["state"])
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = dict(zip([case[0] for case in CASES], pool.map(lambda case: _run_case(case, root, paths), CASES)))
    assert _digest(paths["inputs"]) == inputs_before, "an input changed"
    assert _digest(paths["state"]) == state_before
    return results


def test_at_least_forty_cases():
    assert len(CASES) >= 40 and len({case[0] for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_bad_input_is_refused_cleanly(case, outcomes):
    case_id, tool, _arguments, culprit, _setup = case
    outcome = outcomes[case_id]
    result = outcome["result"]
    transcript = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode != 0, transcript
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    if tool == "ext":
        assert "Traceback" not in result.stderr, transcript
        errors = [line for line in lines if line.startswith("Error:")]
        assert len(errors) == 1 and culprit in errors[0], transcript
    else:
        assert lines and culprit in lines[-1], transcript
    # Inputs and the user's own files untouched, byte for byte.
    assert outcome["after"] == outcome["before"], transcript
    # No output and nothing left beside it. mergekit-yaml creates OUT itself before
    # running any kernel; a refusal while merging may leave that folder, empty.
    new = outcome["new_entries"]
    if tool == "yaml" and new == {"out"}:
        assert not any((outcome["case_dir"] / "out").iterdir()), transcript
        new = set()
    assert not new, f"left behind: {sorted(new)}\n{transcript}"
    leftovers = [p.name for p in outcome["case_dir"].rglob("*") if any(mark in p.name for mark in LEFTOVER_MARKS)]
    assert not leftovers, leftovers
