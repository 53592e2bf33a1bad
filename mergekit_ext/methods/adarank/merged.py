"""The differentiable merged model: the merged weights as a function of masks and coefficients,
run through the checkpoint's architecture built with no weights of its own."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch

from mergekit_ext.methods.adarank import MASK_TEMPERATURE
from mergekit_ext.methods.adarank.decoding import Answered, cache_keyword, greedy_answers
from mergekit_ext.methods.adarank.factorise import Entry
from mergekit_ext.methods.adarank.kernel import merge_components, merge_other, straight_through_mask


def empty_architecture(reference_path: Path, names: Sequence[str], device):
    """The checkpoint's architecture with no weights of its own: parameters on the meta device
    (accelerate's ``init_empty_weights``), buffers such as rotary frequencies real, on ``device``.

    The learner passes every weight in at each forward (``functional_call``), so loading the
    checkpoint here would only add one transient float32 copy of the model to the peak.
    A parameter the checkpoint lacks (and no tied one covers) is refused by name.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(reference_path))
    with init_empty_weights(include_buffers=False):
        skeleton = AutoModelForCausalLM.from_config(config)
    # Under init_empty_weights transformers leaves a tied output embedding untied (its own
    # meta tensor); tying it as loading does makes the checkpoint's embedding serve both, and
    # functional_call (tie_weights=True) passes the merged embedding to the head too.
    skeleton.tie_weights()
    present = set(names)
    missing = sorted(group[0] for group in tied_groups(skeleton) if not present.intersection(group))
    if missing:
        known = {name for name, _ in skeleton.named_parameters(remove_duplicate=False)} | {name for name, _ in skeleton.named_buffers()}
        unused = sorted(present - known)
        # transformers 5 fuses some layouts when loading (e.g. MoE experts into one 3-D tensor):
        # the learner runs the checkpoint's tensors as stored, so say that is the reason.
        why = f" (it stores {unused[0]} and {len(unused) - 1} more that transformers converts when loading; not supported by the learner)" if unused else ""
        raise ValueError(f"adarank: {reference_path}: the architecture needs weights the checkpoint lacks: {', '.join(missing[:3])}{why}")
    for module in skeleton.modules():
        for key, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[key] = buffer.to(device)
    for parameter in skeleton.parameters():
        parameter.requires_grad_(False)
    return skeleton.eval()


def tied_groups(module) -> List[Tuple[str, ...]]:
    """The module's parameter names grouped by the tensor they share (a tied embedding and
    head form one group, in registration order; an untied parameter is a group of one)."""
    groups: Dict[int, List[str]] = {}
    for name, parameter in module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(parameter), []).append(name)
    return [tuple(group) for group in groups.values()]


def tied_aliases(module, names: Sequence[str]) -> set:
    """Names in ``names`` that another name of the same tied group, earlier in the group, also
    covers: a checkpoint that stores a tied head beside its embedding merges the tensor once,
    as the embedding (``functional_call`` refuses two values for one tied tensor)."""
    present, aliases = set(names), set()
    for group in tied_groups(module):
        stored = [name for name in group if name in present]
        aliases.update(stored[1:])
    return aliases


