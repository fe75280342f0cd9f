"""ONNX operators as small torch functions: the op table :class:`OnnxModule` interprets with.

Each entry of :data:`OPS` takes the node's inputs (torch tensors, ``None`` for an omitted
optional input) and its attributes (plain Python values; tensors as torch tensors; ``_opset``
the model's default-domain opset, ``_outputs`` the node's output count, plus what the module
prepared for the op, such as ``_qrange``) and returns a tensor or a tuple of tensors.
Semantics follow the ONNX spec as ONNX Runtime implements it, in every opset since 11 (older
attribute forms of Slice, Squeeze, Unsqueeze, Split, Clip and the reductions are read too).
Shape computations run on tensors, so dynamic batch and sequence dimensions work; integer
tensors keep ONNX's int64 semantics.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
Inputs = Sequence[Tensor | None]
Attrs = Mapping[str, Any]
OpFn = Callable[[Inputs, Attrs], Tensor | tuple[Tensor, ...]]

# ONNX TensorProto.DataType -> torch dtype; 4- and 2-bit integers are held unpacked, in 8 bits.
TORCH_DTYPES: dict[int, torch.dtype] = {
    1: torch.float32, 2: torch.uint8, 3: torch.int8, 4: torch.uint16, 5: torch.int16,
    6: torch.int32, 7: torch.int64, 9: torch.bool, 10: torch.float16, 11: torch.float64,
    12: torch.uint32, 13: torch.uint64, 16: torch.bfloat16, 21: torch.uint8, 22: torch.int8,
    25: torch.uint8, 26: torch.int8,
}  # fmt: skip


def _ints(t: Tensor | None) -> list[int] | None:
    return None if t is None else [int(v) for v in t.reshape(-1).tolist()]


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _axes(inputs: Inputs, attrs: Attrs, index: int) -> list[int] | None:
    """Axes from the attribute (older opsets) or from input ``index`` (newer); None if absent."""
    if "axes" in attrs:
        return list(attrs["axes"])
    return _ints(inputs[index]) if len(inputs) > index else None


# -- elementwise ----------------------------------------------------------------------------------


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
    alpha, beta = attrs.get("alpha", 0.2), attrs.get("beta", 0.5)
    return torch.clamp(inputs[0] * alpha + beta, 0.0, 1.0)


def _gelu(inputs: Inputs, attrs: Attrs) -> Tensor:
    return F.gelu(inputs[0], approximate=attrs.get("approximate", "none"))


def _variadic(fn: Callable[[Tensor, Tensor], Tensor]) -> OpFn:
    def apply(inputs: Inputs, attrs: Attrs) -> Tensor:
        out = inputs[0]
        for x in inputs[1:]:
            out = fn(out, x)
        return out

    return apply


def _unary(fn: Callable[[Tensor], Tensor]) -> OpFn:
    return lambda inputs, attrs: fn(inputs[0])


def _binary(fn: Callable[[Tensor, Tensor], Tensor]) -> OpFn:
    return lambda inputs, attrs: fn(inputs[0], inputs[1])


ELEMENTWISE: dict[str, OpFn] = {
    "Identity": _unary(lambda x: x),
    "Relu": _unary(F.relu),
    "Sigmoid": _unary(torch.sigmoid),
    "Tanh": _unary(torch.tanh),
    "Erf": _unary(torch.erf),
    "Exp": _unary(torch.exp),
    "Log": _unary(torch.log),
    "Sqrt": _unary(torch.sqrt),
    "Reciprocal": _unary(torch.reciprocal),
    "Neg": _unary(torch.neg),
    "Abs": _unary(torch.abs),
    "Floor": _unary(torch.floor),
    "Ceil": _unary(torch.ceil),
    "Round": _unary(torch.round),  # half to even, as ONNX
    "Sign": _unary(torch.sign),
    "Sin": _unary(torch.sin),
    "Cos": _unary(torch.cos),
    "Not": _unary(torch.logical_not),
    "IsNaN": _unary(torch.isnan),
    "Softplus": _unary(F.softplus),
    "Softsign": _unary(F.softsign),
    "Mish": _unary(F.mish),
    "HardSwish": _unary(F.hardswish),
    "HardSigmoid": _hard_sigmoid,
    "LeakyRelu": lambda i, a: F.leaky_relu(i[0], a.get("alpha", 0.01)),
    "Elu": lambda i, a: F.elu(i[0], a.get("alpha", 1.0)),
    "Selu": lambda i, a: (
        a.get("gamma", 1.0507009873554805)
        * torch.where(i[0] > 0, i[0], a.get("alpha", 1.6732632423543772) * torch.expm1(i[0]))
    ),
    "PRelu": lambda i, a: torch.where(i[0] >= 0, i[0], i[0] * i[1]),
    "Gelu": _gelu,
    "Clip": _clip,
    "IsInf": lambda i, a: (
        (torch.isposinf(i[0]) & bool(a.get("detect_positive", 1)))
        | (torch.isneginf(i[0]) & bool(a.get("detect_negative", 1)))
    ),
    "Add": _binary(torch.add),
    "Sub": _binary(torch.sub),
    "Mul": _binary(torch.mul),
    "Div": _div,
    "Pow": _pow,
    "Mod": _mod,
    "Equal": _binary(torch.eq),
    "Less": _binary(torch.lt),
    "LessOrEqual": _binary(torch.le),
    "Greater": _binary(torch.gt),
    "GreaterOrEqual": _binary(torch.ge),
    "And": _binary(torch.logical_and),
    "Or": _binary(torch.logical_or),
    "Xor": _binary(torch.logical_xor),
    "Where": lambda i, a: torch.where(i[0].bool(), i[1], i[2]),
    "Max": _variadic(torch.maximum),
    "Min": _variadic(torch.minimum),
    "Sum": _variadic(torch.add),
    "Mean": lambda i, a: _variadic(torch.add)(i, a) / len(i),
}


# -- shape and indexing ---------------------------------------------------------------------------


def _shape(inputs: Inputs, attrs: Attrs) -> Tensor:
    x = inputs[0]
    dims = list(x.shape)
    start, end = attrs.get("start", 0), attrs.get("end", len(dims))
    return torch.tensor(dims[start:end], dtype=torch.int64, device=x.device)


def _reshape(inputs: Inputs, attrs: Attrs) -> Tensor:
    x, shape = inputs[0], _ints(inputs[1])
    if "shape" in attrs:  # opset < 5
        shape = list(attrs["shape"])
    if not attrs.get("allowzero", 0):
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return x.reshape(shape)


def _flatten(inputs: Inputs, attrs: Attrs) -> Tensor:
    x = inputs[0]
    axis = _axis(attrs.get("axis", 1), x.dim())
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


def _squeeze(inputs: Inputs, attrs: Attrs) -> Tensor:
    x, axes = inputs[0], _axes(inputs, attrs, 1)
    if axes is None:
        return x.squeeze()
    return x.squeeze(tuple(_axis(a, x.dim()) for a in axes))


def _unsqueeze(inputs: Inputs, attrs: Attrs) -> Tensor:
    x, axes = inputs[0], _axes(inputs, attrs, 1)
    rank = x.dim() + len(axes)
    for axis in sorted(_axis(a, rank) for a in axes):
        x = x.unsqueeze(axis)
    return x


def _transpose(inputs: Inputs, attrs: Attrs) -> Tensor:
    x = inputs[0]
    perm = attrs.get("perm") or list(range(x.dim()))[::-1]
    return x.permute(*perm)


def _split(inputs: Inputs, attrs: Attrs) -> tuple[Tensor, ...]:
    x = inputs[0]
    axis = _axis(attrs.get("axis", 0), x.dim())
    count = attrs["_outputs"]
    sizes = attrs.get("split") or (_ints(inputs[1]) if len(inputs) > 1 else None)
    if sizes is None:
        sizes = -(-x.shape[axis] // attrs.get("num_outputs", count))
    return tuple(torch.split(x, sizes, dim=axis))


def _slice(inputs: Inputs, attrs: Attrs) -> Tensor:
    x = inputs[0]
    if "starts" in attrs:  # opset < 10
        starts, ends, axes, steps = attrs["starts"], attrs["ends"], attrs.get("axes"), None
    else:
        starts, ends = _ints(inputs[1]), _ints(inputs[2])
        axes = _ints(inputs[3]) if len(inputs) > 3 else None
        steps = _ints(inputs[4]) if len(inputs) > 4 else None
    axes = axes if axes is not None else list(range(len(starts)))
    steps = steps or [1] * len(starts)
    index: list[Any] = [slice(None)] * x.dim()
    reversed_axes = []
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        axis = _axis(axis, x.dim())
        dim = x.shape[axis]
        start = start + dim if start < 0 else start
        end = end + dim if end < 0 else end
        if step > 0:
            index[axis] = slice(min(max(start, 0), dim), min(max(end, 0), dim), step)
        else:
            start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
            picked = torch.arange(start, end, step, device=x.device)
            reversed_axes.append((axis, picked))
    x = x[tuple(index)]
    for axis, picked in reversed_axes:
        x = x.index_select(axis, picked)
    return x


def _gather(inputs: Inputs, attrs: Attrs) -> Tensor:
    data, indices = inputs[0], inputs[1].long()
    axis = _axis(attrs.get("axis", 0), data.dim())
    indices = torch.where(indices < 0, indices + data.shape[axis], indices)
    picked = data.index_select(axis, indices.reshape(-1))
    return picked.reshape((*data.shape[:axis], *indices.shape, *data.shape[axis + 1 :]))


def _gather_elements(inputs: Inputs, attrs: Attrs) -> Tensor:
    data, indices = inputs[0], inputs[1].long()
    axis = _axis(attrs.get("axis", 0), data.dim())
    indices = torch.where(indices < 0, indices + data.shape[axis], indices)
    return torch.gather(data, axis, indices)


def _expand(inputs: Inputs, attrs: Attrs) -> Tensor:
    x = inputs[0]
    return x.expand(torch.broadcast_shapes(x.shape, tuple(_ints(inputs[1]))))


def _tile(inputs: Inputs, attrs: Attrs) -> Tensor:
    return inputs[0].repeat(*_ints(inputs[1]))


def _constant_of_shape(inputs: Inputs, attrs: Attrs) -> Tensor:
    value = attrs.get("value")
    shape = _ints(inputs[0])
    if value is None:
        return torch.zeros(shape, dtype=torch.float32, device=inputs[0].device)
    return value.reshape(()).to(inputs[0].device).expand(shape).clone()


def _range(inputs: Inputs, attrs: Attrs) -> Tensor:
    start, limit, delta = inputs[0], inputs[1], inputs[2]
    return torch.arange(
        start.item(), limit.item(), delta.item(), dtype=start.dtype, device=start.device
    )


def _cast(inputs: Inputs, attrs: Attrs) -> Tensor:
    return inputs[0].to(TORCH_DTYPES[attrs["to"]])


def _pad(inputs: Inputs, attrs: Attrs) -> Tensor:
    x = inputs[0]
    pads = attrs.get("pads") or _ints(inputs[1])
    value = attrs.get("value", 0.0)
    if len(inputs) > 2 and inputs[2] is not None:
        value = inputs[2].item()
    axes = _ints(inputs[3]) if len(inputs) > 3 else None
    axes = [_axis(a, x.dim()) for a in axes] if axes is not None else list(range(x.dim()))
    begin, end = pads[: len(axes)], pads[len(axes) :]
    full = [0] * (2 * x.dim())
    for axis, b, e in zip(axes, begin, end, strict=True):
        full[2 * (x.dim() - 1 - axis)], full[2 * (x.dim() - 1 - axis) + 1] = b, e
    while len(full) > 2 and full[-2:] == [0, 0]:
        full = full[:-2]  # torch's non-constant modes pad only the trailing dims
    kind = _PAD_MODES[attrs.get("mode", "constant")]
    if kind == "constant":
        return F.pad(x, full, mode="constant", value=value)
    # torch pads the trailing dims of a batched tensor in these modes: add a batch axis
    return F.pad(x.unsqueeze(0), full, mode=kind).squeeze(0)


_PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}


def _trilu(inputs: Inputs, attrs: Attrs) -> Tensor:
    k = int(inputs[1].item()) if len(inputs) > 1 and inputs[1] is not None else 0
    return torch.triu(inputs[0], k) if attrs.get("upper", 1) else torch.tril(inputs[0], k)


def _cumsum(inputs: Inputs, attrs: Attrs) -> Tensor:
    x, axis = inputs[0], _axis(int(inputs[1].item()), inputs[0].dim())
    if attrs.get("reverse", 0):
        x = x.flip(axis)
    out = torch.cumsum(x, axis).to(x.dtype)
    if attrs.get("exclusive", 0):
        out = out - x
    return out.flip(axis) if attrs.get("reverse", 0) else out


def _dropout(inputs: Inputs, attrs: Attrs) -> tuple[Tensor, ...]:
    x = inputs[0]  # inference: ONNX Runtime ignores the ratio unless training_mode is set
    return (x, torch.ones_like(x, dtype=torch.bool))[: attrs["_outputs"]]


SHAPE_OPS: dict[str, OpFn] = {
    "Shape": _shape,
    "Size": lambda i, a: torch.tensor(i[0].numel(), dtype=torch.int64, device=i[0].device),
    "Reshape": _reshape,
    "Flatten": _flatten,
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Transpose": _transpose,
    "Concat": lambda i, a: torch.cat([x for x in i if x is not None], dim=a["axis"]),
    "Split": _split,
    "Slice": _slice,
    "Gather": _gather,
    "GatherElements": _gather_elements,
    "Expand": _expand,
    "Tile": _tile,
    "ConstantOfShape": _constant_of_shape,
    "Range": _range,
    "Cast": _cast,
    "CastLike": lambda i, a: i[0].to(i[1].dtype),
    "Pad": _pad,
    "Einsum": lambda i, a: torch.einsum(a["equation"], *i),
    "Trilu": _trilu,
    "CumSum": _cumsum,
    "NonZero": lambda i, a: torch.nonzero(i[0]).T.contiguous(),
    "Dropout": _dropout,
}


# -- nn: matmul, convolution, pooling, normalisation ----------------------------------------------


def _gemm(inputs: Inputs, attrs: Attrs) -> Tensor:
    a, b = inputs[0], inputs[1]
    c = inputs[2] if len(inputs) > 2 else None
    a = a.T if attrs.get("transA", 0) else a
    b = b.T if attrs.get("transB", 0) else b
    y = a @ b
    alpha, beta = attrs.get("alpha", 1.0), attrs.get("beta", 1.0)
    if alpha != 1.0:
        y = y * alpha
    if c is not None and beta != 0.0:
        y = y + (c if beta == 1.0 else c * beta)
    return y


def _spatial_pads(
    attrs: Attrs,
    size: Sequence[int],
    kernel: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
) -> tuple[list[int], list[int]]:
    """(begin, end) padding per spatial axis, with ``auto_pad`` resolved."""
    nd = len(size)
    auto = attrs.get("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for n, k, s, d in zip(size, kernel, strides, dilations, strict=True):
            total = max(0, (-(-n // s) - 1) * s + (k - 1) * d + 1 - n)
            small, large = total // 2, total - total // 2
            begin.append(small if auto == "SAME_UPPER" else large)
            end.append(large if auto == "SAME_UPPER" else small)
        return begin, end
    if auto == "VALID":
        return [0] * nd, [0] * nd
    pads = list(attrs.get("pads") or [0] * (2 * nd))
    return pads[:nd], pads[nd:]


def _pad_spatial(x: Tensor, begin: Sequence[int], end: Sequence[int], value: float) -> Tensor:
    """Pad (or crop, for negative amounts) the trailing spatial axes of ``x``."""
    flat: list[int] = []
    for b, e in zip(reversed(begin), reversed(end), strict=True):
        flat += [b, e]
    if not any(flat):
        return x
    return F.pad(x, flat, mode="constant", value=value)


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _conv(inputs: Inputs, attrs: Attrs) -> Tensor:
    x, w = inputs[0], inputs[1]
    b = inputs[2] if len(inputs) > 2 else None
    nd = x.dim() - 2
    strides = list(attrs.get("strides") or [1] * nd)
    dilations = list(attrs.get("dilations") or [1] * nd)
    kernel = list(w.shape[2:])
    begin, end = _spatial_pads(attrs, x.shape[2:], kernel, strides, dilations)
    if begin == end:
        padding = begin
    else:
        x, padding = _pad_spatial(x, begin, end, 0.0), [0] * nd
    return _CONV[nd](x, w, b, strides, padding, dilations, attrs.get("group", 1))


def _conv_transpose(inputs: Inputs, attrs: Attrs) -> Tensor:
    x, w = inputs[0], inputs[1]
    b = inputs[2] if len(inputs) > 2 else None
    nd = x.dim() - 2
    strides = list(attrs.get("strides") or [1] * nd)
    dilations = list(attrs.get("dilations") or [1] * nd)
    extra = list(attrs.get("output_padding") or [0] * nd)
    kernel = list(w.shape[2:])
    full = [
        (n - 1) * s + (k - 1) * d + 1 + e
        for n, s, k, d, e in zip(x.shape[2:], strides, kernel, dilations, extra, strict=True)
    ]
    if attrs.get("output_shape"):
        out_shape = list(attrs["output_shape"])[-nd:]
        totals = [f - o for f, o in zip(full, out_shape, strict=True)]
        upper = attrs.get("auto_pad", "NOTSET") == "SAME_UPPER"  # NOTSET pads more at the start
        begin = [t // 2 if upper else t - t // 2 for t in totals]
        end = [t - bb for t, bb in zip(totals, begin, strict=True)]
    elif attrs.get("auto_pad", "NOTSET") in ("SAME_UPPER", "SAME_LOWER"):
        totals = [f - n * s for f, n, s in zip(full, x.shape[2:], strides, strict=True)]
        upper = attrs["auto_pad"] == "SAME_UPPER"
        begin = [t // 2 if upper else t - t // 2 for t in totals]
        end = [t - bb for t, bb in zip(totals, begin, strict=True)]
    else:
        begin, end = _spatial_pads(attrs, x.shape[2:], kernel, strides, dilations)
    y = _CONV_T[nd](x, w, None, strides, 0, 0, attrs.get("group", 1), dilations)
    # output_padding adds rows at the end that no input reaches; then the pads are cropped.
    y = _pad_spatial(y, [-p for p in begin], [e - p for e, p in zip(extra, end, strict=True)], 0)
    if b is not None:
        y = y + b.reshape(1, -1, *([1] * nd))
    return y


def _pool_geometry(
    x: Tensor, attrs: Attrs
) -> tuple[list[int], list[int], list[int], list[int], list[int]]:
    """Kernel, strides, dilations, and the (begin, end) padding that makes a floor-mode pool over
    the padded input produce exactly ONNX's output size (ceil_mode included)."""
    nd = x.dim() - 2
    kernel = list(attrs["kernel_shape"])
    strides = list(attrs.get("strides") or [1] * nd)
    dilations = list(attrs.get("dilations") or [1] * nd)
    size = list(x.shape[2:])
    begin, end = _spatial_pads(attrs, size, kernel, strides, dilations)
    if attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID") or not attrs.get("ceil_mode", 0):
        return kernel, strides, dilations, begin, end
    ends = []
    for n, k, s, d, b, e in zip(size, kernel, strides, dilations, begin, end, strict=True):
        span = n + b + e - (k - 1) * d - 1
        out = -(-span // s) + 1
        if (out - 1) * s >= n + b:  # a window starting in the end padding is dropped
            out -= 1
        ends.append((out - 1) * s + (k - 1) * d + 1 - n - b)
    return kernel, strides, dilations, begin, ends


_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _max_pool(inputs: Inputs, attrs: Attrs) -> Tensor:
    x = inputs[0]
    kernel, strides, dilations, begin, end = _pool_geometry(x, attrs)
    x = _pad_spatial(x, begin, end, -math.inf)
    return _MAX_POOL[x.dim() - 2](x, kernel, strides, 0, dilations)


def _average_pool(inputs: Inputs, attrs: Attrs) -> Tensor:
    x = inputs[0]
    nd = x.dim() - 2
    kernel, strides, dilations, begin, end = _pool_geometry(x, attrs)
    if any(d != 1 for d in dilations):
        raise NotImplementedError("AveragePool with dilations")
    pool = _AVG_POOL[nd]
    include_pad = bool(attrs.get("count_include_pad", 0))
    declared_begin, declared_end = _spatial_pads(attrs, x.shape[2:], kernel, strides, dilations)
    if begin == end == declared_begin == declared_end and (include_pad or not any(begin)):
        return pool(x, kernel, strides, begin, count_include_pad=True)
    # Sum over each window divided by the count ONNX uses: the cells inside the input, plus
    # the declared padding when count_include_pad is set (never ceil_mode's overhang).
    ones = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype, device=x.device)
    if include_pad:
        ones = _pad_spatial(ones, declared_begin, declared_end, 1.0)
        ones = _pad_spatial(
            ones,
            [b - d for b, d in zip(begin, declared_begin, strict=True)],
            [e - d for e, d in zip(end, declared_end, strict=True)],
            0.0,
        )
    else:
        ones = _pad_spatial(ones, begin, end, 0.0)
    sums = pool(_pad_spatial(x, begin, end, 0.0), kernel, strides, 0) * math.prod(kernel)
    counts = pool(ones, kernel, strides, 0) * math.prod(kernel)
    return sums / counts


