"""Tiny, locally built models and tokenizers (no hub access anywhere).

Used by the tests, the demo zoo and the speed benchmark, so there is one model
builder in the project.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch

# A small character vocabulary: enough for the zoo's synthetic tasks.
DEFAULT_ALPHABET = list("abcdefghijklmnopqrstuvwxyz0123456789 =:+-*<>|#.,?!()[]ABCDEFGHIJKLMNOPQRSTUVWXYZ\n")
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]


def char_tokenizer(alphabet: Optional[Sequence[str]] = None):
    """A character-level fast tokenizer, saved and reloaded as PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    symbols = list(alphabet or DEFAULT_ALPHABET)
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + symbols)}
    model = models.WordLevel(vocab=vocab, unk_token="<unk>")
    backend = Tokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        clean_up_tokenization_spaces=False,
    )


# ChatML, the layout of Qwen2 and SmolLM2 instruct models.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def chat_tokenizer(alphabet: Optional[Sequence[str]] = None):
    """``char_tokenizer`` with ChatML's turn tokens (special) and chat template; EOS stays ``</s>``."""
    tokenizer = char_tokenizer(alphabet)
    tokenizer.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def llama_config(vocab_size: int, *, hidden_size: int = 32, layers: int = 2, heads: int = 4, intermediate_size: Optional[int] = None, **overrides):
    from transformers import LlamaConfig

    settings = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return LlamaConfig(**{**settings, **overrides})


def gpt2_config(vocab_size: int, *, hidden_size: int = 32, layers: int = 2, heads: int = 4, **overrides):
    from transformers import GPT2Config

    return GPT2Config(vocab_size=vocab_size, n_embd=hidden_size, n_layer=layers, n_head=heads, n_positions=128, bos_token_id=1, eos_token_id=2, **overrides)


def qwen2_config(vocab_size: int, *, hidden_size: int = 32, layers: int = 2, heads: int = 4, kv_heads: int = 2, intermediate_size: int = 64, **overrides):
    """A tiny Qwen2: Llama-like with q/k/v biases and grouped KV heads (mergekit 0.1.5's
    llama architecture lists no bias weights, so a Llama with biases cannot stand in)."""
    from transformers import Qwen2Config

    settings = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    return Qwen2Config(**{**settings, **overrides})


def random_model(config, *, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A causal LM with seeded random weights."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    return model.to(dtype).eval()


def perturbed(model, *, seed: int, scale: float = 0.02):
    """A copy of ``model`` with seeded Gaussian noise added to every float weight (a fake fine-tune)."""
    import copy

    generator = torch.Generator().manual_seed(seed)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in clone.parameters():
            noise = torch.randn(parameter.shape, generator=generator) * scale
            parameter.add_(noise.to(parameter.dtype))
    return clone


def save_model(model, path: str | os.PathLike, tokenizer=None) -> Path:
    """Save a model folder (safetensors) with its tokenizer, as Hugging Face lays it out."""
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def save_family(root: str | os.PathLike, config, tokenizer=None, *, count: int = 2, seed: int = 0, scale: float = 0.02, dtype: torch.dtype = torch.float32) -> Dict[str, Path]:
    """A seeded random base and ``count`` perturbed "fine-tunes" of it, saved under ``root``
    as ``base``, ``ft0``, ``ft1``, …; returns their folders by those names."""
    root = Path(root)
    base = random_model(config, seed=seed, dtype=dtype)
    paths = {"base": save_model(base, root / "base", tokenizer)}
    for index in range(count):
        paths[f"ft{index}"] = save_model(perturbed(base, seed=seed + 100 + index, scale=scale), root / f"ft{index}", tokenizer)
    return paths


def load_state_dict(path: str | os.PathLike) -> Dict[str, torch.Tensor]:
    """All tensors of a model folder in memory (for tests and small models only)."""
    from safetensors.torch import load_file

    folder = Path(path)
    state: Dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(file))
    return state


def pad_right(sequences: Sequence[Sequence[int]], pad_id: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Token id lists → right-padded ids [batch, width] and attention mask (1 on real tokens)."""
    width = max(len(sequence) for sequence in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        mask[row, : len(sequence)] = 1
    return ids.to(device), mask.to(device)
