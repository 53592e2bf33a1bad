"""``mergekit-ext merge``: mergekit's own engine with a preflight check and an atomic output.

Stock ``mergekit-yaml`` runs our methods unchanged; this wrapper adds what a
long merge benefits from: every local model path and every tensor shape is
checked from the safetensors headers before any math runs, and the result
appears at OUT only when the merge has finished.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Tuple

import click
import yaml

from mergekit_ext import io


def _looks_local(path: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else is meant as a folder.
    return os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1 or os.path.exists(path)


def _header_shapes(folder: Path) -> Dict[str, Tuple[int, ...]]:
    from safetensors import safe_open

    shapes: Dict[str, Tuple[int, ...]] = {}
    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    shapes[key] = tuple(handle.get_slice(key).get_shape())
        except Exception as error:
            raise ValueError(f"cannot read safetensors file {file}: {error}") from error
    return shapes


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
                shapes_by_model[path] = _header_shapes(Path(path))
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
    """Preflight, then ``mergekit.merge.run_merge`` into a staging folder renamed to ``out``."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge

    config_source = Path(config_file).read_text(encoding="utf-8")
    try:
        config = MergeConfiguration.model_validate(yaml.safe_load(config_source))
    except Exception as error:
        raise ValueError(f"{config_file}: not a valid mergekit configuration: {error}") from error
    for note in preflight(config):
        click.echo(f"note: {note}", err=True)
    with io.atomic_output_dir(out, overwrite=overwrite) as staging:
        run_merge(config, str(staging), options=options, config_source=config_source)
    return Path(out)


def _merge_command():
    from mergekit.options import add_merge_options

    @click.command("merge")
    @click.argument("config_file", type=click.Path(exists=True, dir_okay=False))
    @click.argument("out_path", type=click.Path())
    @click.option("--overwrite", is_flag=True, help="Replace OUT_PATH if it exists.")
    @add_merge_options
    def merge_command(merge_options, config_file, out_path, overwrite) -> None:
        """Run a mergekit YAML like `mergekit-yaml`, checked first and written atomically."""
        merge_options.apply_global_options()
        run(config_file, out_path, merge_options, overwrite=overwrite)
        click.echo(f"wrote {out_path}")

    return merge_command


merge_command = _merge_command()