def _global_pool(reduce: Callable[..., Tensor]) -> OpFn:
    def apply(inputs: Inputs, attrs: Attrs) -> Tensor:
        x = inputs[0]
        return reduce(x, dim=tuple(range(2, x.dim())), keepdim=True)

    return apply


def _batch_norm(inputs: Inputs, attrs: Attrs) -> Tensor:
    # Inference semantics always: the running statistics are constants of the graph, and
    # distillation keeps them (the student matches the teacher's normalisation).
    x, scale, bias, mean, var = inputs[:5]
    return F.batch_norm(x, mean, var, scale, bias, False, 0.0, attrs.get("epsilon", 1e-5))


def _layer_norm(inputs: Inputs, attrs: Attrs) -> Tensor:
    x, scale = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    axis = _axis(attrs.get("axis", -1), x.dim())
    eps = attrs.get("epsilon", 1e-5)
    shape = tuple(x.shape[axis:])
    dtype = x.dtype
    if attrs.get("stash_type", 1) == 1 and dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    if tuple(scale.shape) == shape and (bias is None or tuple(bias.shape) == shape):
        return F.layer_norm(x, shape, scale.to(x.dtype), _to(bias, x.dtype), eps).to(dtype)
    y = F.layer_norm(x, shape, None, None, eps).to(dtype) * scale
    return y + bias if bias is not None else y


