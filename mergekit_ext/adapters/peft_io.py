"""LoRA adapters in peft's on-disk format: the one home for adapter I/O.

An adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors``
with keys ``base_model.model.<module>.lora_A.weight`` (r × in) and
``….lora_B.weight`` (out × r). The weight update peft applies to
``<module>.weight`` is ``scale · B @ A`` with ``scale = alpha / r`` (or
``alpha / sqrt(r)`` with rsLoRA), transposed for modules stored [in, out]
(``fan_in_fan_out``, GPT-2's Conv1D).

Reading folds that scale into ``B`` once, so everything downstream works on
plain factors whose product IS the update. Writing stores factors with
``lora_alpha = r`` (scale 1, no rsLoRA), so peft reproduces them exactly.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
BIN_FILE = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
_FACTOR_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<side>[AB])(?:\.[^.]+)?\.weight$")


class AdapterError(ValueError):
    """An adapter folder that cannot be read, or that does not fit the base model."""


@dataclass(frozen=True)
class LoraFactors:
    """One adapted module: ``delta = b @ a`` (scale already folded into ``b``)."""

    a: torch.Tensor  # r × in
    b: torch.Tensor  # out × r
    fan_in_fan_out: bool = False  # the base weight is stored [in, out]

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    @property
    def weight_shape(self) -> Tuple[int, int]:
        """Shape of the base weight this update adds to."""
        out_features, in_features = self.b.shape[0], self.a.shape[1]
        return (in_features, out_features) if self.fan_in_fan_out else (out_features, in_features)

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense update in the base weight's layout."""
        update = self.b.to(dtype) @ self.a.to(dtype)
        return update.T.contiguous() if self.fan_in_fan_out else update

    def padded(self, rank: int) -> "LoraFactors":
        """The same update with zero rows/columns added up to ``rank``."""
        extra = rank - self.rank
        if extra < 0:
            raise ValueError(f"cannot pad a rank-{self.rank} factor pair down to rank {rank}")
        if extra == 0:
            return self
        a = torch.cat([self.a, self.a.new_zeros(extra, self.a.shape[1])], dim=0)
        b = torch.cat([self.b, self.b.new_zeros(self.b.shape[0], extra)], dim=1)
        return LoraFactors(a, b, self.fan_in_fan_out)


@dataclass
class LoraAdapter:
    """A LoRA adapter in memory: folded factors per module, plus where it came from."""

    name: str
    modules: Dict[str, LoraFactors]  # module path in the base model → factors
    config: Dict = field(default_factory=dict)  # adapter_config.json as read (or to write)
    path: Optional[Path] = None

    def delta(self, module: str, dtype: torch.dtype = torch.float32) -> Optional[torch.Tensor]:
        """Dense update of ``module`` (base layout), or None when this adapter leaves it alone."""
        factors = self.modules.get(module)
        return None if factors is None else factors.delta(dtype)


def weight_name(module: str) -> str:
    """The base checkpoint tensor a module's update applies to."""
    return f"{module}.weight"


# ---------------------------------------------------------------------------
# reading


def _scale(config: Mapping, module: str, rank: int) -> float:
    """peft's LoRA scale for ``module``: alpha/r, or alpha/sqrt(r) with rsLoRA."""
    from peft.utils.other import get_pattern_key

    alpha_pattern = config.get("alpha_pattern") or {}
    alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), config.get("lora_alpha", 8))
    if config.get("use_rslora"):
        return float(alpha) / math.sqrt(rank)
    return float(alpha) / rank


def _refuse_unsupported(config: Mapping, config_path: Path) -> None:
    def refuse(reason: str) -> None:
        raise AdapterError(f"{config_path}: unsupported adapter: {reason}")

    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        refuse(f"peft_type is {peft_type}, only LORA adapters are supported")
    if config.get("use_dora"):
        refuse("DoRA (use_dora=true) has a magnitude vector that is not a low-rank update")
    if config.get("lora_bias") or config.get("bias", "none") != "none":
        refuse("adapters that train biases (bias/lora_bias) change more than low-rank weights")
    if config.get("modules_to_save"):
        refuse(f"modules_to_save {config['modules_to_save']} stores full weights, not low-rank updates")
    if config.get("target_parameters"):
        refuse("target_parameters (LoRA on raw parameters) is not supported")
    if config.get("layer_replication"):
        refuse("layer_replication changes the model's layer structure")