class MergedModel:
    """The merged weights as a differentiable function of masks and coefficients, run through one
    float32 copy of the architecture (``torch.func.functional_call``).

    With ``gradient_checkpointing`` (and gradients on), each decoder layer builds its own merged
    weights inside ``torch.utils.checkpoint`` (non-reentrant): neither those weights, the
    products that build them, nor the layer's activations are kept for the backward pass,
    which rebuilds them one layer at a time. The loss and gradients are the same.
    """

    def __init__(self, skeleton, entries: List[Entry], coefficients: torch.nn.Parameter, *, coefficients_only: bool = False, gradient_checkpointing: bool = False):
        self.skeleton = skeleton
        self.entries = entries
        self.coefficients = coefficients
        self.coefficients_only = coefficients_only
        self.gradient_checkpointing = gradient_checkpointing
        self.layer_builds = 0  # decoder layers whose weights were built under checkpointing (tests)
        self._module_keys = set(skeleton.state_dict().keys()) - tied_aliases(skeleton, [entry.name for entry in entries])

    def parameters(self) -> List[torch.nn.Parameter]:
        if self.coefficients_only:
            return [self.coefficients]
        return [self.coefficients] + [entry.logits for entry in self.entries if entry.logits is not None]

    def _weight(self, entry: Entry) -> torch.Tensor:
        column = self.coefficients[:, entry.column]
        if entry.factors is not None:
            left, sigma, right = entry.factors
            logits = entry.logits.detach() if self.coefficients_only else entry.logits
            mask = straight_through_mask(logits, MASK_TEMPERATURE)
            return merge_components(entry.origin, left.to(sigma.dtype), sigma, right.to(sigma.dtype), *entry.slots, mask, column)
        tasks = entry.vectors.shape[0]  # iso_cts' common row has no part in non-matrix tensors
        return merge_other(entry.origin, entry.vectors.to(entry.origin.dtype), column[:tasks])

    def weights(self, skip=frozenset()) -> Dict[str, torch.Tensor]:
        # A tensor in the checkpoint but not in the module keeps its prior coefficient.
        return {entry.name: self._weight(entry) for entry in self.entries if entry.name in self._module_keys and entry.name not in skip}

    def _decoder_layers(self) -> Dict[str, List[Entry]]:
        """The entries of each decoder layer (a child of the model's largest ModuleList), by the layer's module name."""
        lists = [(name, module) for name, module in self.skeleton.named_modules() if isinstance(module, torch.nn.ModuleList)]
        if not lists:
            return {}
        prefix, blocks = max(lists, key=lambda item: len(item[1]))
        layers: Dict[str, List[Entry]] = {f"{prefix}.{index}": [] for index in range(len(blocks))}
        for entry in self.entries:
            if entry.name in self._module_keys:
                head = entry.name[len(prefix) + 1 :].split(".", 1)[0] if entry.name.startswith(prefix + ".") else None
                if head is not None and f"{prefix}.{head}" in layers:
                    layers[f"{prefix}.{head}"].append(entry)
        return layers

    def _checkpointed_logits(self, ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        from torch.nn.utils.stateless import _reparametrize_module
        from torch.utils.checkpoint import checkpoint

        layers = self._decoder_layers()
        inside = {entry.name for entries in layers.values() for entry in entries}
        installed = []
        for layer_name, entries in layers.items():
            layer = self.skeleton.get_submodule(layer_name)
            original = layer.forward
            local = [(entry.name[len(layer_name) + 1 :], entry) for entry in entries]

            def forward(*args, _layer=layer, _original=original, _local=local, **kwargs):
                def build_and_run():
                    # Runs again in the backward pass: the weights are rebuilt, not stored.
                    self.layer_builds += 1
                    weights = {name: self._weight(entry) for name, entry in _local}
                    with _reparametrize_module(_layer, weights):
                        return _original(*args, **kwargs)

                return checkpoint(build_and_run, use_reentrant=False)

            layer.forward = forward
            installed.append(layer)
        try:
            output = torch.func.functional_call(
                self.skeleton, self.weights(skip=inside), args=(),
                kwargs={"input_ids": ids, "attention_mask": attention, "use_cache": False},
            )  # fmt: skip
        finally:
            for layer in installed:
                del layer.forward  # back to the class's forward
        return output.logits

    def hard_weights(self) -> Dict[str, torch.Tensor]:
        """The merged weights now (hard masks), detached: what the learned file would give."""
        with torch.no_grad():
            return {name: tensor.detach() for name, tensor in self.weights().items()}

    def logits(self, ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._checkpointed_logits(ids, attention)
        output = torch.func.functional_call(self.skeleton, self.weights(), args=(), kwargs={"input_ids": ids, "attention_mask": attention})
        return output.logits

    def forward_with(self, weights: Dict[str, torch.Tensor]):
        """``forward(ids, cache)`` for ``greedy_answers`` with fixed ``weights``."""
        keyword = cache_keyword(self.skeleton)
        return lambda ids, cache: torch.func.functional_call(
            self.skeleton, weights, args=(), kwargs={"input_ids": ids, keyword: cache, "use_cache": True}
        )

    def greedy(self, prompts: Sequence[Sequence[int]], stop_ids, max_new_tokens: int, device) -> List[Answered]:
        return greedy_answers(self.forward_with(self.hard_weights()), prompts, stop_ids, max_new_tokens, device)


def learner_bytes(model: MergedModel) -> Dict[str, int]:
    """What the learner holds between steps, by part (bytes): the float32 origin, the factors
    (U, s, V of the band), the non-matrix task vectors and the architecture it runs."""
    def size(tensor):
        return tensor.numel() * tensor.element_size()

    parts = {"origin": 0, "factors": 0, "other_task_vectors": 0}
    for entry in model.entries:
        parts["origin"] += size(entry.origin)
        if entry.factors is not None:
            parts["factors"] += sum(size(part) for part in entry.factors)
        if entry.vectors is not None:
            parts["other_task_vectors"] += size(entry.vectors)
    parts["architecture"] = sum(size(tensor) for tensor in model.skeleton.state_dict().values() if not tensor.is_meta)
    parts["model_float32"] = sum(entry.origin.numel() * 4 for entry in model.entries)
    return parts