def _to(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)


def _instance_norm(inputs: Inputs, attrs: Attrs) -> Tensor:
    x, scale, bias = inputs[:3]
    return F.instance_norm(x, weight=scale, bias=bias, eps=attrs.get("epsilon", 1e-5))


def _softmax(fn: Callable[..., Tensor]) -> OpFn:
    def apply(inputs: Inputs, attrs: Attrs) -> Tensor:
        x = inputs[0]
        if attrs["_opset"] >= 13:
            return fn(x, dim=attrs.get("axis", -1))
        axis = _axis(attrs.get("axis", 1), x.dim())  # older opsets: coerce to 2-D at axis
        flat = x.reshape(math.prod(x.shape[:axis]), -1)
        return fn(flat, dim=1).reshape(x.shape)

    return apply


NN_OPS: dict[str, OpFn] = {
    "MatMul": _binary(torch.matmul),
    "Gemm": _gemm,
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "MaxPool": _max_pool,
    "AveragePool": _average_pool,
    "GlobalAveragePool": _global_pool(torch.mean),
    "GlobalMaxPool": _global_pool(torch.amax),
    "BatchNormalization": _batch_norm,
    "LayerNormalization": _layer_norm,
    "InstanceNormalization": _instance_norm,
    "Softmax": _softmax(torch.softmax),
    "LogSoftmax": _softmax(torch.log_softmax),
}


