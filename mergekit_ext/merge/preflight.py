"""Checks a mergekit configuration before any math runs (``mergekit-ext merge``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Tuple

import click

from mergekit_ext import io


def _looks_local(path: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else is meant as a folder.
    return os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1 or os.path.exists(path)


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
    for note in preflight(config):
        click.echo(f"note: {note}", err=True)
    return run_merge_atomic(config, out, options=options, overwrite=overwrite, config_source=config_source)
