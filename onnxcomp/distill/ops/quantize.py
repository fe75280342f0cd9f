"""Quantisation ops: Quantize/DequantizeLinear (straight-through in training), dynamic
quantisation, and the integer ops (MatMulInteger, ConvInteger, QLinearMatMul, QLinearConv).

QuantizeLinear's codes stay in a float tensor, rounded with a straight-through estimator,
where only DequantizeLinear reads them, so gradients reach the activations of a statically
quantised model; where anything else reads them (or they are a graph output) they are cast
to the integer type, as ONNX says. The integer ops pass values through without gradient:
their operands are integer codes. Integer accumulation runs in float64, exact for the 8-bit
products and sums ONNX Runtime supports.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from onnxcomp.distill.ops._common import (
    FLOAT8,
    TORCH_DTYPES,
    Attrs,
    Inputs,
    OpFn,
    Tensor,
    axis_of,
    optional,
)
from onnxcomp.distill.ops.nn import _conv
from onnxcomp.distill.ops.tensor import cast


def expand_param(param: Tensor, shape: Sequence[int], axis: int | None, block_size: int) -> Tensor:
    """Broadcast a per-tensor / per-axis / per-block quantisation parameter to ``shape``."""
    if axis is None or param.dim() == 0 or (param.numel() == 1 and block_size == 0):
        return param.reshape(())
    if block_size == 0:
        view = [1] * len(shape)
        view[axis] = shape[axis]
        return param.reshape(view)
    return param.repeat_interleave(block_size, dim=axis).narrow(axis, 0, shape[axis])


def _qdq_layout(x: Tensor, scale: Tensor, attrs: Attrs) -> tuple[int | None, int]:
    if scale.dim() == 0 or (scale.numel() == 1 and not attrs.get("block_size", 0)):
        return None, 0
    return axis_of(attrs.get("axis", 1), x.dim()), attrs.get("block_size", 0)


def _dequantize(inputs: Inputs, attrs: Attrs) -> Tensor:
    x, scale, zero_point = inputs[0], inputs[1], optional(inputs, 2)
    axis, block = _qdq_layout(x, scale, attrs)
    work = torch.float32 if x.dtype in FLOAT8 or not x.is_floating_point() else scale.dtype
    centred = x.to(work)
    if zero_point is not None:
        centred = centred - expand_param(zero_point.to(work), x.shape, axis, block)
    y = centred * expand_param(scale, x.shape, axis, block).to(work)
    out = attrs.get("output_dtype")
    return y.to(TORCH_DTYPES[out] if out else scale.dtype)


def _quantize(inputs: Inputs, attrs: Attrs) -> Tensor:
    x, scale, zero_point = inputs[0], inputs[1], optional(inputs, 2)
    axis, block = _qdq_layout(x, scale, attrs)
    target = attrs["_qtype"]  # the ONNX type of the codes
    scaled = x / expand_param(scale, x.shape, axis, block).to(x.dtype)
    if TORCH_DTYPES[target] in FLOAT8:
        if zero_point is not None:
            scaled = scaled + expand_param(zero_point.to(x.dtype), x.shape, axis, block)
        return cast(scaled, target, bool(attrs.get("saturate", 1)))
    rounded = scaled + (torch.round(scaled) - scaled).detach()
    if zero_point is not None:
        rounded = rounded + expand_param(zero_point.to(x.dtype), x.shape, axis, block)
    qmin, qmax = attrs["_qrange"]
    codes = torch.clamp(rounded, qmin, qmax)
    return codes.to(TORCH_DTYPES[target]) if attrs.get("_codes") else codes


def _dynamic_quantize(inputs: Inputs, attrs: Attrs) -> tuple[Tensor, Tensor, Tensor]:
    x = inputs[0].detach()
    low = torch.clamp(x.min(), max=0.0)
    high = torch.clamp(x.max(), min=0.0)
    scale = (high - low) / 255.0
    zero_point = torch.clamp(torch.round(-low / scale), 0, 255)
    codes = torch.clamp(torch.round(x / scale) + zero_point, 0, 255)
    return codes.to(torch.uint8), scale, zero_point.to(torch.uint8)


def _centred(x: Tensor, zero_point: Tensor | None, axis: int) -> Tensor:
    """Codes minus their zero point (per tensor, or per slice along ``axis``), in float64."""
    x = x.to(torch.float64)
    if zero_point is None:
        return x
    zero_point = zero_point.to(torch.float64)
    if zero_point.numel() > 1:
        view = [1] * x.dim()
        view[axis] = -1
        zero_point = zero_point.reshape(view)
    return x - zero_point


def _per_axis(param: Tensor, rank: int, axis: int) -> Tensor:
    if param.numel() == 1:
        return param.reshape(()).to(torch.float64)
    view = [1] * rank
    view[axis] = -1
    return param.to(torch.float64).reshape(view)


def _requantize(accumulated: Tensor, multiplier: Tensor, zero_point: Tensor | None,
                dtype: torch.dtype) -> Tensor:  # fmt: skip
    y = accumulated * multiplier
    if zero_point is not None:
        y = y + zero_point.to(torch.float64)
    info = torch.iinfo(dtype)
    return torch.clamp(torch.round(y), info.min, info.max).to(dtype)


def _matmul_integer(inputs: Inputs, attrs: Attrs) -> Tensor:
    a, b = inputs[0], inputs[1]
    a = _centred(a, optional(inputs, 2), a.dim() - 2)
    b = _centred(b, optional(inputs, 3), b.dim() - 1)
    return torch.matmul(a, b).to(torch.int32)


def _qlinear_matmul(inputs: Inputs, attrs: Attrs) -> Tensor:
    a, a_scale, a_zp, b, b_scale, b_zp, y_scale, y_zp = inputs[:8]
    accumulated = torch.matmul(_centred(a, a_zp, a.dim() - 2), _centred(b, b_zp, b.dim() - 1))
    rank = accumulated.dim()
    multiplier = (
        _per_axis(a_scale, rank, rank - 2) * _per_axis(b_scale, rank, rank - 1)
    ) / y_scale.to(torch.float64)
    dtype = y_zp.dtype if y_zp is not None else a.dtype
    return _requantize(accumulated, multiplier, y_zp, dtype)


def _conv_integer(inputs: Inputs, attrs: Attrs) -> Tensor:
    x, w = inputs[0], inputs[1]
    x = _centred(x, optional(inputs, 2), 1)
    w = _centred(w, optional(inputs, 3), 0)
    return _conv([x, w], attrs).to(torch.int32)


def _qlinear_conv(inputs: Inputs, attrs: Attrs) -> Tensor:
    x, x_scale, x_zp, w, w_scale, w_zp, y_scale, y_zp = inputs[:8]
    bias = optional(inputs, 8)
    accumulated = _conv(
        [_centred(x, x_zp, 1), _centred(w, w_zp, 0), None if bias is None else bias.double()],
        attrs,
    )
    multiplier = (
        x_scale.to(torch.float64).reshape(()) * _per_axis(w_scale, accumulated.dim(), 1)
    ) / y_scale.to(torch.float64)
    dtype = y_zp.dtype if y_zp is not None else x.dtype
    return _requantize(accumulated, multiplier, y_zp, dtype)


OPS: dict[str, OpFn] = {
    "DequantizeLinear": _dequantize,
    "QuantizeLinear": _quantize,
    "DynamicQuantizeLinear": _dynamic_quantize,
    "MatMulInteger": _matmul_integer,
    "ConvInteger": _conv_integer,
    "QLinearMatMul": _qlinear_matmul,
    "QLinearConv": _qlinear_conv,
}