# -- reductions -----------------------------------------------------------------------------------


def _reduce(fn: Callable[[Tensor, tuple[int, ...], bool], Tensor]) -> OpFn:
    def apply(inputs: Inputs, attrs: Attrs) -> Tensor:
        x = inputs[0]
        axes = _axes(inputs, attrs, 1)
        keepdims = bool(attrs.get("keepdims", 1))
        if not axes:
            if attrs.get("noop_with_empty_axes", 0):
                return x
            axes = list(range(x.dim()))
        return fn(x, tuple(_axis(a, x.dim()) for a in axes), keepdims)

    return apply


def _arg(fn: Callable[..., Tensor]) -> OpFn:
    def apply(inputs: Inputs, attrs: Attrs) -> Tensor:
        x = inputs[0]
        axis = _axis(attrs.get("axis", 0), x.dim())
        keepdims = bool(attrs.get("keepdims", 1))
        if attrs.get("select_last_index", 0):
            flipped = fn(x.flip(axis), dim=axis, keepdim=keepdims)
            return x.shape[axis] - 1 - flipped
        return fn(x, dim=axis, keepdim=keepdims)

    return apply


def _prod(x: Tensor, dims: tuple[int, ...], keep: bool) -> Tensor:
    for dim in sorted(dims, reverse=True):
        x = torch.prod(x, dim=dim, keepdim=keep)
    return x


