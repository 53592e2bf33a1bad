"""The reliability rules (issue 30), each one test over every command that it concerns.

1. OUT is never over a user's file: a user's folder or file given as OUT (with
   ``--overwrite`` where the command has it) and an OUT inside an input are refused,
   byte for byte untouched, before anything is written.
2. Reading never writes: a command that reads models, bundles, states, learned files
   and a zoo that was copied elsewhere leaves every byte of them as it was.
3. No non-finite output: a NaN or infinite parameter or input, or a result that
   overflows, is refused and nothing is published.
4. Every file read is validated: a file this package wrote, edited (a dtype, a value
   out of range, a NaN, a bad metadata field), is refused naming the file and tensor.

A new command is covered by adding one line to ``WRITERS``, ``READERS``,
``NON_FINITE`` or ``EDITED``. Commands run in process (click's runner) on the
tiny models of ``conftest``; placeholders in braces are filled from ``world``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import invoke, random_adapter
from safetensors import safe_open
from safetensors.torch import load_file, save_file

pytestmark = pytest.mark.slow

_LEARN = "adarank learn {ft0} {ft1} --base {base} --prompts {prompts} --objective entropy --steps 0"

# (id, command, takes --overwrite, an input of the command to put OUT inside; None: it reads none)
WRITERS = [
    ("merge", "merge {cfg} {out}", True, "ft0"),
    ("eval", "eval {ft0} --tasks zoo_dup_val --include-path {tasks} --limit 1 --out {out}", True, "ft0"),
    ("tune", "tune {space} {out} --trials 1 --limit 1 -q", False, "ft0"),
    ("tall-compress", "tall compress --base {base} {ft0} {ft1} {out} --quiet", True, "ft0"),
    ("tall-recover", "tall recover {bundle} ft0 {out} --quiet", True, "bundle"),
    ("continual-init", "continual init {out} {ft0} --base {base} --quiet", True, "ft0"),
    ("continual-add", "continual add {out} {ft1} --quiet", False, "ft1"),
    ("rmm-build", "rmm build --base {base} {ad0} {ad1} -k 1 {out} --quiet", True, "ad0"),
    ("rmm-revert", "rmm revert {rmm} ad0 {out}", True, "rmm"),
    ("lora-merge", "lora merge --base {base} --method task_arithmetic {ad0} {ad1} -r 2 {out} --quiet", True, "ad0"),
    ("zoo", "zoo {out} --preset test --quiet", False, None),
    ("adarank-learn", _LEARN + " --out {out}", True, "ft0"),
    ("adarank-merge-out", _LEARN + " --out {scratch}/learned.safetensors --merge-out {out}", True, "ft0"),
    ("demo", "demo --zoo {zoo} --out {out} --preset test --quiet", True, "zoo"),
]

# (id, command): each succeeds and leaves its inputs as they were ({scratch} is its own folder)
READERS = [
    ("merge", "merge {cfg} {scratch}/out"),
    ("merge-adarank-file", "merge {adarank_cfg} {scratch}/out"),
    ("tall-compress", "tall compress --base {base} {ft0} {ft1} {scratch}/out --quiet"),
    ("tall-recover", "tall recover {bundle} ft0 {scratch}/out --quiet"),
    ("continual-add", "continual add {state_copy} {ft1} --quiet"),
    ("continual-show", "continual show {state}"),
    ("rmm-build", "rmm build --base {base} {ad0} {ad1} -k 1 {scratch}/out --quiet"),
    ("rmm-revert", "rmm revert {rmm} ad0 {scratch}/out"),
    ("lora-merge", "lora merge --base {base} --method task_arithmetic {ad0} {ad1} -r 2 {scratch}/out --quiet"),
    ("adarank-show", "adarank show {learned}"),
    ("adarank-learn-copied-zoo", "adarank learn --zoo {zoo} --objective entropy --steps 0 --out {scratch}/x.safetensors"),
    ("eval-copied-zoo-tasks", "eval {ft0} --tasks zoo_dup_val --include-path {tasks} --limit 1"),
]

# (id, command, text the error must contain): refused, no output
NON_FINITE = [
    ("merge-ties-nan-input", "merge {cfg_ties_nan_input} {out}", "holds NaN"),
    ("merge-task-arithmetic-nan-lambda", "merge {cfg_nan_lambda} {out}", "'lambda' must be a finite number"),
    ("merge-linear-inf-weight", "merge {cfg_inf_weight} {out}", "'weight' must be a finite number"),
    ("merge-ties-density-above-one", "merge {cfg_density_2} {out}", "'density' must be in (0, 1]"),
    ("merge-ties-density-negative", "merge {cfg_density_negative} {out}", "'density' must be in (0, 1]"),
    ("merge-linear-overflow", "merge {cfg_overflow} {out}", "non-finite"),
    ("tall-compress-nan-model", "tall compress --base {base} {ft0} {nan} {out} --quiet", "holds"),
    ("tall-recover-nan-multitask", "tall recover {bundle_nan} ft0 {out} --quiet", "multitask"),
    ("continual-init-nan-model", "continual init {out} {nan} --base {base} --quiet", "holds"),
    ("lora-merge-nan-adapter", "lora merge --base {base} --method task_arithmetic {ad0} {ad_nan} -r 2 {out} --quiet", "lora_"),
    ("rmm-build-nan-adapter", "rmm build --base {base} {ad0} {ad_nan} -k 1 {out} --quiet", "lora_"),
]

# (id, file kind, how it is edited, command, text the error must contain)
EDITED = [
    ("adarank-mask-uint8", "learned", "mask_uint8", "merge {adarank_edited_cfg} {out}", "uint8"),
    ("adarank-coefficient-nan", "learned", "coefficient_nan", "merge {adarank_edited_cfg} {out}", "coefficient/"),
    ("adarank-metadata-range", "learned", "metadata_ratio", "merge {adarank_edited_cfg} {out}", "max_rank_ratio"),
    ("tall-mask-dtype", "bundle", "mask_float", "tall recover {edited} ft0 {out} --quiet", "masks/ft0"),
    ("tall-shapes", "bundle", "shapes_bad", "tall recover {edited} ft0 {out} --quiet", "shapes"),
    ("continual-accumulator-dtype", "state", "accumulator_half", "continual add {edited} {ft1} --quiet", "accumulator tensor"),
    ("continual-accumulator-nan", "state", "accumulator_nan", "continual add {edited} {ft1} --quiet", "accumulator"),
    ("continual-history", "state", "history_norm", "continual add {edited} {ft1} --quiet", "task_vector_norm"),
    ("rmm-coefficients-nan", "rmm", "coefficients_nan", "rmm revert {edited} ad0 {out}", "coefficients"),
    ("rmm-k", "rmm", "k_text", "rmm revert {edited} ad0 {out}", "k must be"),
    ("adapter-integer-factor", "adapter", "factor_int", "lora merge --base {base} --method task_arithmetic {ad0} {edited} -r 2 {out} --quiet", "lora_"),
]


def _digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()} | {
        str(p.relative_to(root)) + "/": "dir" for p in sorted(root.rglob("*")) if p.is_dir()
    }


def _with_nan(path: Path, tensor_index: int = 3) -> None:
    """Put one NaN into a safetensors file (a copy), keeping its metadata."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    name = sorted(tensors)[tensor_index]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, str(path), metadata=metadata)