def _load_weights(folder: Path) -> Dict[str, torch.Tensor]:
    safetensors_path, bin_path = folder / SAFETENSORS_FILE, folder / BIN_FILE
    if safetensors_path.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(safetensors_path))
        except (SafetensorError, OSError, RuntimeError) as error:
            raise AdapterError(f"cannot read adapter weights {safetensors_path} (truncated or corrupt?): {error}") from None
    if bin_path.is_file():
        try:
            return torch.load(bin_path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises many types for a bad pickle
            raise AdapterError(f"cannot read adapter weights {bin_path} (truncated or corrupt?): {error}") from None
    raise AdapterError(f"no {SAFETENSORS_FILE} or {BIN_FILE} in adapter folder {folder}")


def read_config(path: str | os.PathLike) -> Dict:
    from mergekit_ext.io import read_json_object

    folder = Path(path)
    if not folder.is_dir():
        raise AdapterError(f"adapter path is not a folder: {folder}")
    config_path = folder / CONFIG_FILE
    config = read_json_object(config_path, error=AdapterError, missing=f"no {CONFIG_FILE} in adapter folder {folder}")
    _refuse_unsupported(config, config_path)
    return config


def read_adapter(path: str | os.PathLike, name: Optional[str] = None) -> LoraAdapter:
    """Read a peft LoRA adapter folder; the scale is folded into ``B`` (float32 factors).

    Refuses, naming the file and tensor, anything that is not a plain LoRA on
    linear layers: DoRA, trained biases, modules_to_save, embedding LoRA, a
    rank that disagrees between A and B, corrupt or truncated weights.
    """
    from mergekit_ext.io import check_finite_tensor

    folder = Path(path)
    config = read_config(folder)
    weights = _load_weights(folder)
    weights_file = folder / (SAFETENSORS_FILE if (folder / SAFETENSORS_FILE).is_file() else BIN_FILE)
    halves: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        match = _FACTOR_KEY.match(key)
        if match is None or "lora_embedding" in key:
            raise AdapterError(
                f"{weights_file}: tensor '{key}' is not a lora_A/lora_B weight of a linear layer "
                "(embedding LoRA, biases and saved modules are not supported)"
            )
        module = match["module"]
        if module.startswith(KEY_PREFIX):
            module = module[len(KEY_PREFIX):]
        if tensor.dim() != 2:
            raise AdapterError(f"{weights_file}: tensor '{key}' has shape {tuple(tensor.shape)}; only 2-D (linear) LoRA factors are supported")
        if not tensor.is_floating_point():
            raise AdapterError(f"{weights_file}: tensor '{key}' is {tensor.dtype}; LoRA factors are floating point")
        check_finite_tensor(tensor, tensor_name=key, source=str(weights_file))
        halves.setdefault(module, {})[match["side"]] = tensor
    if not halves:
        raise AdapterError(f"{weights_file} holds no LoRA factors")
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    modules: Dict[str, LoraFactors] = {}
    for module, pair in sorted(halves.items()):
        if set(pair) != {"A", "B"}:
            missing = ({"A", "B"} - set(pair)).pop()
            raise AdapterError(f"{weights_file}: module '{module}' has no lora_{missing} weight")
        a, b = pair["A"].to(torch.float32), pair["B"].to(torch.float32)
        if a.shape[0] != b.shape[1]:
            raise AdapterError(
                f"{weights_file}: module '{module}' has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; "
                "their ranks disagree"
            )
        modules[module] = LoraFactors(a, b * _scale(config, module, a.shape[0]), fan_in_fan_out)
    return LoraAdapter(name=name or folder.name, modules=modules, config=config, path=folder)


def adapter_hash(path: str | os.PathLike) -> str:
    """Content hash of an adapter folder: its config and weight files."""
    from mergekit_ext.io import content_hash

    return content_hash(path, names=(CONFIG_FILE, SAFETENSORS_FILE, BIN_FILE))


# ---------------------------------------------------------------------------
# checking adapters against each other and against the base


def torch_dtype(name: str) -> torch.dtype:
    """``torch.bfloat16`` for ``"bfloat16"`` and so on (the names in ``ADAPTER_DTYPES``)."""
    return getattr(torch, name)


def adapter_bytes(folder: str | os.PathLike) -> int:
    """Bytes of an adapter's config and weights (not the README peft writes beside them)."""
    folder = Path(folder)
    return sum((folder / name).stat().st_size for name in (CONFIG_FILE, SAFETENSORS_FILE, BIN_FILE) if (folder / name).is_file())


def check_adapters_against_base(adapters: Sequence[LoraAdapter], base: str | os.PathLike) -> None:
    """Refuse adapters whose modules the base model lacks or has with other shapes (headers only)."""
    from mergekit_ext.io import header_shapes

    shapes = header_shapes(base, [weight_name(module) for module in module_union(adapters)])
    check_against_base(adapters, shapes, base_label=f"base model {base}")


def load_adapters(paths: Sequence[str | os.PathLike], base: str | os.PathLike, *, names: Optional[Sequence[str]] = None) -> List[LoraAdapter]:
    """Read adapter folders and check them against the base model and each other."""
    if names is not None and len(names) != len(paths):
        raise AdapterError(f"--names: {len(names)} names for {len(paths)} adapters")
    adapters = [read_adapter(path, name=None if names is None else names[index]) for index, path in enumerate(paths)]
    check_adapters_against_base(adapters, base)
    return adapters


def check_against_base(adapters: Sequence[LoraAdapter], base_shapes: Mapping[str, Sequence[int]], base_label: str = "base model") -> None:
    """Refuse an adapter whose modules are missing from the base or have other shapes."""
    for adapter in adapters:
        where = adapter.path or adapter.name
        for module, factors in adapter.modules.items():
            name = weight_name(module)
            if name not in base_shapes:
                raise AdapterError(f"adapter {where}: module '{module}' has no tensor '{name}' in the {base_label}")
            if tuple(base_shapes[name]) != factors.weight_shape:
                raise AdapterError(
                    f"adapter {where}: module '{module}' updates a {factors.weight_shape} weight but "
                    f"'{name}' in the {base_label} is {tuple(base_shapes[name])} (adapter made for another model?)"
                )


def module_union(adapters: Sequence[LoraAdapter]) -> List[str]:
    """Every module any adapter touches, sorted; refuses adapters that disagree on a shape or layout."""
    seen: Dict[str, Tuple[Tuple[int, int], bool, str]] = {}
    for adapter in adapters:
        for module, factors in adapter.modules.items():
            key = (factors.weight_shape, factors.fan_in_fan_out)
            if module in seen and seen[module][:2] != key:
                raise AdapterError(
                    f"adapters {seen[module][2]} and {adapter.path or adapter.name} disagree on module '{module}': "
                    f"weight {seen[module][0]} (fan_in_fan_out={seen[module][1]}) vs {key[0]} (fan_in_fan_out={key[1]})"
                )
            seen.setdefault(module, (*key, str(adapter.path or adapter.name)))
    return sorted(seen)


def aligned_factors(adapters: Sequence[LoraAdapter], module: str) -> Tuple[torch.Tensor, torch.Tensor, bool]:
    """Stacked factors of one module across adapters: A [n, r, in], B [n, out, r].

    Lower ranks are zero-padded to the largest and an adapter without the
    module contributes zero factors (a zero update), so every product
    ``B[i] @ A[i]`` is exactly adapter i's update.
    """
    present = [adapter.modules[module] for adapter in adapters if module in adapter.modules]
    if not present:
        raise KeyError(module)
    rank = max(factors.rank for factors in present)
    template = present[0]
    a_list, b_list = [], []
    for adapter in adapters:
        factors = adapter.modules.get(module)
        if factors is None:
            a_list.append(template.a.new_zeros(rank, template.a.shape[1]))
            b_list.append(template.b.new_zeros(template.b.shape[0], rank))
        else:
            padded = factors.padded(rank)
            a_list.append(padded.a)
            b_list.append(padded.b)
    return torch.stack(a_list), torch.stack(b_list), template.fan_in_fan_out


# ---------------------------------------------------------------------------
# writing


def adapter_config(
    modules: Mapping[str, LoraFactors],
    *,
    base_model: Optional[str],
    template: Optional[Mapping] = None,
) -> Dict:
    """A peft LoraConfig dict with scale 1 for every module (alpha = r, no rsLoRA).

    ``target_modules`` lists the exact module paths; modules whose rank differs
    from the most common one get exact ``rank_pattern``/``alpha_pattern`` entries.
    """
    from collections import Counter

    from peft import LoraConfig

    ranks = {module: factors.rank for module, factors in modules.items()}
    fan_in_fan_out = {factors.fan_in_fan_out for factors in modules.values()}
    if len(fan_in_fan_out) > 1:
        raise AdapterError("cannot write one adapter mixing fan_in_fan_out and ordinary modules")
    common_rank = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {re.escape(module): rank for module, rank in ranks.items() if rank != common_rank}
    task_type = (template or {}).get("task_type") or "CAUSAL_LM"
    config = LoraConfig(
        r=common_rank,
        lora_alpha=common_rank,
        target_modules=sorted(modules),
        rank_pattern=dict(pattern),
        alpha_pattern=dict(pattern),
        use_rslora=False,
        fan_in_fan_out=fan_in_fan_out.pop(),
        bias="none",
        lora_dropout=0.0,
        task_type=task_type,
        base_model_name_or_path=base_model,
        inference_mode=True,
    )
    data = config.to_dict()
    # peft stores sets as lists; keep the file deterministic
    data["target_modules"] = sorted(modules)
    for key, value in list(data.items()):
        if isinstance(value, set):
            data[key] = sorted(value)
    return data


def relative_base_path(base_model: Optional[str], folder: str | os.PathLike) -> Optional[str]:
    """A local base model's path relative to the adapter ``folder`` (a Hub id or None as given).

    Written adapters record where their base is relative to themselves, so that
    the pair can be moved or shared together; an absolute path names one
    machine's layout (and its user's home).
    """
    if not base_model or not os.path.isabs(base_model) or not Path(base_model).exists():
        return base_model
    return os.path.relpath(base_model, Path(folder).absolute())


def model_card(base_model: Optional[str], modules: Mapping[str, "LoraFactors"], *, description: Optional[str] = None) -> str:
    """README.md for a written adapter: what it is, its base, and how to load it."""
    ranks = sorted({factors.rank for factors in modules.values()})
    rank_text = ", ".join(str(rank) for rank in ranks)
    base_text = base_model or "(not recorded)"
    lines = [
        "---",
        "library_name: peft",
        "tags: [lora, mergekit-ext]",
        "---",
        "",
        "# LoRA adapter written by mergekit-ext",
        "",
        description or "A peft LoRA adapter written by `mergekit-ext`.",
        "",
        f"- modules: {len(modules)} (rank {rank_text}; lora_alpha = r, so the stored factors are the update: ΔW = B·A)",
        f"- base model: `{base_text}`"
        + (" (relative to this folder; peft resolves `base_model_name_or_path` from the working directory,"
           " so load the base explicitly as below)" if base_model and not os.path.isabs(base_model) and base_model.startswith(".") else ""),
        "",
        "```python",
        "from pathlib import Path",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'adapter = Path("PATH/TO/THIS/FOLDER")',
        f'base = (adapter / "{base_text}").resolve()' if base_model and not os.path.isabs(base_model) and base_model.startswith(".") else f'base = "{base_text}"',
        "model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)",
        "tokenizer = AutoTokenizer.from_pretrained(base)",
        "```",
        "",
        "If the base is a `mergekit-ext zoo` model: prompts are the task text itself (e.g. `rev(abc) =`),",
        "tokenized with `add_special_tokens=False` (the character tokenizer's BOS was never seen in training).",
        "",
    ]
    return "\n".join(lines)


def write_adapter(
    folder: str | os.PathLike,
    modules: Mapping[str, LoraFactors],
    *,
    base_model: Optional[str],
    dtype: torch.dtype = torch.float32,
    template: Optional[Mapping] = None,
    description: Optional[str] = None,
) -> Path:
    """Write factors as a peft adapter folder that ``PeftModel.from_pretrained`` loads, with a README.md model card.

    ``folder`` should be a staging folder (``io.atomic_output_dir``, a sibling
    of the final folder, so relative paths stay right); the factors must
    already carry the scale (``delta = b @ a``). A local ``base_model`` is
    recorded relative to the adapter folder (``relative_base_path``).
    """
    from safetensors.torch import save_file

    from mergekit_ext.io import write_json, write_text

    if not modules:
        raise AdapterError("refusing to write an adapter with no modules")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base_model = relative_base_path(base_model, folder)
    tensors = {}
    for module, factors in sorted(modules.items()):
        tensors[f"{KEY_PREFIX}{module}.lora_A.weight"] = factors.a.to(dtype).contiguous()
        tensors[f"{KEY_PREFIX}{module}.lora_B.weight"] = factors.b.to(dtype).contiguous()
    save_file(tensors, str(folder / SAFETENSORS_FILE), metadata={"format": "pt"})
    write_json(folder / CONFIG_FILE, adapter_config(modules, base_model=base_model, template=template))
    write_text(folder / "README.md", model_card(base_model, modules, description=description))
    return folder


def factorize(delta: torch.Tensor, rank: int, *, fan_in_fan_out: bool = False) -> LoraFactors:
    """Best rank-``rank`` LoRA factors of a dense update given in the base layout (truncated SVD)."""
    from mergekit_ext.tensors import split_singular_values, truncated_svd

    matrix = delta.T if fan_in_fan_out else delta
    a, b = split_singular_values(*truncated_svd(matrix.to(torch.float32), rank))
    return LoraFactors(a=a, b=b, fan_in_fan_out=fan_in_fan_out)


def refactorize(factors: LoraFactors, rank: int) -> LoraFactors:
    """The best rank-``rank`` LoRA pair for the update of ``factors`` (no dense product formed)."""
    from mergekit_ext.tensors import factored_svd, split_singular_values

    if factors.rank <= rank:
        return factors
    a, b = split_singular_values(*factored_svd(factors.b, factors.a, rank))
    return LoraFactors(a=a, b=b, fan_in_fan_out=factors.fan_in_fan_out)


def merged_model(
    base: str | os.PathLike,
    updated: Iterable[str],
    update: Callable[[str], torch.Tensor],
    out_folder: str | os.PathLike,
    *,
    progress: bool = True,
) -> None:
    """Write base + dense updates as a full model folder (config and tokenizer copied).

    ``updated`` names the base tensors that change and ``update(name)`` returns
    that tensor's dense update, computed only when the writer reaches it, so
    the base streams one tensor at a time. ``out_folder`` should be a staging
    folder. Updates are added in float32 and stored in the base tensor's dtype.
    """
    from tqdm import tqdm

    from mergekit_ext.io import copy_side_files, open_model, tensor_names, tensor_writer

    loader = open_model(base)
    names = tensor_names(loader)
    updated = set(updated)
    unknown = sorted(updated - set(names))
    if unknown:
        raise AdapterError(f"updates for tensors the base model {base} does not have: {unknown[:5]}")
    writer = tensor_writer(out_folder)
    for name in tqdm(names, desc="writing merged model", disable=not progress):
        tensor = loader.get_tensor(name)
        if name in updated:
            tensor = (tensor.to(torch.float32) + update(name).to(torch.float32)).to(tensor.dtype)
        writer.save_tensor(name, tensor)
    writer.finalize()
    copy_side_files(base, out_folder)