REDUCTIONS: dict[str, OpFn] = {
    "ReduceSum": _reduce(lambda x, d, k: torch.sum(x, dim=d, keepdim=k)),
    "ReduceMean": _reduce(lambda x, d, k: torch.mean(x, dim=d, keepdim=k)),
    "ReduceMax": _reduce(lambda x, d, k: torch.amax(x, dim=d, keepdim=k)),
    "ReduceMin": _reduce(lambda x, d, k: torch.amin(x, dim=d, keepdim=k)),
    "ReduceProd": _reduce(_prod),
    "ReduceL1": _reduce(lambda x, d, k: torch.sum(x.abs(), dim=d, keepdim=k)),
    "ReduceL2": _reduce(lambda x, d, k: torch.sqrt(torch.sum(x * x, dim=d, keepdim=k))),
    "ReduceSumSquare": _reduce(lambda x, d, k: torch.sum(x * x, dim=d, keepdim=k)),
    "ReduceLogSumExp": _reduce(lambda x, d, k: torch.logsumexp(x, dim=d, keepdim=k)),
    "ArgMax": _arg(torch.argmax),
    "ArgMin": _arg(torch.argmin),
}


# -- quantize / dequantize ------------------------------------------------------------------------


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
    return _axis(attrs.get("axis", 1), x.dim()), attrs.get("block_size", 0)


