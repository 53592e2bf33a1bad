"""Checks a mergekit configuration before any math runs (``mergekit-ext merge``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import click

from mergekit_ext import io


def _looks_local(path: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else is meant as a folder, and
    # so is "dir/name" when "dir" is a local folder (a mistyped local path must
    # say "does not exist", not become a Hub lookup).
    if os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1 or os.path.exists(path):
        return True
    return "/" in path and os.path.isdir(path.split("/", 1)[0])


def _parameter_sections(config, prefix: str = "") -> Iterator[Tuple[str, Optional[dict], bool]]:
    """(where, parameters, per_model) for every parameters mapping of a config (or one of its modules)."""
    yield f"{prefix}parameters", config.parameters, False
    for index, model in enumerate(config.models or ()):
        yield f"{prefix}models[{index}] ({model.model.model.path})", model.parameters, True
    for index, output_slice in enumerate(config.slices or ()):
        yield f"{prefix}slices[{index}].parameters", output_slice.parameters, False
        for source_index, source in enumerate(output_slice.sources):
            where = f"{prefix}slices[{index}].sources[{source_index}] ({source.model.model.path})"
            yield where, source.parameters, True
    for module_name, module in (getattr(config, "modules", None) or {}).items():
        yield from _parameter_sections(module, prefix=f"modules.{module_name}.")


def check_parameter_names(config) -> None:
    """Refuse a parameter name the merge method does not have, with the closest valid name.

    mergekit ignores unknown names silently (``lambdaa: 1.3`` merges with the
    default lambda). Global sections may hold any of the method's parameters
    (mergekit uses a global value as every model's default); a model's own
    section may hold only per-model ones.
    """
    import difflib

    from mergekit.merge_methods import registry as mergekit_registry

    import mergekit_ext  # noqa: F401  (our methods registered)

    name = config.merge_method
    try:
        method = mergekit_registry.get(name)
    except Exception:
        known = sorted(m.spec.name for m in mergekit_registry.registered_methods())
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; known methods: {', '.join(known)}"
        raise ValueError(f"unknown merge_method '{name}'{hint}") from None
    spec = getattr(method, "spec", None)
    if spec is None:  # a method without a declared parameter list: nothing to check against
        return
    every = [parameter.name for parameter in spec.parameters]
    per_model = [parameter.name for parameter in spec.parameters if parameter.scope.value != "shared"]
    for where, parameters, model_section in _parameter_sections(config):
        for key in parameters or {}:
            allowed = per_model if model_section else every
            if key in allowed:
                continue
            if key in every:
                raise ValueError(
                    f"{where}: '{key}' is a global parameter of {name}; put it under the top-level parameters"
                )
            close = difflib.get_close_matches(key, every, n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            valid = ", ".join(every) if every else "none"
            raise ValueError(f"{where}: {name} has no parameter '{key}'{hint} (its parameters: {valid})")


def preflight(config) -> List[str]:
    """Check a parsed ``MergeConfiguration`` before merging; returns notes, raises on errors.

    Refuses: a local model or LoRA path that does not exist or has no weights,
    and tensors whose shapes differ between models (vocabulary-sized tensors
    are left to mergekit's tokenizer handling).
    """
    notes: List[str] = []
    shapes_by_model: Dict[str, Dict[str, Tuple[int, ...]]] = {}
    for reference in config.referenced_models():
        for label, model_path in (("model", reference.model), ("LoRA adapter", reference.lora)):
            if model_path is None:
                continue
            path = os.path.expanduser(model_path.path)
            if not _looks_local(path):
                notes.append(f"{path}: treated as a Hugging Face Hub id, not checked")
                continue
            if not os.path.isdir(path):
                raise ValueError(f"{label} path in the config does not exist: {path}")
            if label == "model" and reference.lora is None:
                io.open_model(path)  # clear error when no weights are there
                shapes_by_model[path] = io.header_shapes(path)
    vocabulary_words = ("embed", "lm_head", "wte", "output.weight")
    reference_model = None
    for model, shapes in shapes_by_model.items():
        if reference_model is None:
            reference_model, reference_shapes = model, shapes
            continue
        for name, shape in shapes.items():
            other = reference_shapes.get(name)
            if other is None or other == shape or any(word in name for word in vocabulary_words):
                continue
            raise ValueError(
                f"tensor {name} has shape {shape} in {model} but {other} in {reference_model}: "
                "these models do not share an architecture"
            )
    return notes


LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
VOCABULARY_KEYS = ("vocab_size",)
FLOAT_CODES = {"F64": "float64", "F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def _local_models(config) -> List[str]:
    """The local full-model folders a config reads (no LoRA references): the base first (what
    the others are compared with), then in config order."""
    paths = []
    references = list(config.referenced_models())
    base = getattr(config, "base_model", None)
    references.sort(key=lambda reference: reference != base)
    for reference in references:
        path = os.path.expanduser(reference.model.path)
        if reference.lora is None and _looks_local(path) and os.path.isdir(path) and path not in paths:
            paths.append(path)
    return paths


def _config_value(path: str, keys) -> Optional[int]:
    file = Path(path) / "config.json"
    if not file.is_file():
        return None
    data = io.read_json_object(file)
    data = {**data.get("text_config", {}), **data} if isinstance(data.get("text_config"), dict) else data
    return next((data[key] for key in keys if isinstance(data.get(key), int)), None)


def check_shards(config) -> None:
    """Refuse a sharded model whose index names a shard that is not there (mergekit would stop
    on it in the middle of the merge)."""
    for path in _local_models(config):
        for index_file in Path(path).glob("*.index.json"):
            index = io.read_json_object(index_file)
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index_file}: no weight_map: not a sharded-checkpoint index")
            for shard in sorted(set(weight_map.values())):
                if not (Path(path) / shard).is_file():
                    tensor = next(name for name, file in weight_map.items() if file == shard)
                    raise ValueError(f"{index_file} names shard {shard} (e.g. for {tensor}), which is not in {path}")


def _first_disagreement(config, keys) -> Optional[Tuple[Path, int, Path, int]]:
    """(path, value, first path, first value) for the first local model whose config value
    under ``keys`` differs from the first model's; None when they all agree (or say nothing)."""
    values = [(path, _config_value(path, keys)) for path in _local_models(config)]
    values = [(path, value) for path, value in values if value is not None]
    for path, value in values[1:]:
        if value != values[0][1]:
            return path, value, values[0][0], values[0][1]
    return None


def check_layer_counts(config) -> None:
    """A ``models:`` merge combines layer i of every model: refuse models of different depth
    (``slices:`` configs choose their layer ranges and are left to mergekit)."""
    differing = None if config.slices else _first_disagreement(config, LAYER_KEYS)
    if differing:
        path, depth, first, first_depth = differing
        raise ValueError(
            f"{path} has {depth} layers but {first} has {first_depth}: a models: merge needs the same "
            "number of layers in every model (choose layer ranges with slices:)"
        )


def check_vocabularies(config) -> None:
    """Models with different vocabularies (added tokens) merge only with a tokenizer setting,
    with which mergekit aligns the embedding rows by token; without one, refuse."""
    if config.tokenizer_source is not None or getattr(config, "tokenizer", None) is not None:
        return
    differing = _first_disagreement(config, VOCABULARY_KEYS)
    if differing:
        path, size, first, first_size = differing
        raise ValueError(
            f"vocabulary size {size} in {path} but {first_size} in {first}: set tokenizer_source: base "
            "(keep the base's tokens) or union (all tokens) so mergekit aligns the embeddings by token"
        )


def dtype_note(config) -> Optional[str]:
    """Models stored in different dtypes merge as they are: every method computes in float32,
    and the result is written in the config's ``dtype`` (else the base model's)."""
    stored = {}
    for path in _local_models(config):
        floating = {code for code in io.header_dtypes(path).values() if code in FLOAT_CODES}
        stored[path] = "/".join(FLOAT_CODES[code] for code in sorted(floating))
    if len(set(stored.values())) <= 1:
        return None
    listed = ", ".join(f"{Path(path).name} {dtypes}" for path, dtypes in stored.items())
    return f"models store different dtypes ({listed}): merged in float32, written as {config.dtype or 'the base model dtype'}"


def check_inputs_agree(config) -> List[str]:
    """The checks of mismatched inputs, before any tensor is written; notes for defined behaviours."""
    check_shards(config)
    check_layer_counts(config)
    check_vocabularies(config)
    note = dtype_note(config)
    return [note] if note else []


def run(config_file: str | os.PathLike, out: str | os.PathLike, options, *, overwrite: bool = False) -> Path:
    """Preflight, then mergekit's engine into a staging folder renamed to ``out``."""
    import yaml

    from mergekit_ext.engine import run_merge_atomic, validate_config

    config_source = Path(config_file).read_text(encoding="utf-8")
    try:
        parsed = yaml.safe_load(config_source)
    except yaml.YAMLError as error:
        raise ValueError(f"{config_file}: not valid YAML: {error}") from None
    if not isinstance(parsed, dict):
        raise ValueError(f"{config_file}: not a mergekit configuration (expected a mapping)")
    config = validate_config(parsed, source=str(config_file))
    check_parameter_names(config)
    check_parameter_values(config)
    for note in [*check_inputs_agree(config), *preflight(config)]:
        click.echo(f"note: {note}", err=True)
    return run_merge_atomic(config, out, options=options, overwrite=overwrite, config_source=config_source)


def did_you_mean(word: str, choices) -> str:
    """``"; did you mean 'x'?"`` for the closest of ``choices``, or ``""`` (for every name a user can mistype)."""
    import difflib

    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


# Documented ranges of mergekit's own methods' parameters (mergekit checks none of
# them: ties with density 2.0 silently returns the base). Our methods declare theirs.
_BUILTIN_RANGES = {
    "density": (0.0, 1.0, False, True, "in (0, 1]"),
    "t": (0.0, 1.0, True, True, "in [0, 1]"),
    "select_topk": (0.0, 1.0, False, True, "in (0, 1]"),
    "gamma": (0.0, 1.0, True, True, "in [0, 1]"),
    "epsilon": (0.0, 1.0, True, True, "in [0, 1]"),
}


def _numbers(value) -> Iterator[float]:
    """Every number in a parameter value: a scalar, a gradient list, or filtered values."""
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, (int, float)):
        yield float(value)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _numbers(item)
    elif isinstance(value, dict):
        yield from _numbers(value.get("value"))
    elif hasattr(value, "value"):  # mergekit's ConditionalParameter
        yield from _numbers(value.value)


def check_parameter_values(config) -> None:
    """Refuse a NaN or infinite number in any parameter, and values outside the
    documented range of mergekit's own methods (density in (0, 1], ...), naming where."""
    import math

    from mergekit_ext.registry import our_methods

    ours = {method.spec.name for method in our_methods()}
    method = config.merge_method
    for where, parameters, _model_section in _parameter_sections(config):
        for key, value in (parameters or {}).items():
            for number in _numbers(value):
                if not math.isfinite(number):
                    raise ValueError(f"{where}: {method} parameter '{key}' must be a finite number, got {number}")
                if method in ours or key not in _BUILTIN_RANGES:
                    continue
                low, high, low_closed, high_closed, text = _BUILTIN_RANGES[key]
                if (number < low or (number == low and not low_closed)) or (number > high or (number == high and not high_closed)):
                    raise ValueError(f"{where}: {method} parameter '{key}' must be {text}, got {number}")
