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

import hashlib
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

    @property
    def base_model(self) -> Optional[str]:
        return self.config.get("base_model_name_or_path")


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
    """sha256 over an adapter folder's config and weight files (names and bytes)."""
    folder = Path(path)
    digest = hashlib.sha256()
    for file_name in (CONFIG_FILE, SAFETENSORS_FILE, BIN_FILE):
        file = folder / file_name
        if not file.is_file():
            continue
        digest.update(file_name.encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------
# checking adapters against each other and against the base


def base_weight_shapes(base: str | os.PathLike, names: Iterable[str]) -> Dict[str, Tuple[int, ...]]:
    """Shapes of some base tensors, read from the checkpoint headers (no weights loaded)."""
    from mergekit_ext.io import open_model

    loader = open_model(base)
    by_shard: Dict[str, List[str]] = {}
    for name in names:
        shard = loader.index.tensor_paths.get(name)
        if shard is not None:
            by_shard.setdefault(shard, []).append(name)
    shapes: Dict[str, Tuple[int, ...]] = {}
    for shard, shard_names in by_shard.items():
        if loader.index.is_safetensors:
            from safetensors import safe_open

            with safe_open(os.path.join(loader.index.base_path, shard), framework="pt") as handle:
                shapes.update({name: tuple(handle.get_slice(name).get_shape()) for name in shard_names})
        else:
            shapes.update({name: tuple(loader.get_tensor(name).shape) for name in shard_names})
    return shapes


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


def write_adapter(
    folder: str | os.PathLike,
    modules: Mapping[str, LoraFactors],
    *,
    base_model: Optional[str],
    dtype: torch.dtype = torch.float32,
    template: Optional[Mapping] = None,
) -> Path:
    """Write factors as a peft adapter folder that ``PeftModel.from_pretrained`` loads.

    ``folder`` should be a staging folder (``io.atomic_output_dir``); the
    factors must already carry the scale (``delta = b @ a``).
    """
    from safetensors.torch import save_file

    from mergekit_ext.io import write_json

    if not modules:
        raise AdapterError("refusing to write an adapter with no modules")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module, factors in sorted(modules.items()):
        tensors[f"{KEY_PREFIX}{module}.lora_A.weight"] = factors.a.to(dtype).contiguous()
        tensors[f"{KEY_PREFIX}{module}.lora_B.weight"] = factors.b.to(dtype).contiguous()
    save_file(tensors, str(folder / SAFETENSORS_FILE), metadata={"format": "pt"})
    write_json(folder / CONFIG_FILE, adapter_config(modules, base_model=base_model, template=template))
    return folder


def factorize(delta: torch.Tensor, rank: int, *, fan_in_fan_out: bool = False) -> LoraFactors:
    """Best rank-``rank`` LoRA factors of a dense update given in the base layout (truncated SVD)."""
    from mergekit_ext.tensors import truncated_svd

    matrix = delta.T if fan_in_fan_out else delta
    u, s, vh = truncated_svd(matrix.to(torch.float32), rank)
    # split the singular values evenly so neither factor carries all the magnitude
    root = s.sqrt()
    return LoraFactors(a=(root[:, None] * vh).contiguous(), b=(u * root).contiguous(), fan_in_fan_out=fan_in_fan_out)


def refactorize(factors: LoraFactors, rank: int) -> LoraFactors:
    """The best rank-``rank`` LoRA pair for the update of ``factors`` (no dense product formed)."""
    from mergekit_ext.tensors import factored_svd

    if factors.rank <= rank:
        return factors
    u, s, vh = factored_svd(factors.b, factors.a, rank)
    root = s.sqrt()
    return LoraFactors(a=(root[:, None] * vh).contiguous(), b=(u * root).contiguous(), fan_in_fan_out=factors.fan_in_fan_out)


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


# ---------------------------------------------------------------------------
# adapter-in, adapter-out merging with any mergekit method


def _method_inputs(method, adapters: Sequence[LoraAdapter]) -> Tuple[List[str], Optional[int]]:
    from mergekit.merge_methods.base import BasePolicy

    names = [adapter.name for adapter in adapters]
    ids = names if len(set(names)) == len(names) and "base" not in names else [f"{i}:{n}" for i, n in enumerate(names)]
    contract = method.spec.contract
    if contract.base in (BasePolicy.IGNORED, BasePolicy.FORBIDDEN):
        return ids, None  # the method merges whole models; the base is not one of them
    if contract.max_inputs is not None and len(ids) + 1 > contract.max_inputs:
        # slerp/nearswap interpolate between two models: the first adapted model
        # plays mergekit's "base_model" role, as in a mergekit YAML
        if len(ids) > contract.max_inputs:
            raise ValueError(f"merge method '{method.spec.name}' takes at most {contract.max_inputs} models, got {len(ids)} adapters")
        return ids, 0
    return ["base", *ids], 0


def method_parameters(method, adapter_ids: Sequence[str], given: Optional[Mapping[str, object]] = None) -> Dict[str, object]:
    """Parameters for ``merge_tensors``: a list value is one entry per adapter (keyed by id).

    A per-model ``weight`` that the method requires and the caller left out
    defaults to 1.0, so every task-arithmetic-like method works out of the box.
    """
    from mergekit.merge_methods.base import MISSING, ParameterScope

    known = {parameter.name: parameter for parameter in method.spec.parameters}
    parameters: Dict[str, object] = {}
    for key, value in (given or {}).items():
        if key not in known:
            raise ValueError(f"merge method '{method.spec.name}' has no parameter '{key}'; it has {sorted(known) or 'none'}")
        if isinstance(value, (list, tuple)):
            if known[key].scope == ParameterScope.SHARED:
                raise ValueError(f"parameter '{key}' of '{method.spec.name}' is global; give one value, not a list")
            if len(value) != len(adapter_ids):
                raise ValueError(f"parameter '{key}' has {len(value)} values for {len(adapter_ids)} adapters")
            value = dict(zip(adapter_ids, value))
        parameters[key] = value
    weight = known.get("weight")
    if weight is not None and "weight" not in parameters and weight.default is MISSING:
        parameters["weight"] = 1.0
    missing = [name for name, parameter in known.items() if parameter.default is MISSING and name not in parameters]
    if missing:
        raise ValueError(f"merge method '{method.spec.name}' needs parameter(s) {', '.join(missing)} (pass --param NAME=VALUE)")
    return parameters


def merge_adapters(
    adapters: Sequence[LoraAdapter],
    base_tensor: Callable[[str], torch.Tensor],
    method: str,
    rank: int,
    *,
    parameters: Optional[Mapping[str, object]] = None,
    progress: bool = False,
    keep_dense: bool = False,
) -> Tuple[Dict[str, LoraFactors], Dict[str, torch.Tensor]]:
    """Merge adapters with any registered mergekit method in dense space, back to rank ``rank``.

    Per module: ``θt = θ0 + ΔWt`` (a missing module is ``ΔWt = 0``), mergekit's
    ``merge_tensors`` with the method, ``ΔW = merged − θ0``, truncated SVD.
    ``base_tensor(name)`` returns the base checkpoint tensor. Returns the
    factors per module, and the dense merged updates when ``keep_dense``.
    """
    from mergekit import merge_methods
    from mergekit.merge_methods import merge_tensors
    from tqdm import tqdm

    import mergekit_ext  # noqa: F401  (our methods are registered)

    try:
        merge_method = merge_methods.get(method)
    except Exception:
        available = sorted(m.spec.name for m in merge_methods.registry.registered_methods())
        raise ValueError(f"unknown merge method '{method}'; registered: {', '.join(available)}") from None
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    ids, base_index = _method_inputs(merge_method, adapters)
    base_is_input = base_index is not None and ids[0] == "base"
    adapter_ids = ids[1:] if base_is_input else ids
    resolved = method_parameters(merge_method, adapter_ids, parameters)
    factors: Dict[str, LoraFactors] = {}
    dense: Dict[str, torch.Tensor] = {}
    for module in tqdm(module_union(adapters), desc=f"merging adapters ({method})", disable=not progress):
        name = weight_name(module)
        base = base_tensor(name).to(torch.float32)
        models = []
        for adapter in adapters:
            update = adapter.delta(module)
            models.append(base if update is None else base + update)
        inputs = [base, *models] if base_is_input else models
        merged = merge_tensors(inputs, merge_method, parameters=resolved, ids=ids, base_index=base_index, name=name, dtype=torch.float32)
        update = merged.to(torch.float32) - base
        fan = next(a.modules[module].fan_in_fan_out for a in adapters if module in a.modules)
        factors[module] = factorize(update, rank, fan_in_fan_out=fan)
        if keep_dense:
            dense[module] = update
    return factors, dense


def random_adapter(
    base: str | os.PathLike,
    out: str | os.PathLike,
    *,
    seed: int,
    rank: int = 4,
    alpha: float = 8.0,
    target_modules: Sequence[str] = ("q_proj", "v_proj"),
    use_rslora: bool = False,
    scale: float = 0.05,
    init_seed: Optional[int] = None,
) -> Path:
    """A seeded, nonzero peft LoRA adapter for ``base`` saved by peft itself (tests and demos).

    peft initialises B to zero; here A comes from peft's own seeded init
    (``init_seed``, default ``seed``: adapters sharing it share a LoRA frame, as
    fine-tunes from one initialisation do) and B is seeded Gaussian noise.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    torch.manual_seed(seed if init_seed is None else init_seed)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules), use_rslora=use_rslora, lora_dropout=0.0, task_type="CAUSAL_LM")
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


def merge_factors(
    adapters: Sequence[LoraAdapter],
    method: str,
    *,
    parameters: Optional[Mapping[str, object]] = None,
) -> Dict[str, LoraFactors]:
    """The conventional baseline RMM is compared with: merge the A's and the B's separately.

    Per module, ranks are zero-padded to the largest and mergekit's method runs
    on the stacked A factors and on the B factors, with an all-zero factor as
    the base (what a task vector of a factor is). The scale is folded into B.
    The product of merged factors is not the merge of the products, which is
    why this collapses (METHODS.md §5).
    """
    from mergekit import merge_methods
    from mergekit.merge_methods import merge_tensors

    import mergekit_ext  # noqa: F401

    merge_method = merge_methods.get(method)
    ids, base_index = _method_inputs(merge_method, adapters)
    base_is_input = base_index is not None and ids[0] == "base"
    resolved = method_parameters(merge_method, ids[1:] if base_is_input else ids, parameters)
    result: Dict[str, LoraFactors] = {}
    for module in module_union(adapters):
        a, b, fan = aligned_factors(adapters, module)
        merged = []
        for side, stacked in (("lora_A", a), ("lora_B", b)):
            inputs = [torch.zeros_like(stacked[0]), *stacked] if base_is_input else list(stacked)
            merged.append(merge_tensors(inputs, merge_method, parameters=resolved, ids=ids, base_index=base_index, name=f"{module}.{side}.weight", dtype=torch.float32))
        result[module] = LoraFactors(merged[0], merged[1], fan)
    return result