def _config(path: Path, document: dict) -> str:
    path.write_text(yaml.safe_dump(document))
    return str(path)


@pytest.fixture(scope="module")
def world(tiny_family, test_zoo, tmp_path_factory):
    """Inputs every rule uses: models, a NaN model, a bundle, a state, adapters, an RMM bundle,
    an AdaRank file, a copied zoo (its task YAMLs point elsewhere) and configs."""
    root = tmp_path_factory.mktemp("rules")
    inputs = root / "inputs"
    paths = {name: Path(shutil.copytree(tiny_family[name], inputs / name)) for name in ("base", "ft0", "ft1")}
    paths["nan"] = Path(shutil.copytree(paths["ft1"], inputs / "nan"))
    _with_nan(paths["nan"] / "model.safetensors")
    paths["zoo"] = Path(shutil.copytree(test_zoo.root, inputs / "zoo", ignore=shutil.ignore_patterns("evals")))
    paths["tasks"] = test_zoo.task_dir
    paths["prompts"] = inputs / "prompts.txt"
    paths["prompts"].write_text("abc\nhello\nworld\n")
    paths["ad0"] = random_adapter(paths["base"], inputs / "ad0", seed=1, init_seed=0)
    paths["ad1"] = random_adapter(paths["base"], inputs / "ad1", seed=2, init_seed=0)
    paths["ad_nan"] = Path(shutil.copytree(paths["ad1"], inputs / "ad_nan"))
    _with_nan(paths["ad_nan"] / "adapter_model.safetensors", tensor_index=0)
    made = {
        "bundle": f"tall compress --base {paths['base']} {paths['ft0']} {paths['ft1']} {inputs / 'bundle'} --quiet",
        "state": f"continual init {inputs / 'state'} {paths['ft0']} --base {paths['base']} --quiet",
        "rmm": f"rmm build --base {paths['base']} {paths['ad0']} {paths['ad1']} -k 1 {inputs / 'rmm'} --quiet",
        "learned": _LEARN.format(**paths) + f" --out {inputs / 'learned.safetensors'}",
    }
    for name, command in made.items():
        result = invoke(*command.split())
        assert result.exit_code == 0, result.output
    paths.update(bundle=inputs / "bundle", state=inputs / "state", rmm=inputs / "rmm", learned=inputs / "learned.safetensors")
    paths["bundle_nan"] = Path(shutil.copytree(paths["bundle"], inputs / "bundle_nan"))
    _with_nan(paths["bundle_nan"] / "multitask" / "model.safetensors")

    configs = root / "configs"
    configs.mkdir()
    two = [{"model": str(paths["ft0"]), "parameters": {"weight": 1.0}}, {"model": str(paths["ft1"]), "parameters": {"weight": 1.0}}]
    ta = {"merge_method": "task_arithmetic", "base_model": str(paths["base"]), "models": two, "dtype": "float32"}
    paths["cfg"] = _config(configs / "ta.yml", ta)
    paths["cfg_nan_lambda"] = _config(configs / "nan_lambda.yml", {**ta, "parameters": {"lambda": float("nan")}})
    ties_nan = {**ta, "merge_method": "ties", "parameters": {"density": 0.5}, "models": [two[0], {"model": str(paths["nan"]), "parameters": {"weight": 1.0}}]}
    paths["cfg_ties_nan_input"] = _config(configs / "ties_nan.yml", ties_nan)
    paths["cfg_density_2"] = _config(configs / "density_2.yml", {**ta, "merge_method": "ties", "parameters": {"density": 2.0}})
    paths["cfg_density_negative"] = _config(configs / "density_neg.yml", {**ta, "merge_method": "ties", "parameters": {"density": -0.5}})
    linear = {"merge_method": "linear", "dtype": "float32", "parameters": {"normalize": False}}
    inf_models = [{"model": str(paths["ft0"]), "parameters": {"weight": float("inf")}}, two[1]]
    paths["cfg_inf_weight"] = _config(configs / "inf_weight.yml", {**linear, "models": inf_models})
    huge = [{"model": str(paths[name]), "parameters": {"weight": 3e38}} for name in ("ft0", "ft1")]
    paths["cfg_overflow"] = _config(configs / "overflow.yml", {**linear, "models": huge})
    adarank = {**ta, "merge_method": "adarank", "parameters": {"file": str(paths["learned"])}, "models": [{"model": str(paths["ft0"])}, {"model": str(paths["ft1"])}]}
    paths["adarank_cfg"] = _config(configs / "adarank.yml", adarank)
    space = {**ta, "tune": {"methods": {"task_arithmetic": {"lambda": [0.5]}}, "tasks": {"validation": ["zoo_dup_val"], "test": ["zoo_dup"]}, "include_path": str(test_zoo.task_dir)}}
    paths["space"] = _config(configs / "space.yml", space)
    return root, paths


