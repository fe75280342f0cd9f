"""Shape, layout, indexing and data-movement ops.

Shapes are computed from the tensors at run time, so dynamic batch and sequence dimensions
work. Ops that move values (Gather*, Scatter*, Slice, Pad, TopK, Compress, ...) pass
gradients to the values they move; indices, masks and shapes are integer tensors without
gradient.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from onnxcomp.distill.ops._common import (
    FLOAT8,
    NARROW_RANGES,
    TORCH_DTYPES,
    Attrs,
    Inputs,
    OpFn,
    Tensor,
    axes_of,
    axis_of,
    ints,
    optional,
    widened,
)


def _shape(inputs: Inputs, attrs: Attrs) -> Tensor:
    x = inputs[0]
    dims = list(x.shape)
    start, end = attrs.get("start", 0), attrs.get("end", len(dims))
    return torch.tensor(dims[start:end], dtype=torch.int64, device=x.device)


def _reshape(inputs: Inputs, attrs: Attrs) -> Tensor:
    x = inputs[0]
    shape = list(attrs["shape"]) if "shape" in attrs else ints(inputs[1])  # opset < 5: attr
    if not attrs.get("allowzero", 0):
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return x.reshape(shape)


def _flatten(inputs: Inputs, attrs: Attrs) -> Tensor:
    x = inputs[0]
    axis = axis_of(attrs.get("axis", 1), x.dim())
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


def _squeeze(inputs: Inputs, attrs: Attrs) -> Tensor:
    x, axes = inputs[0], axes_of(inputs, attrs, 1)
    if axes is None:
        return x.squeeze()
    return x.squeeze(tuple(axis_of(a, x.dim()) for a in axes))


def _unsqueeze(inputs: Inputs, attrs: Attrs) -> Tensor:
    x, axes = inputs[0], axes_of(inputs, attrs, 1)
    rank = x.dim() + len(axes)
    for axis in sorted(axis_of(a, rank) for a in axes):
        x = x.unsqueeze(axis)
    return x


def _transpose(inputs: Inputs, attrs: Attrs) -> Tensor:
    x = inputs[0]
    perm = attrs.get("perm") or list(range(x.dim()))[::-1]
    return x.permute(*perm)


def _split(inputs: Inputs, attrs: Attrs) -> tuple[Tensor, ...]:
    x = inputs[0]
    axis = axis_of(attrs.get("axis", 0), x.dim())
    count = attrs["_outputs"]
    sizes = attrs.get("split") or ints(optional(inputs, 1))
    if sizes is None:
        sizes = -(-x.shape[axis] // attrs.get("num_outputs", count))
    return tuple(torch.split(x, sizes, dim=axis))


def _slice(inputs: Inputs, attrs: Attrs) -> Tensor:
    x = inputs[0]
    if "starts" in attrs:  # opset < 10
        starts, ends, axes, steps = attrs["starts"], attrs["ends"], attrs.get("axes"), None
    else:
        starts, ends = ints(inputs[1]), ints(inputs[2])
        axes, steps = ints(optional(inputs, 3)), ints(optional(inputs, 4))
    axes = axes if axes is not None else list(range(len(starts)))
    steps = steps or [1] * len(starts)
    index: list[Any] = [slice(None)] * x.dim()
    reversed_axes = []
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        axis = axis_of(axis, x.dim())
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


def _wrap(indices: Tensor, size: int | Tensor) -> Tensor:
    """Negative indices counted from the end, as ONNX allows."""
    return torch.where(indices < 0, indices + size, indices)


def _gather(inputs: Inputs, attrs: Attrs) -> Tensor:
    data, indices = inputs[0], inputs[1].long()
    axis = axis_of(attrs.get("axis", 0), data.dim())
    indices = _wrap(indices, data.shape[axis])
    picked = data.index_select(axis, indices.reshape(-1))
    return picked.reshape((*data.shape[:axis], *indices.shape, *data.shape[axis + 1 :]))


def _gather_elements(inputs: Inputs, attrs: Attrs) -> Tensor:
    data, indices = inputs[0], inputs[1].long()
    axis = axis_of(attrs.get("axis", 0), data.dim())
    return torch.gather(data, axis, _wrap(indices, data.shape[axis]))


def _nd_index(data: Tensor, indices: Tensor, batch_dims: int) -> tuple[Tensor, ...]:
    """Advanced-indexing tuple for GatherND/ScatterND: batch rows, then one index per axis."""
    depth = indices.shape[-1]
    batch = math.prod(data.shape[:batch_dims])
    dims = torch.tensor(data.shape[batch_dims : batch_dims + depth], device=indices.device)
    flat = _wrap(indices.long().reshape(batch, -1, depth), dims)
    rows = torch.arange(batch, device=indices.device).reshape(batch, 1)
    return (rows.expand(batch, flat.shape[1]), *flat.unbind(-1))


def _gather_nd(inputs: Inputs, attrs: Attrs) -> Tensor:
    data, indices = inputs[0], inputs[1]
    b = attrs.get("batch_dims", 0)
    depth = indices.shape[-1]
    flat = data.reshape(math.prod(data.shape[:b]), *data.shape[b:])
    picked = flat[_nd_index(data, indices, b)]
    return picked.reshape(*indices.shape[:-1], *data.shape[b + depth :])


_REDUCE = {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}


def _scatter_nd(inputs: Inputs, attrs: Attrs) -> Tensor:
    data, indices, updates = inputs[0], inputs[1], inputs[2]
    depth = indices.shape[-1]
    # Rows of the data flattened over the indexed axes, addressed by one linear index each.
    lead = data.shape[:depth]
    strides = torch.tensor([math.prod(lead[i + 1 :]) for i in range(depth)], device=indices.device)
    wrapped = _wrap(indices.long(), torch.tensor(lead, device=indices.device))
    linear = (wrapped * strides).sum(-1).reshape(-1)
    rows = data.reshape(math.prod(lead), *data.shape[depth:])
    values = updates.reshape(-1, *data.shape[depth:]).to(data.dtype)
    reduction = attrs.get("reduction", "none")
    if reduction == "none":
        out = rows.index_copy(0, linear, values)
    elif reduction == "add":
        out = rows.index_add(0, linear, values)
    else:
        out = rows.index_reduce(0, linear, values, _REDUCE[reduction], include_self=True)
    return out.reshape(data.shape)


def _scatter_elements(inputs: Inputs, attrs: Attrs) -> Tensor:
    data, indices, updates = inputs[0], inputs[1].long(), inputs[2]
    axis = axis_of(attrs.get("axis", 0), data.dim())
    indices = _wrap(indices, data.shape[axis])
    reduction = attrs.get("reduction", "none")
    if reduction == "none":
        return data.scatter(axis, indices, updates)
    return data.scatter_reduce(axis, indices, updates, _REDUCE[reduction], include_self=True)


def _tensor_scatter(inputs: Inputs, attrs: Attrs) -> Tensor:
    cache, update = inputs[0], inputs[1]
    write = optional(inputs, 2)
    axis = axis_of(attrs.get("axis", -2), cache.dim())
    batch, length = cache.shape[0], update.shape[axis]
    if write is None:
        write = torch.zeros(batch, dtype=torch.int64, device=cache.device)
    positions = write.long().reshape(batch, 1) + torch.arange(length, device=cache.device)
    if attrs.get("mode", "linear") == "circular":
        positions = positions % cache.shape[axis]
    view = [1] * cache.dim()
    view[0], view[axis] = batch, length
    if axis == 0:
        raise NotImplementedError("TensorScatter along the batch axis")
    return cache.scatter(axis, positions.reshape(view).expand(update.shape), update)


def _expand(inputs: Inputs, attrs: Attrs) -> Tensor:
    x = inputs[0]
    return x.expand(torch.broadcast_shapes(x.shape, tuple(ints(inputs[1]))))


def _tile(inputs: Inputs, attrs: Attrs) -> Tensor:
    return inputs[0].repeat(*ints(inputs[1]))


def _constant_of_shape(inputs: Inputs, attrs: Attrs) -> Tensor:
    value = attrs.get("value")
    shape = ints(inputs[0])
    if value is None:
        return torch.zeros(shape, dtype=torch.float32, device=inputs[0].device)
    return value.reshape(()).to(inputs[0].device).expand(shape).clone()


def _range(inputs: Inputs, attrs: Attrs) -> Tensor:
    start, limit, delta = inputs[0], inputs[1], inputs[2]
    return torch.arange(
        start.item(), limit.item(), delta.item(), dtype=start.dtype, device=start.device
    )


def cast(x: Tensor, to: int, saturate: bool = True) -> Tensor:
    """ONNX Cast: float8 saturates unless told not to; sub-byte integers wrap, as wider integer
    casts do (held in 8 bits)."""
    dtype = TORCH_DTYPES[to]
    if to in NARROW_RANGES:
        low, high = NARROW_RANGES[to]
        span = high - low + 1
        return ((x.to(torch.int64) - low) % span + low).to(dtype)
    if dtype in FLOAT8 and x.is_floating_point():
        info = torch.finfo(dtype)
        x = x.float()
        if saturate:
            x = torch.clamp(x, info.min, info.max)
        elif dtype == torch.float8_e4m3fn:  # torch saturates this one; ONNX overflows to NaN
            limit = info.max + info.eps * 2**8 / 2  # half a step above the largest value
            x = torch.where(x.abs() >= limit, torch.full_like(x, float("nan")), x)
    return x.to(dtype)


def _cast(inputs: Inputs, attrs: Attrs) -> Tensor:
    return cast(inputs[0], attrs["to"], bool(attrs.get("saturate", 1)))


def _cast_like(inputs: Inputs, attrs: Attrs) -> Tensor:
    x, like = inputs[0], inputs[1]
    to = attrs.get("_to")  # the target's ONNX type, when it is one torch holds in another
    if to is not None:
        return cast(x, to, bool(attrs.get("saturate", 1)))
    if like.dtype in FLOAT8:
        return cast(x, _FLOAT8_CODES[like.dtype], bool(attrs.get("saturate", 1)))
    return x.to(like.dtype)


_FLOAT8_CODES = {TORCH_DTYPES[code]: code for code in (17, 18, 19, 20)}


def _pad_indices(size: int, begin: int, end: int, mode: str, device: torch.device) -> Tensor:
    """Source positions of one padded axis (negative amounts crop) in a non-constant mode."""
    index = torch.arange(-begin, size + end, device=device)
    if mode == "edge":
        return index.clamp(0, size - 1)
    if mode == "wrap":
        return index % size
    period = 2 * (size - 1)  # reflect, without repeating the edge
    if period == 0:
        return torch.zeros_like(index)
    index = index % period
    return torch.where(index >= size, period - index, index)


def _pad(inputs: Inputs, attrs: Attrs) -> Tensor:
    x = inputs[0]
    pads = attrs.get("pads") or ints(inputs[1])
    value: Any = attrs.get("value", 0.0)
    if optional(inputs, 2) is not None:
        value = inputs[2].item()
    axes = ints(optional(inputs, 3))
    axes = [axis_of(a, x.dim()) for a in axes] if axes is not None else list(range(x.dim()))
    begin, end = pads[: len(axes)], pads[len(axes) :]
    mode = attrs.get("mode", "constant")
    if mode == "constant":
        full = [0] * (2 * x.dim())
        for axis, b, e in zip(axes, begin, end, strict=True):
            full[2 * (x.dim() - 1 - axis)], full[2 * (x.dim() - 1 - axis) + 1] = b, e
        return F.pad(x, full, mode="constant", value=value)
    for axis, b, e in zip(axes, begin, end, strict=True):
        if b or e:
            x = x.index_select(axis, _pad_indices(x.shape[axis], b, e, mode, x.device))
    return x


def _center_crop_pad(inputs: Inputs, attrs: Attrs) -> Tensor:
    x, shape = inputs[0], ints(inputs[1])
    axes = attrs.get("axes")
    axes = [axis_of(a, x.dim()) for a in axes] if axes else list(range(x.dim()))
    for axis, want in zip(axes, shape, strict=False):
        have = x.shape[axis]
        if want < have:
            x = x.narrow(axis, (have - want) // 2, want)
        elif want > have:
            begin = (want - have) // 2
            x = _pad_axis(x, axis, begin, want - have - begin)
    return x


def _pad_axis(x: Tensor, axis: int, begin: int, end: int) -> Tensor:
    shape = list(x.shape)
    parts = []
    if begin:
        shape[axis] = begin
        parts.append(x.new_zeros(shape))
    parts.append(x)
    if end:
        shape[axis] = end
        parts.append(x.new_zeros(shape))
    return torch.cat(parts, dim=axis)


def _trilu(inputs: Inputs, attrs: Attrs) -> Tensor:
    k = optional(inputs, 1)
    k = int(k.item()) if k is not None else 0
    return torch.triu(inputs[0], k) if attrs.get("upper", 1) else torch.tril(inputs[0], k)


def _cumulative(fn: Any, identity: int) -> OpFn:
    def apply(inputs: Inputs, attrs: Attrs) -> Tensor:
        x, axis = inputs[0], axis_of(int(inputs[1].item()), inputs[0].dim())
        reverse = attrs.get("reverse", 0)
        if reverse:
            x = x.flip(axis)
        if attrs.get("exclusive", 0):  # shift by one: the first element sees the identity
            first = torch.full_like(x.narrow(axis, 0, 1), identity)
            x = torch.cat([first, x.narrow(axis, 0, x.shape[axis] - 1)], dim=axis)
        out = fn(x, axis).to(x.dtype)
        return out.flip(axis) if reverse else out

    return apply


def _dropout(inputs: Inputs, attrs: Attrs) -> tuple[Tensor, ...]:
    x = inputs[0]  # inference: ONNX Runtime ignores the ratio unless training_mode is set
    return (x, torch.ones_like(x, dtype=torch.bool))[: attrs["_outputs"]]


def _compress(inputs: Inputs, attrs: Attrs) -> Tensor:
    x, condition = inputs[0], inputs[1].bool().reshape(-1)
    axis = attrs.get("axis")
    if axis is None:
        x, axis = x.reshape(-1), 0
    axis = axis_of(axis, x.dim())
    picked = torch.nonzero(condition[: x.shape[axis]]).reshape(-1)
    return x.index_select(axis, picked)


def _top_k(inputs: Inputs, attrs: Attrs) -> tuple[Tensor, Tensor]:
    x, k = inputs[0], int(inputs[1].reshape(-1)[0].item())
    axis = axis_of(attrs.get("axis", -1), x.dim())
    # A stable sort keeps the lower index first among equal values, as ONNX asks.
    values, indices = torch.sort(x, dim=axis, descending=bool(attrs.get("largest", 1)), stable=True)
    return values.narrow(axis, 0, k), indices.narrow(axis, 0, k)


def _one_hot(inputs: Inputs, attrs: Attrs) -> Tensor:
    indices, depth, values = inputs[0], int(inputs[1].reshape(-1)[0].item()), inputs[2]
    indices = indices.to(torch.int64)  # float indices truncate, as ONNX Runtime does
    indices = torch.where(indices < 0, indices + depth, indices)
    hot = indices.unsqueeze(-1) == torch.arange(depth, device=indices.device)
    axis = axis_of(attrs.get("axis", -1), indices.dim() + 1)
    hot = hot.movedim(-1, axis)
    return torch.where(hot, values[1], values[0])


def _eye_like(inputs: Inputs, attrs: Attrs) -> Tensor:
    x = inputs[0]
    dtype = TORCH_DTYPES[attrs["dtype"]] if attrs.get("dtype") else x.dtype
    rows = torch.arange(x.shape[0], device=x.device).reshape(-1, 1)
    cols = torch.arange(x.shape[1], device=x.device).reshape(1, -1)
    return (cols - rows == attrs.get("k", 0)).to(dtype)


def _reverse_sequence(inputs: Inputs, attrs: Attrs) -> Tensor:
    x, lengths = inputs[0], inputs[1].long()
    time, batch = attrs.get("time_axis", 0), attrs.get("batch_axis", 1)
    steps = torch.arange(x.shape[time], device=x.device).reshape(-1, 1)
    lengths = lengths.reshape(1, -1)
    source = torch.where(steps < lengths, lengths - 1 - steps, steps)  # [time, batch]
    if time > batch:
        source = source.T
    view = [1] * x.dim()
    view[time], view[batch] = x.shape[time], x.shape[batch]
    return torch.gather(x, time, source.reshape(view).expand(x.shape))


def _unique(inputs: Inputs, attrs: Attrs) -> tuple[Tensor, ...]:
    x = inputs[0]
    axis = attrs.get("axis")
    source = x if axis is not None else x.reshape(-1)
    axis = axis_of(axis, x.dim()) if axis is not None else 0
    array = source.detach().cpu()
    array = (array.float() if array.dtype == torch.bfloat16 else array).numpy()
    _, first, inverse, counts = np.unique(
        array, return_index=True, return_inverse=True, return_counts=True, axis=axis
    )
    inverse = inverse.reshape(-1)
    if not attrs.get("sorted", 1):  # order of first occurrence
        order = np.argsort(first, kind="stable")
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        first, counts, inverse = first[order], counts[order], rank[inverse]
    device = x.device

    def tensor(a: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(device)

    first_t = tensor(first)
    return (source.index_select(axis, first_t), first_t, tensor(inverse), tensor(counts))


def _non_zero(inputs: Inputs, attrs: Attrs) -> Tensor:
    x = inputs[0]
    if x.dim() == 0:
        return torch.zeros((0, int(bool(x))), dtype=torch.int64, device=x.device)
    return torch.nonzero(x).T.contiguous()


def _concat(inputs: Inputs, attrs: Attrs) -> Tensor:
    return torch.cat([x for x in inputs if x is not None], dim=attrs["axis"])


OPS: dict[str, OpFn] = {
    "Shape": _shape,
    "Size": lambda i, a: torch.tensor(i[0].numel(), dtype=torch.int64, device=i[0].device),
    "Reshape": _reshape,
    "Flatten": _flatten,
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Transpose": _transpose,
    "Concat": _concat,
    "Split": _split,
    "Slice": _slice,
    "Gather": _gather,
    "GatherElements": _gather_elements,
    "GatherND": _gather_nd,
    "ScatterND": _scatter_nd,
    "ScatterElements": _scatter_elements,
    "Scatter": _scatter_elements,
    "TensorScatter": _tensor_scatter,
    "Expand": _expand,
    "Tile": _tile,
    "ConstantOfShape": _constant_of_shape,
    "Range": _range,
    "Cast": _cast,
    "CastLike": _cast_like,
    "Pad": _pad,
    "CenterCropPad": _center_crop_pad,
    "Einsum": lambda i, a: torch.einsum(a["equation"], *i),
    "Trilu": _trilu,
    "CumSum": widened(_cumulative(torch.cumsum, 0)),
    "CumProd": widened(_cumulative(torch.cumprod, 1)),
    "NonZero": _non_zero,
    "Dropout": _dropout,
    "Compress": _compress,
    "TopK": _top_k,
    "OneHot": _one_hot,
    "EyeLike": _eye_like,
    "ReverseSequence": _reverse_sequence,
    "Unique": _unique,
}
