"""How this package declares a mergekit method: a kernel plus a parameter table.

``declare`` builds a mergekit method from a kernel and a parameter list, the
way mergekit's own ``GeneralizedTaskArithmeticMerge`` does (a parameter called
``lambda`` cannot be a Python argument name, so the decorator cannot be used).
Parameters validate when mergekit plans the merge, before any tensor is
written, and their errors name the method and the parameter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence, Tuple

import torch
from mergekit.merge_methods.base import (
    BasePolicy,
    FunctionalGroupMergeMethod,
    InputContract,
    MergeMethod,
    MergeMethodSpec,
    ParameterScope,
    ParameterSpec,
)
from pydantic import BeforeValidator, Field, ValidationError
from typing_extensions import Annotated

SHARED = ParameterScope.SHARED
PER_MODEL = ParameterScope.NON_BASE


def _refuse_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("expected a number, not a boolean")
    return value


def real(**bounds: float) -> Any:
    """A float parameter type with pydantic bounds (ge, gt, le, lt); booleans refused."""
    return Annotated[float, BeforeValidator(_refuse_bool), Field(**bounds)]


def integer(**bounds: int) -> Any:
    """An int parameter type with pydantic bounds; booleans and fractions refused."""
    return Annotated[int, BeforeValidator(_refuse_bool), Field(**bounds)]


@dataclass(frozen=True)
class Parameter(ParameterSpec):
    """A mergekit parameter whose validation errors say which method and parameter."""

    method: str = ""

    def validate(self, value: Any) -> Any:
        try:
            return super().validate(value)
        except ValidationError as error:
            reasons = "; ".join(item["msg"] for item in error.errors())
            raise ValueError(
                f"{self.method}: invalid value {value!r} for parameter '{self.name}': {reasons}"
            ) from None


def declare(
    kernel: Callable[..., torch.Tensor],
    *,
    name: str,
    pretty_name: str,
    reference_url: str,
    parameters: Sequence[Tuple[str, Any, ParameterScope, Any, str]],
    base: BasePolicy = BasePolicy.REQUIRED,
) -> MergeMethod:
    """A mergekit method calling ``kernel(group, **parameters)`` once per tensor.

    ``parameters`` rows are (name, type, scope, default, description).
    """
    spec = MergeMethodSpec(
        name=name,
        pretty_name=pretty_name,
        reference_url=reference_url,
        contract=InputContract(base=base, min_non_base=1),
        parameters=tuple(
            Parameter(
                name=param_name,
                value_type=value_type,
                scope=scope,
                default=default,
                description=description,
                method=name,
            )
            for param_name, value_type, scope, default, description in parameters
        ),
    )
    return FunctionalGroupMergeMethod(spec, kernel)