def _fill(command: str, values: dict) -> list:
    return [part.format(**{key: str(value) for key, value in values.items()}) for part in command.split()]


def _error_lines(result) -> list:
    return [line for line in result.output.splitlines() if line.startswith("Error:")]


def _check_refused(result, culprit: str = "") -> None:
    errors = _error_lines(result)
    assert result.exit_code != 0 and len(errors) == 1 and culprit in errors[0], result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output


# ---------------------------------------------------------------------------
# 1. OUT is never over a user's file, and never inside an input


@pytest.mark.parametrize("situation", ["user-folder", "user-file", "inside-input"])
@pytest.mark.parametrize("writer", WRITERS, ids=[w[0] for w in WRITERS])
def test_out_is_never_a_users_file(writer, situation, world, tmp_path):
    root, paths = world
    name, command, takes_overwrite, an_input = writer
    if situation == "inside-input" and an_input is None:
        pytest.skip(f"{name} reads no input")
    case = tmp_path / "case"
    case.mkdir()
    if situation == "user-folder":
        out = case / "mine"
        out.mkdir()
        (out / "report.md").write_text("a user's report\n")
        (out / "notes").mkdir()
        (out / "notes" / "t.txt").write_text("a user's notes\n")
    elif situation == "user-file":
        out = case / "mine.txt"
        out.write_text("a user's file\n")
    else:
        out = paths[an_input] / "out"
    inputs_before = _digest(root / "inputs")
    case_before = _digest(case)
    arguments = _fill(command, {**paths, "out": out, "scratch": case})
    result = invoke(*arguments, *(["--overwrite"] if takes_overwrite and situation != "inside-input" else []))
    _check_refused(result)
    assert _digest(case) == case_before, f"{name} changed the user's files or left something: {result.output}"
    assert _digest(root / "inputs") == inputs_before, f"{name} wrote inside an input: {result.output}"


