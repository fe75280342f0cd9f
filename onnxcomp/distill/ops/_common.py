"""What every op family shares: the op signature, ONNX dtypes in torch, attribute readers."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

Tensor = torch.Tensor
Inputs = Sequence[Tensor | None]
Attrs = Mapping[str, Any]
OpFn = Callable[[Inputs, Attrs], Tensor | tuple[Tensor, ...]]

# ONNX TensorProto.DataType -> torch dtype; 4- and 2-bit integers are held unpacked, in 8 bits.
TORCH_DTYPES: dict[int, torch.dtype] = {
    1: torch.float32, 2: torch.uint8, 3: torch.int8, 4: torch.uint16, 5: torch.int16,
    6: torch.int32, 7: torch.int64, 9: torch.bool, 10: torch.float16, 11: torch.float64,
    12: torch.uint32, 13: torch.uint64, 16: torch.bfloat16, 17: torch.float8_e4m3fn,
    18: torch.float8_e4m3fnuz, 19: torch.float8_e5m2, 20: torch.float8_e5m2fnuz,
    21: torch.uint8, 22: torch.int8, 25: torch.uint8, 26: torch.int8,
}  # fmt: skip
# Sub-byte ONNX types held in 8 bits: (low, high) of the values they can hold.
NARROW_RANGES: dict[int, tuple[int, int]] = {21: (0, 15), 22: (-8, 7), 25: (0, 3), 26: (-2, 1)}
FLOAT8 = frozenset(
    {torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.float8_e5m2, torch.float8_e5m2fnuz}
)
# torch has few kernels for these: arithmetic on them runs in int64 and is cast back.
WIDE_UNSIGNED = frozenset({torch.uint16, torch.uint32, torch.uint64})


def ints(t: Tensor | None) -> list[int] | None:
    """A 0-d or 1-d integer tensor as a list of Python ints (None stays None)."""
    return None if t is None else [int(v) for v in t.reshape(-1).tolist()]


def axis_of(axis: int, rank: int) -> int:
    """A possibly negative axis as a non-negative one."""
    return axis + rank if axis < 0 else axis


def axes_of(inputs: Inputs, attrs: Attrs, index: int) -> list[int] | None:
    """Axes from the attribute (older opsets) or from input ``index`` (newer); None if absent."""
    if "axes" in attrs:
        return list(attrs["axes"])
    return ints(inputs[index]) if len(inputs) > index else None


def optional(inputs: Inputs, index: int) -> Tensor | None:
    """Input ``index``, or None when the node has fewer inputs or leaves it empty."""
    return inputs[index] if len(inputs) > index else None


def unary(fn: Callable[[Tensor], Tensor]) -> OpFn:
    return lambda inputs, attrs: fn(inputs[0])


def binary(fn: Callable[[Tensor, Tensor], Tensor]) -> OpFn:
    return lambda inputs, attrs: fn(inputs[0], inputs[1])


def widened(fn: OpFn) -> OpFn:
    """``fn`` that also runs on uint16/32/64 tensors (computed in int64, cast back)."""

    def apply(inputs: Inputs, attrs: Attrs) -> Tensor | tuple[Tensor, ...]:
        wide = next((x.dtype for x in inputs if x is not None and x.dtype in WIDE_UNSIGNED), None)
        if wide is None:
            return fn(inputs, attrs)
        out = fn([x.to(torch.int64) if x is not None and x.dtype == wide else x for x in inputs],
                 attrs)  # fmt: skip
        if isinstance(out, tuple):
            return tuple(o.to(wide) if o.dtype == torch.int64 else o for o in out)
        return out.to(wide) if out.dtype == torch.int64 else out

    return apply


def lowest(dtype: torch.dtype) -> float | int:
    """The smallest value of ``dtype`` (-inf for floats): the identity of max."""
    if dtype.is_floating_point:
        return -float("inf")
    if dtype == torch.bool:
        return False
    return torch.iinfo(dtype).min


def highest(dtype: torch.dtype) -> float | int:
    """The largest value of ``dtype`` (+inf for floats): the identity of min."""
    if dtype.is_floating_point:
        return float("inf")
    if dtype == torch.bool:
        return True
    return torch.iinfo(dtype).max


def float_attr(attrs: Attrs, name: str, default: float) -> float:
    value = attrs.get(name)
    return default if value is None else float(value)


def sequence_attr(attrs: Attrs, name: str, default: Sequence[Any]) -> list[Any]:
    value = attrs.get(name)
    return list(default) if not value else list(value)


__all__ = [
    "FLOAT8",
    "NARROW_RANGES",
    "TORCH_DTYPES",
    "WIDE_UNSIGNED",
    "Attrs",
    "Inputs",
    "OpFn",
    "Tensor",
    "axes_of",
    "axis_of",
    "binary",
    "float_attr",
    "highest",
    "ints",
    "lowest",
    "optional",
    "sequence_attr",
    "unary",
    "widened",
]