def _dequantize(inputs: Inputs, attrs: Attrs) -> Tensor:
    x, scale = inputs[0], inputs[1]
    zero_point = inputs[2] if len(inputs) > 2 else None
    axis, block = _qdq_layout(x, scale, attrs)
    centred = x.to(scale.dtype) if x.is_floating_point() else x.to(torch.float32)
    if zero_point is not None:
        centred = centred - expand_param(zero_point.to(centred.dtype), x.shape, axis, block)
    return (centred * expand_param(scale, x.shape, axis, block).to(centred.dtype)).to(scale.dtype)


def _quantize(inputs: Inputs, attrs: Attrs) -> Tensor:
    """Integer codes held in a float tensor, rounded with a straight-through estimator, so
    gradients reach the activations of a statically quantised model."""
    x, scale = inputs[0], inputs[1]
    zero_point = inputs[2] if len(inputs) > 2 else None
    axis, block = _qdq_layout(x, scale, attrs)
    qmin, qmax = attrs["_qrange"]
    scaled = x / expand_param(scale, x.shape, axis, block)
    rounded = scaled + (torch.round(scaled) - scaled).detach()
    if zero_point is not None:
        rounded = rounded + expand_param(zero_point.to(x.dtype), x.shape, axis, block)
    return torch.clamp(rounded, qmin, qmax)


QDQ_OPS: dict[str, OpFn] = {
    "DequantizeLinear": _dequantize,
    "QuantizeLinear": _quantize,
}

OPS: dict[str, OpFn] = {**ELEMENTWISE, **SHAPE_OPS, **NN_OPS, **REDUCTIONS, **QDQ_OPS}