def test_tune_database_is_never_written_inside_an_input(world, tmp_path):
    root, paths = world
    before = _digest(root / "inputs")
    result = invoke("tune", paths["space"], tmp_path / "study", "--trials", "1", "--storage", f"sqlite:///{paths['base']}/study.db", "-q")
    _check_refused(result, "inside the input")
    assert _digest(root / "inputs") == before and not (tmp_path / "study").exists()


def test_overwrite_replaces_only_our_own_output(world, tmp_path):
    """The positive side of the rule: an output of ours is replaced with --overwrite, and a
    user's folder inside a zoo is not taken for one of ours by where it is."""
    root, paths = world
    out = tmp_path / "merged"
    assert invoke("merge", paths["cfg"], out).exit_code == 0
    assert invoke("merge", paths["cfg"], out).exit_code != 0  # exists, no --overwrite
    assert invoke("merge", paths["cfg"], out, "--overwrite").exit_code == 0
    zoo = tmp_path / "zoo"
    shutil.copytree(paths["zoo"], zoo)
    (zoo / "notes").mkdir()
    (zoo / "notes" / "t.txt").write_text("x\n")
    _check_refused(invoke("merge", paths["cfg"], zoo / "notes", "--overwrite"), "not written by mergekit-ext")
    assert (zoo / "notes" / "t.txt").read_text() == "x\n"


# ---------------------------------------------------------------------------
# 2. Reading never writes


@pytest.mark.parametrize("reader", READERS, ids=[r[0] for r in READERS])
def test_reading_never_writes(reader, world, tmp_path):
    root, paths = world
    name, command = reader
    state_copy = Path(shutil.copytree(paths["state"], tmp_path / "state"))  # the one input a command may change
    before = _digest(root / "inputs")
    result = invoke(*_fill(command, {**paths, "scratch": tmp_path, "state_copy": state_copy}))
    assert result.exit_code == 0, result.output
    assert _digest(root / "inputs") == before, f"{name} changed an input"


def test_a_zoo_is_read_without_writing_even_when_moved(world, tmp_path):
    """The copied zoo's task YAMLs still name the original's data; loading it renders fresh
    ones outside it, and a read-only eval cache does not stop an evaluation."""
    from mergekit_ext.evaluate.harness import ModelSpec, lm_eval_results
    from mergekit_ext.zoo import load_zoo

    root, paths = world
    before = _digest(paths["zoo"])
    zoo = load_zoo(paths["zoo"])
    assert not zoo.task_dir.is_relative_to(paths["zoo"])
    task = zoo.tasks[0]
    data = yaml.safe_load((zoo.task_dir / f"zoo_{task}.yaml").read_text())["dataset_kwargs"]["data_files"]
    assert all(path.startswith(str(paths["zoo"])) for path in data.values())
    blocked = tmp_path / "cache"
    blocked.write_text("a file where the cache folder would go: every cache write fails\n")
    results = lm_eval_results(ModelSpec(zoo.base), [zoo.lm_eval_task(task, "validation")], zoo.task_dir, cache_dir=blocked / "evals")
    assert results
    assert _digest(paths["zoo"]) == before


