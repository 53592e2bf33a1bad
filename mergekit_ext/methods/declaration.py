"""How this package declares a mergekit method: a kernel plus a parameter table.

``declare`` builds a mergekit method from a kernel and a parameter list, the
way mergekit's own ``GeneralizedTaskArithmeticMerge`` does (a parameter called
``lambda`` cannot be a Python argument name, so the decorator cannot be used).
Parameters validate when mergekit plans the merge, before any tensor is
written, and their errors name the method and the parameter.

This module imports mergekit only inside its functions: registration runs right
after ``mergekit.merge_methods`` loads and needs this module whole, so this module
must never be the one that is half-imported at that moment (see ``registry``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional, Sequence, Tuple

import torch
from pydantic import BeforeValidator, Field, ValidationError
from typing_extensions import Annotated

if TYPE_CHECKING:
    from mergekit.merge_methods.base import BasePolicy, MergeMethod, TensorGroup

# mergekit's ParameterScope values (a str enum): one value for all models, or one per model.
SHARED = "shared"
PER_MODEL = "non_base"


def _refuse_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("expected a number, not a boolean")
    return value


def real(**bounds: Any) -> Any:
    """A float parameter type with pydantic bounds (ge, gt, le, lt); booleans refused.

    NaN and ±inf are refused unless a method passes ``allow_inf_nan=True``: a
    non-finite coefficient turns the whole merged model into NaN.
    """
    bounds.setdefault("allow_inf_nan", False)
    return Annotated[float, BeforeValidator(_refuse_bool), Field(**bounds)]


def integer(**bounds: int) -> Any:
    """An int parameter type with pydantic bounds; booleans and fractions refused."""
    return Annotated[int, BeforeValidator(_refuse_bool), Field(**bounds)]


@functools.lru_cache(maxsize=None)
def _parameter_type() -> type:
    """mergekit's ``ParameterSpec`` whose validation errors name the method and the parameter."""
    from mergekit.merge_methods.base import ParameterSpec

    @dataclass(frozen=True)
    class Parameter(ParameterSpec):
        method: str = ""

        def validate(self, value: Any) -> Any:
            try:
                return super().validate(value)
            except ValidationError as error:
                reasons = "; ".join(item["msg"] for item in error.errors())
                raise ValueError(
                    f"{self.method}: invalid value {value!r} for parameter '{self.name}': {reasons}"
                    f" (valid: {describe_range(self.value_type)})"
                ) from None

    return Parameter


def describe_range(value_type: Any) -> str:
    """A parameter type's valid values in words, e.g. 'a finite number > 0 and <= 1'."""
    import annotated_types

    metadata = getattr(value_type, "__metadata__", ())
    base = getattr(value_type, "__origin__", value_type)
    words = {float: "a finite number", int: "an integer", bool: "true or false", str: "a string"}
    text = words.get(base, getattr(base, "__name__", str(base)))
    if base is float and any(getattr(item, "allow_inf_nan", None) is True for item in _field_metadata(metadata)):
        text = "a number"
    bounds = []
    for item in _field_metadata(metadata):
        for cls, attribute, symbol in (
            (annotated_types.Gt, "gt", ">"),
            (annotated_types.Ge, "ge", ">="),
            (annotated_types.Lt, "lt", "<"),
            (annotated_types.Le, "le", "<="),
        ):
            if isinstance(item, cls):
                bounds.append(f"{symbol} {getattr(item, attribute)}")
    if str(value_type).startswith("typing.Literal"):
        return "one of " + ", ".join(map(str, value_type.__args__))
    return text + (" " + " and ".join(bounds) if bounds else "")


def _field_metadata(metadata) -> list:
    """Flatten pydantic ``Field`` infos into their constraint objects."""
    items = []
    for item in metadata:
        items.append(item)
        items.extend(getattr(item, "metadata", []) or [])
    return items


def _guard_finite(kernel: Callable[..., torch.Tensor], method: str) -> Callable[..., torch.Tensor]:
    """Wrap a kernel: refuse non-finite inputs (naming model and tensor) and never return a non-finite result.

    The group's tensors are in memory already, so the check is one extra pass over them.
    """

    def guarded(group: TensorGroup, **parameters: Any) -> torch.Tensor:
        name = group.metadata.name or "?"
        for entry in group.entries:
            tensor = entry.tensor
            if tensor.is_floating_point() and tensor.numel() and not bool(torch.isfinite(tensor).all()):
                role = "base model" if entry.is_base else "model"
                raise ValueError(f"{method}: tensor {name} of {role} {entry.id} holds NaN or Inf; refusing to merge it")
        result = kernel(group, **parameters)
        if result.is_floating_point() and result.numel() and not bool(torch.isfinite(result).all()):
            raise ValueError(
                f"{method}: the merged tensor {name} is not finite (NaN/Inf; overflow in {result.dtype}?); nothing was merged"
            )
        return result

    guarded.__name__ = getattr(kernel, "__name__", "kernel")
    guarded.__doc__ = kernel.__doc__
    return guarded


def declare(
    kernel: Callable[..., torch.Tensor],
    *,
    name: str,
    pretty_name: str,
    reference_url: str,
    parameters: Sequence[Tuple[str, Any, str, Any, str]],
    base: Optional[BasePolicy] = None,
) -> MergeMethod:
    """A mergekit method calling ``kernel(group, **parameters)`` once per tensor.

    ``parameters`` rows are (name, type, scope, default, description), the scope
    ``SHARED`` or ``PER_MODEL``; ``base`` defaults to ``BasePolicy.REQUIRED``.
    """
    from mergekit.merge_methods.base import (
        BasePolicy,
        FunctionalGroupMergeMethod,
        InputContract,
        MergeMethodSpec,
        ParameterScope,
    )

    parameter_type = _parameter_type()
    spec = MergeMethodSpec(
        name=name,
        pretty_name=pretty_name,
        reference_url=reference_url,
        contract=InputContract(base=BasePolicy.REQUIRED if base is None else base, min_non_base=1),
        parameters=tuple(
            parameter_type(
                name=param_name,
                value_type=value_type,
                scope=ParameterScope(scope),
                default=default,
                description=description,
                method=name,
            )
            for param_name, value_type, scope, default, description in parameters
        ),
    )
    return FunctionalGroupMergeMethod(spec, _guard_finite(kernel, name))


def register(methods: Iterable[MergeMethod]) -> None:
    """Make ``methods`` available to mergekit by name, through mergekit's public ``register``.

    Each ``method.py`` calls this once, as its last statement; mergekit refuses a
    name that is already taken.
    """
    from mergekit.merge_methods import register as mergekit_register

    for method in methods:
        mergekit_register(method)
