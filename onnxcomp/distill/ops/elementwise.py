"""Elementwise ops: arithmetic, comparisons, logic, bitwise, activations.

Integer arithmetic keeps ONNX's semantics (truncating division, the divisor's sign for
``Mod``); uint16/32/64, which torch has few kernels for, run in int64 and are cast back.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from onnxcomp.distill.ops._common import (
    Attrs,
    Inputs,
    OpFn,
    Tensor,
    binary,
    float_attr,
    unary,
    widened,
)


def _div(inputs: Inputs, attrs: Attrs) -> Tensor:
    a, b = inputs[0], inputs[1]
    if a.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc").to(a.dtype)


def _pow(inputs: Inputs, attrs: Attrs) -> Tensor:
    return torch.pow(inputs[0], inputs[1]).to(inputs[0].dtype)


def _mod(inputs: Inputs, attrs: Attrs) -> Tensor:
    if attrs.get("fmod", 0):
        return torch.fmod(inputs[0], inputs[1])
    return torch.remainder(inputs[0], inputs[1])


def _clip(inputs: Inputs, attrs: Attrs) -> Tensor:
    x = inputs[0]
    low = inputs[1] if len(inputs) > 1 else None
    high = inputs[2] if len(inputs) > 2 else None
    if "min" in attrs:
        low = torch.tensor(attrs["min"], dtype=x.dtype, device=x.device)
    if "max" in attrs:
        high = torch.tensor(attrs["max"], dtype=x.dtype, device=x.device)
    if low is not None:
        x = torch.maximum(x, low.to(x.dtype))
    if high is not None:
        x = torch.minimum(x, high.to(x.dtype))
    return x


def _hard_sigmoid(inputs: Inputs, attrs: Attrs) -> Tensor:
    alpha, beta = float_attr(attrs, "alpha", 0.2), float_attr(attrs, "beta", 0.5)
    return torch.clamp(inputs[0] * alpha + beta, 0.0, 1.0)


def _gelu(inputs: Inputs, attrs: Attrs) -> Tensor:
    return F.gelu(inputs[0], approximate=attrs.get("approximate", "none"))


def _shrink(inputs: Inputs, attrs: Attrs) -> Tensor:
    x = inputs[0]
    lambd, bias = float_attr(attrs, "lambd", 0.5), float_attr(attrs, "bias", 0.0)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    y = torch.where(x < -lambd, x + bias, torch.where(x > lambd, x - bias, zero))
    return y.to(x.dtype)


def _bit_shift(inputs: Inputs, attrs: Attrs) -> Tensor:
    x, y = inputs[0], inputs[1]
    if attrs.get("direction") == "LEFT":
        return torch.bitwise_left_shift(x, y)
    return torch.bitwise_right_shift(x, y)


def _variadic(fn: Callable[[Tensor, Tensor], Tensor]) -> OpFn:
    def apply(inputs: Inputs, attrs: Attrs) -> Tensor:
        out = inputs[0]
        for x in inputs[1:]:
            out = fn(out, x)
        return out

    return apply


def _mean(inputs: Inputs, attrs: Attrs) -> Tensor:
    return _variadic(torch.add)(inputs, attrs) / len(inputs)


def _selu(inputs: Inputs, attrs: Attrs) -> Tensor:
    x = inputs[0]
    alpha = float_attr(attrs, "alpha", 1.6732632423543772)
    gamma = float_attr(attrs, "gamma", 1.0507009873554805)
    return gamma * torch.where(x > 0, x, alpha * torch.expm1(x))


def _is_inf(inputs: Inputs, attrs: Attrs) -> Tensor:
    x = inputs[0]
    return (torch.isposinf(x) & bool(attrs.get("detect_positive", 1))) | (
        torch.isneginf(x) & bool(attrs.get("detect_negative", 1))
    )


ELEMENTWISE: dict[str, OpFn] = {
    "Identity": unary(lambda x: x),
    "Relu": unary(F.relu),
    "Sigmoid": unary(torch.sigmoid),
    "Tanh": unary(torch.tanh),
    "Erf": unary(torch.erf),
    "Exp": unary(torch.exp),
    "Log": unary(torch.log),
    "Sqrt": unary(torch.sqrt),
    "Reciprocal": unary(torch.reciprocal),
    "Floor": unary(torch.floor),
    "Ceil": unary(torch.ceil),
    "Round": unary(torch.round),  # half to even, as ONNX
    "Sin": unary(torch.sin),
    "Cos": unary(torch.cos),
    "Tan": unary(torch.tan),
    "Asin": unary(torch.asin),
    "Acos": unary(torch.acos),
    "Atan": unary(torch.atan),
    "Sinh": unary(torch.sinh),
    "Cosh": unary(torch.cosh),
    "Asinh": unary(torch.asinh),
    "Acosh": unary(torch.acosh),
    "Atanh": unary(torch.atanh),
    "Not": unary(torch.logical_not),
    "IsNaN": unary(torch.isnan),
    "IsInf": _is_inf,
    "Softplus": unary(F.softplus),
    "Softsign": unary(F.softsign),
    "Mish": unary(F.mish),
    "HardSwish": unary(F.hardswish),
    "HardSigmoid": _hard_sigmoid,
    "LeakyRelu": lambda i, a: F.leaky_relu(i[0], float_attr(a, "alpha", 0.01)),
    "Elu": lambda i, a: F.elu(i[0], float_attr(a, "alpha", 1.0)),
    "Celu": lambda i, a: F.celu(i[0], float_attr(a, "alpha", 1.0)),
    "Selu": _selu,
    "ThresholdedRelu": lambda i, a: torch.where(
        i[0] > float_attr(a, "alpha", 1.0), i[0], torch.zeros((), dtype=i[0].dtype)
    ),
    "Swish": lambda i, a: i[0] * torch.sigmoid(float_attr(a, "alpha", 1.0) * i[0]),
    "Shrink": _shrink,
    "PRelu": lambda i, a: torch.where(i[0] >= 0, i[0], i[0] * i[1]),
    "Gelu": _gelu,
    "Where": lambda i, a: torch.where(i[0].bool(), i[1], i[2]),
    "And": binary(torch.logical_and),
    "Or": binary(torch.logical_or),
    "Xor": binary(torch.logical_xor),
}

# Ops that also take integer tensors: they run widened for uint16/32/64.
INTEGER_ELEMENTWISE: dict[str, OpFn] = {
    "Neg": unary(torch.neg),
    "Abs": unary(torch.abs),
    "Sign": unary(torch.sign),
    "Clip": _clip,
    "Add": binary(torch.add),
    "Sub": binary(torch.sub),
    "Mul": binary(torch.mul),
    "Div": _div,
    "Pow": _pow,
    "Mod": _mod,
    "Equal": binary(torch.eq),
    "Less": binary(torch.lt),
    "LessOrEqual": binary(torch.le),
    "Greater": binary(torch.gt),
    "GreaterOrEqual": binary(torch.ge),
    "Max": _variadic(torch.maximum),
    "Min": _variadic(torch.minimum),
    "Sum": _variadic(torch.add),
    "Mean": _mean,
    "BitShift": _bit_shift,
    "BitwiseAnd": binary(torch.bitwise_and),
    "BitwiseOr": binary(torch.bitwise_or),
    "BitwiseXor": binary(torch.bitwise_xor),
    "BitwiseNot": unary(torch.bitwise_not),
}

OPS: dict[str, OpFn] = {
    **ELEMENTWISE,
    **{name: widened(fn) for name, fn in INTEGER_ELEMENTWISE.items()},
}