# ---------------------------------------------------------------------------
# 3. No non-finite output


@pytest.mark.parametrize("case", NON_FINITE, ids=[c[0] for c in NON_FINITE])
def test_no_non_finite_output(case, world, tmp_path):
    root, paths = world
    name, command, culprit = case
    out = tmp_path / "out"
    result = invoke(*_fill(command, {**paths, "out": out}))
    _check_refused(result, culprit)
    assert sorted(p.name for p in tmp_path.iterdir()) == [], f"{name} left {list(tmp_path.iterdir())}"


# ---------------------------------------------------------------------------
# 4. Every file read is validated


def _edit_learned(path: Path, how: str) -> None:
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata())
    tensors = load_file(str(path))
    mask = next(key for key in sorted(tensors) if key.startswith("mask/"))
    coefficient = next(key for key in sorted(tensors) if key.startswith("coefficient/"))
    if how == "mask_uint8":
        tensors[mask] = tensors[mask].to(torch.uint8) * 2
    elif how == "coefficient_nan":
        tensors[coefficient] = tensors[coefficient].clone()
        tensors[coefficient][0] = float("nan")
    elif how == "metadata_ratio":
        info = json.loads(metadata["adarank"])
        info["max_rank_ratio"] = 5.0
        metadata["adarank"] = json.dumps(info)
    save_file(tensors, str(path), metadata=metadata)


def _edit(kind: str, how: str, copy: Path) -> None:
    if kind == "learned":
        _edit_learned(copy, how)
    elif how == "mask_float":
        file = copy / "masks" / "ft0" / "model.safetensors"
        save_file({k: v.float() for k, v in load_file(str(file)).items()}, str(file), metadata={"format": "pt"})
    elif how == "shapes_bad":
        manifest = json.loads((copy / "bundle.json").read_text())
        manifest["shapes"][next(iter(manifest["shapes"]))] = "big"
        (copy / "bundle.json").write_text(json.dumps(manifest))
    elif how == "accumulator_half":
        file = copy / "continual" / "model.safetensors"
        save_file({k: v.half() for k, v in load_file(str(file)).items()}, str(file), metadata={"format": "pt"})
    elif how == "accumulator_nan":
        _with_nan(copy / "continual" / "model.safetensors", tensor_index=0)
    elif how == "history_norm":
        data = json.loads((copy / "continual" / "state.json").read_text())
        data["models"][0]["task_vector_norm"] = "large"
        (copy / "continual" / "state.json").write_text(json.dumps(data))
    elif how == "coefficients_nan":
        _with_nan(copy / "coefficients.safetensors", tensor_index=0)
    elif how == "k_text":
        manifest = json.loads((copy / "manifest.json").read_text())
        manifest["k"] = "1"
        (copy / "manifest.json").write_text(json.dumps(manifest))
    elif how == "factor_int":
        file = copy / "adapter_model.safetensors"
        tensors = load_file(str(file))
        first = sorted(tensors)[0]
        tensors[first] = tensors[first].to(torch.int32)
        save_file(tensors, str(file), metadata={"format": "pt"})
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("case", EDITED, ids=[c[0] for c in EDITED])
def test_every_file_read_is_validated(case, world, tmp_path):
    root, paths = world
    name, kind, how, command, culprit = case
    source = {"learned": paths["learned"], "bundle": paths["bundle"], "state": paths["state"], "rmm": paths["rmm"], "adapter": paths["ad1"]}[kind]
    edited = tmp_path / ("edited" + source.suffix)
    shutil.copytree(source, edited) if source.is_dir() else shutil.copy2(source, edited)
    _edit(kind, how, edited)
    values = {**paths, "out": tmp_path / "out", "edited": edited}
    if kind == "learned":
        config = yaml.safe_load(Path(paths["adarank_cfg"]).read_text())
        config["parameters"]["file"] = str(edited)
        values["adarank_edited_cfg"] = _config(tmp_path / "adarank.yml", config)
    result = invoke(*_fill(command, values))
    _check_refused(result, culprit)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------
# Learned files that cannot be misapplied; one-off rules


