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


def _tiny(config_class, vocab_size: int, **settings):
    """A 2-layer, hidden-32 config with the char tokenizer's special ids (overridable)."""
    common = dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return config_class(**{**common, **settings})


def architecture_config(name: str, vocab_size: int):
    """A tiny config of one of the layouts people merge (``ARCHITECTURES``), random weights
    to be drawn by ``random_model``: what each adds over an untied Llama is in the table."""
    import transformers

    builders = {
        "llama": lambda: llama_config(vocab_size),
        "llama-tied": lambda: llama_config(vocab_size, tie_word_embeddings=True),
        "qwen2": lambda: qwen2_config(vocab_size, tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2),
        "qwen3": lambda: _tiny(transformers.Qwen3Config, vocab_size, head_dim=8, tie_word_embeddings=True),
        "mistral": lambda: _tiny(transformers.MistralConfig, vocab_size, sliding_window=64, tie_word_embeddings=False),
        "gemma2": lambda: _tiny(
            transformers.Gemma2Config, vocab_size, head_dim=8, sliding_window=64, query_pre_attn_scalar=8,
            final_logit_softcapping=30.0, attn_logit_softcapping=50.0, tie_word_embeddings=True,
        ),  # fmt: skip
        "phi3": lambda: _tiny(
            transformers.Phi3Config, vocab_size, num_key_value_heads=4, original_max_position_embeddings=128,
            tie_word_embeddings=False,
        ),  # fmt: skip
        "gpt2": lambda: gpt2_config(vocab_size),
        "mixtral": lambda: _tiny(
            transformers.MixtralConfig, vocab_size, intermediate_size=32, num_local_experts=2, num_experts_per_tok=2,
            tie_word_embeddings=False,
        ),  # fmt: skip
    }
    if name not in builders:
        raise ValueError(f"unknown architecture {name!r}; expected one of {', '.join(builders)}")
    return builders[name]()


# name: what the layout adds (docs/architectures.md's table lists these).
ARCHITECTURES = {
    "llama": "LlamaForCausalLM, untied lm_head",
    "llama-tied": "LlamaForCausalLM, tie_word_embeddings (Llama-3.2-1B/3B, SmolLM2)",
    "qwen2": "Qwen2ForCausalLM: q/k/v biases, grouped KV heads, tied (Qwen2.5-0.5B)",
    "qwen3": "Qwen3ForCausalLM: q/k RMS norms, head_dim != hidden/heads, tied (Qwen3-0.6B)",
    "mistral": "MistralForCausalLM: sliding window, grouped KV heads",
    "gemma2": "Gemma2ForCausalLM: logit soft-capping, pre/post feed-forward norms, tied",
    "phi3": "Phi3ForCausalLM: fused qkv_proj and gate_up_proj",
    "gpt2": "GPT2LMHeadModel: Conv1D (transposed) weights, fused c_attn, wpe, tied",
    "mixtral": "MixtralForCausalLM: sparse MoE (2 experts per layer, a router)",
}


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


def random_lora_adapter(
    base: str | os.PathLike,
    out: str | os.PathLike,
    *,
    seed: int,
    rank: int = 4,
    alpha: float = 8.0,
    target_modules="all-linear",
    scale: float = 0.05,
    use_rslora: bool = False,
    init_seed: Optional[int] = None,
) -> Path:
    """A seeded, nonzero peft LoRA adapter for ``base``, saved by peft itself (tests and demos).

    ``target_modules``: peft's "all-linear" (every linear and Conv1D layer but the output
    head) or module names. peft initialises B to zero; here A comes from peft's own seeded
    init (``init_seed``, default ``seed``: adapters sharing it share a LoRA frame, as
    fine-tunes from one initialisation do) and B is seeded Gaussian noise.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    torch.manual_seed(seed if init_seed is None else init_seed)
    modules = target_modules if isinstance(target_modules, str) else list(target_modules)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=modules, use_rslora=use_rslora, lora_dropout=0.0, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in sorted(peft_model.named_parameters()):
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
            elif "lora_A" in name and init_seed is not None:
                # a fine-tune moves A away from the shared init a little
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1 * parameter.abs().mean())
    peft_model.save_pretrained(str(out), safe_serialization=True)
    return Path(out)


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
