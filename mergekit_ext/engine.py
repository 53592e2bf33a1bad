"""Running mergekit's own engine: the one place that calls ``mergekit.merge.run_merge``.

Every command that writes a merged model (``merge``, ``demo``, ``adarank learn
--merge-out``, ``tune``, the benchmarks) goes through ``run_merge_atomic`` so
that the result appears at its path only once the merge has finished.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from mergekit_ext import io


def quiet_options(**overrides: Any):
    """``MergeOptions`` for merges run by our commands: no model card, no progress, tokenizer copied."""
    from mergekit.options import MergeOptions

    settings = dict(write_model_card=False, quiet=True, copy_tokenizer=True, lazy_unpickle=False)
    settings.update(overrides)
    return MergeOptions(**settings)


def validate_config(config: Union[Mapping, Any], *, source: str = "merge configuration"):
    """A ``MergeConfiguration`` from a dict (or one already parsed); a clear error naming ``source``."""
    from mergekit.config import MergeConfiguration

    if isinstance(config, MergeConfiguration):
        return config
    try:
        return MergeConfiguration.model_validate(dict(config))
    except Exception as error:
        raise ValueError(f"{source}: not a valid mergekit configuration: {error}") from error


def run_merge_atomic(
    config: Union[Mapping, Any],
    out: Union[str, os.PathLike],
    *,
    options=None,
    overwrite: bool = False,
    config_source: Optional[str] = None,
    extra_inputs: Sequence[Union[str, os.PathLike]] = (),
) -> Path:
    """Merge ``config`` (a dict or ``MergeConfiguration``) with mergekit's engine into ``out``, atomically."""
    from mergekit.merge import run_merge

    validated = validate_config(config)
    inputs = [*config_inputs(validated), *extra_inputs]
    with io.atomic_output_dir(out, overwrite=overwrite, inputs=inputs, kind="merged-model") as staging:
        with finite_inputs():
            run_merge(validated, str(staging), options=options if options is not None else quiet_options(), config_source=config_source)
        check_finite_output(staging)  # whatever the method, a non-finite model is never published
        card = staging / "README.md"
        if card.is_file():  # mergekit names the model after the folder it wrote: the staging folder
            card.write_text(card.read_text(encoding="utf-8").replace(staging.name, Path(out).name), encoding="utf-8")
    return Path(out)


def config_inputs(config) -> list:
    """The local folders and files a parsed configuration reads: models, LoRA adapters and
    string parameters naming an existing file (e.g. adarank's ``file``); never to be written."""
    inputs = []
    for reference in config.referenced_models():
        for part in (reference.model, reference.lora):
            path = getattr(part, "path", None)
            if path and os.path.exists(os.path.expanduser(path)):
                inputs.append(os.path.expanduser(path))
    parameters = dict(config.parameters or {})
    for value in parameters.values():
        if isinstance(value, str) and os.path.isfile(os.path.expanduser(value)):
            inputs.append(os.path.expanduser(value))
    return inputs


def check_finite_output(folder: Union[str, os.PathLike]) -> None:
    """Refuse a merged model holding NaN or Inf, naming the first such tensor (one tensor in memory at a time)."""
    from safetensors import safe_open

    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                io.check_finite_tensor(handle.get_tensor(name), tensor_name=name, source="the merged model (not written)")


_finite_lock = threading.Lock()
_finite_users = 0
_unchecked_get_tensor = None


@contextlib.contextmanager
def finite_inputs():
    """While mergekit's engine runs: every tensor its loader reads must be finite.

    mergekit's own methods (ties, linear, ...) take NaN inputs without a word; checking
    in the loader costs no extra read. Counted, so merges in parallel threads share it.
    """
    global _finite_users, _unchecked_get_tensor
    import torch
    from mergekit.io.lazy_tensor_loader import LazyTensorLoader

    with _finite_lock:
        if _finite_users == 0:
            _unchecked_get_tensor = original = LazyTensorLoader.get_tensor

            def get_tensor(self, key, *args, **kwargs):
                tensor = original(self, key, *args, **kwargs)
                if tensor is not None and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    raise io.NonFiniteError(f"tensor {key} of model {self.index.base_path} holds NaN or Inf; refusing to merge it")
                return tensor

            LazyTensorLoader.get_tensor = get_tensor
        _finite_users += 1
    try:
        yield
    finally:
        with _finite_lock:
            _finite_users -= 1
            if _finite_users == 0:
                LazyTensorLoader.get_tensor = _unchecked_get_tensor