def test_adarank_cart_two_models_in_the_other_order_are_matched_by_content(world, tiny_family, tmp_path):
    """With two models CART's fingerprints are the same either way round: check_models false
    with the models listed in the other order must still give each model its own masks."""
    from mergekit_ext.methods.adarank.format import open_learned_file

    root, paths = world
    assert open_learned_file(paths["learned"]).variant == "cart" and open_learned_file(paths["learned"]).task_count == 2
    config = yaml.safe_load(Path(paths["adarank_cfg"]).read_text())
    assert invoke("merge", _config(tmp_path / "a.yml", config), tmp_path / "in_order").exit_code == 0
    config["parameters"]["check_models"] = False
    config["models"] = list(reversed(config["models"]))
    result = invoke("merge", _config(tmp_path / "b.yml", config), tmp_path / "swapped")
    assert result.exit_code == 0, result.output
    a, b = load_file(str(tmp_path / "in_order" / "model.safetensors")), load_file(str(tmp_path / "swapped" / "model.safetensors"))
    # Equal up to the order of float sums; swapped masks would differ by the task vectors' size.
    worst = max(float((a[key] - b[key]).abs().max()) for key in a)
    assert worst < 1e-6, worst
    config["models"][0] = {"model": str(tiny_family["ft2"])}  # weights the file was not learned on
    refused = invoke("merge", _config(tmp_path / "c.yml", config), tmp_path / "other")
    _check_refused(refused, "not the two it was learned on")


def test_continual_add_refuses_the_state_itself(world, tmp_path):
    root, paths = world
    state = Path(shutil.copytree(paths["state"], tmp_path / "state"))
    before = _digest(state)
    _check_refused(invoke("continual", "add", state, state, "--quiet"), "one of the inputs")
    assert _digest(state) == before


def test_continual_state_files_have_normal_permissions(world, tmp_path):
    root, paths = world
    previous = os.umask(0o022)
    try:
        assert invoke("continual", "init", tmp_path / "state", paths["ft0"], "--base", paths["base"], "--quiet").exit_code == 0
        assert invoke("continual", "add", tmp_path / "state", paths["ft1"], "--quiet").exit_code == 0
    finally:
        os.umask(previous)
    modes = {str(p.relative_to(tmp_path)): p.stat().st_mode & 0o777 for p in (tmp_path / "state").rglob("*") if p.is_file()}
    assert set(modes.values()) == {0o644}, modes


def _pickle_model(paths, folder: Path) -> Path:
    shutil.copytree(paths["ft1"], folder, ignore=shutil.ignore_patterns("*.safetensors", ".mergekit-ext"))
    torch.save(load_file(str(paths["ft1"] / "model.safetensors")), folder / "pytorch_model.bin")
    return folder


def test_pickle_checkpoints_need_a_safe_torch_or_the_opt_in(world, tmp_path, monkeypatch):
    root, paths = world
    pickled = _pickle_model(paths, tmp_path / "pickled")
    config = yaml.safe_load(Path(paths["cfg"]).read_text())
    config["models"][1]["model"] = str(pickled)
    config_path = _config(tmp_path / "pickle.yml", config)
    # This torch (>= 2.6) loads weights only: the checkpoint merges without the flag.
    assert invoke("merge", config_path, tmp_path / "safe").exit_code == 0
    # A torch whose torch.load would run the pickle's code (as < 2.6 does): refused ...
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    monkeypatch.delenv("MERGEKIT_EXT_ALLOW_PICKLE_CODE", raising=False)
    _check_refused(invoke("merge", config_path, tmp_path / "unsafe"), "pytorch_model.bin is a pickle checkpoint")
    assert not (tmp_path / "unsafe").exists()
    # ... unless the user opts in, knowing what it allows.
    result = invoke("--allow-pickle-code", "merge", config_path, tmp_path / "opted-in")
    assert result.exit_code == 0, result.output
    a, b = load_file(str(tmp_path / "safe" / "model.safetensors")), load_file(str(tmp_path / "opted-in" / "model.safetensors"))
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_a_huge_prompt_is_refused_with_a_clear_message(world, tmp_path):
    root, paths = world
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("short\n" + "x" * 1_000_000 + "\n")
    result = invoke(*_fill(_LEARN.replace("{prompts}", str(prompts)) + " --out {out}", {**paths, "out": tmp_path / "f.safetensors"}))
    _check_refused(result, "prompt 2 has 1,000,000 characters")
