"""Adapter-in, adapter-out merging: any registered mergekit method on LoRA updates in dense space.

``merge_adapters`` forms each adapter's dense update, merges with mergekit's
``merge_tensors`` and truncates back to a LoRA rank; ``merge_factors`` is the
conventional baseline that merges the A and B factors separately (it collapses:
docs/methods.md#rmm; the LoRA benchmark measures how much).
"""

from __future__ import annotations

from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from mergekit_ext.adapters.peft_io import (
    LoraAdapter,
    LoraFactors,
    aligned_factors,
    factorize,
    module_union,
    weight_name,
)
from mergekit_ext.merge.preflight import did_you_mean


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
            hint = did_you_mean(key, known)
            raise ValueError(f"merge method '{method.spec.name}' has no parameter '{key}'{hint} (its parameters: {', '.join(sorted(known)) or 'none'})")
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
) -> Dict[str, LoraFactors]:
    """Merge adapters with any registered mergekit method in dense space, back to rank ``rank``.

    Per module: ``θt = θ0 + ΔWt`` (a missing module is ``ΔWt = 0``), mergekit's
    ``merge_tensors`` with the method, ``ΔW = merged − θ0``, truncated SVD.
    ``base_tensor(name)`` returns the base checkpoint tensor. Returns the
    factors per module.
    """
    from mergekit import merge_methods
    from mergekit.merge_methods import merge_tensors
    from tqdm import tqdm

    try:
        merge_method = merge_methods.get(method)
    except Exception:
        available = sorted(m.spec.name for m in merge_methods.registry.registered_methods())
        raise ValueError(f"unknown merge method '{method}'{did_you_mean(method, available)} (registered: {', '.join(available)})") from None
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    ids, base_index = _method_inputs(merge_method, adapters)
    base_is_input = base_index is not None and ids[0] == "base"
    adapter_ids = ids[1:] if base_is_input else ids
    resolved = method_parameters(merge_method, adapter_ids, parameters)
    factors: Dict[str, LoraFactors] = {}
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
    return factors


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
    why this collapses (docs/methods.md#rmm).
    """
    from mergekit import merge_methods
    from mergekit.merge_methods import merge_tensors

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
