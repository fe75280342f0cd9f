"""Neural-network ops: matmul, convolution, pooling, normalisation, softmax, losses.

Pools and convolutions take ONNX's padding forms (explicit, ``auto_pad``, ``ceil_mode``) by
padding explicitly where torch's symmetric padding cannot say the same. Normalisations
compute in float32 for half-precision inputs when ``stash_type`` asks (the default).
BatchNormalization uses its running statistics unless the node sets ``training_mode``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from onnxcomp.distill.ops._common import (
    Attrs,
    Inputs,
    OpFn,
    Tensor,
    axis_of,
    binary,
    float_attr,
    lowest,
    optional,
)


def _gemm(inputs: Inputs, attrs: Attrs) -> Tensor:
    a, b, c = inputs[0], inputs[1], optional(inputs, 2)
    a = a.T if attrs.get("transA", 0) else a
    b = b.T if attrs.get("transB", 0) else b
    y = a @ b
    alpha, beta = float_attr(attrs, "alpha", 1.0), float_attr(attrs, "beta", 1.0)
    if alpha != 1.0:
        y = y * alpha
    if c is not None and beta != 0.0:
        y = y + (c if beta == 1.0 else c * beta)
    return y


def spatial_pads(
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


def pad_spatial(x: Tensor, begin: Sequence[int], end: Sequence[int], value: float) -> Tensor:
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
    x, w, b = inputs[0], inputs[1], optional(inputs, 2)
    nd = x.dim() - 2
    strides = list(attrs.get("strides") or [1] * nd)
    dilations = list(attrs.get("dilations") or [1] * nd)
    kernel = list(w.shape[2:])
    begin, end = spatial_pads(attrs, x.shape[2:], kernel, strides, dilations)
    if begin == end:
        padding = begin
    else:
        x, padding = pad_spatial(x, begin, end, 0.0), [0] * nd
    return _CONV[nd](x, w, b, strides, padding, dilations, attrs.get("group", 1))


def _conv_transpose(inputs: Inputs, attrs: Attrs) -> Tensor:
    x, w, b = inputs[0], inputs[1], optional(inputs, 2)
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
        begin, end = spatial_pads(attrs, x.shape[2:], kernel, strides, dilations)
    y = _CONV_T[nd](x, w, None, strides, 0, 0, attrs.get("group", 1), dilations)
    # output_padding adds rows at the end that no input reaches; then the pads are cropped.
    y = pad_spatial(y, [-p for p in begin], [e - p for e, p in zip(extra, end, strict=True)], 0)
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
    begin, end = spatial_pads(attrs, size, kernel, strides, dilations)
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


def _computable(x: Tensor) -> Tensor:
    """Integer tensors as floats exact for their range (torch pools floats only)."""
    if x.is_floating_point():
        return x
    return x.to(torch.float64 if x.element_size() >= 4 else torch.float32)


def _max_pool(inputs: Inputs, attrs: Attrs) -> Tensor | tuple[Tensor, Tensor]:
    x = inputs[0]
    kernel, strides, dilations, begin, end = _pool_geometry(x, attrs)
    padded = pad_spatial(_computable(x), begin, end, lowest(x.dtype))
    pool = _MAX_POOL[x.dim() - 2]
    if attrs["_outputs"] == 1:
        return pool(padded, kernel, strides, 0, dilations).to(x.dtype)
    y, flat = pool(padded, kernel, strides, 0, dilations, return_indices=True)
    return y.to(x.dtype), _onnx_pool_indices(flat, x, padded.shape[2:], begin, attrs)


def _onnx_pool_indices(
    flat: Tensor, x: Tensor, padded: Sequence[int], begin: Sequence[int], attrs: Attrs
) -> Tensor:
    """torch's per-plane indices into the padded input as ONNX's indices into the whole
    unpadded tensor (row-major, or column-major over the spatial axes with storage_order 1)."""
    size = list(x.shape[2:])
    coords = []
    for extent, b in zip(reversed(list(padded)), reversed(list(begin)), strict=True):
        coords.append(flat % extent - b)
        flat = flat // extent
    coords.reverse()
    index = torch.zeros_like(coords[0])
    order = range(len(size)) if not attrs.get("storage_order", 0) else reversed(range(len(size)))
    for axis in order:
        index = index * size[axis] + coords[axis]
    planes = torch.arange(x.shape[0] * x.shape[1], device=x.device).reshape(
        x.shape[0], x.shape[1], *([1] * len(size))
    )
    return index + planes * math.prod(size)


def window_sum(x: Tensor, kernel: Sequence[int], strides: Sequence[int],
               dilations: Sequence[int]) -> Tensor:  # fmt: skip
    """Sum over each pooling window (no padding), dilations included: a depthwise conv of ones."""
    nd = len(kernel)
    planes = x.reshape(-1, 1, *x.shape[2:])
    ones = torch.ones((1, 1, *kernel), dtype=x.dtype, device=x.device)
    out = _CONV[nd](planes, ones, None, list(strides), 0, list(dilations))
    return out.reshape(*x.shape[:2], *out.shape[2:])


def _average_pool(inputs: Inputs, attrs: Attrs) -> Tensor:
    x = inputs[0]
    kernel, strides, dilations, begin, end = _pool_geometry(x, attrs)
    include_pad = bool(attrs.get("count_include_pad", 0))
    declared_begin, declared_end = spatial_pads(attrs, x.shape[2:], kernel, strides, dilations)
    simple = begin == end == declared_begin == declared_end and all(
        2 * b <= k for b, k in zip(begin, kernel, strict=True)
    )
    if simple and all(d == 1 for d in dilations) and (include_pad or not any(begin)):
        return _AVG_POOL[x.dim() - 2](x, kernel, strides, begin, count_include_pad=True)
    # Sum over each window divided by the count ONNX uses: the cells inside the input, plus
    # the declared padding when count_include_pad is set (never ceil_mode's overhang).
    ones = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype, device=x.device)
    if include_pad:
        ones = pad_spatial(ones, declared_begin, declared_end, 1.0)
        ones = pad_spatial(
            ones,
            [b - d for b, d in zip(begin, declared_begin, strict=True)],
            [e - d for e, d in zip(end, declared_end, strict=True)],
            0.0,
        )
    else:
        ones = pad_spatial(ones, begin, end, 0.0)
    sums = window_sum(pad_spatial(x, begin, end, 0.0), kernel, strides, dilations)
    counts = window_sum(ones, kernel, strides, dilations)
    return sums / counts


def _lp_pool(inputs: Inputs, attrs: Attrs) -> Tensor:
    x = inputs[0]
    p = attrs.get("p", 2)
    kernel, strides, dilations, begin, end = _pool_geometry(x, attrs)
    powered = pad_spatial(x.abs() ** p, begin, end, 0.0)
    return window_sum(powered, kernel, strides, dilations) ** (1.0 / p)


def _global_pool(reduce: Callable[..., Tensor]) -> OpFn:
    def apply(inputs: Inputs, attrs: Attrs) -> Tensor:
        x = inputs[0]
        return reduce(x, dim=tuple(range(2, x.dim())), keepdim=True)

    return apply


def _global_lp_pool(inputs: Inputs, attrs: Attrs) -> Tensor:
    x, p = inputs[0], attrs.get("p", 2)
    return (x.abs() ** p).sum(dim=tuple(range(2, x.dim())), keepdim=True) ** (1.0 / p)


def _max_unpool(inputs: Inputs, attrs: Attrs) -> Tensor:
    x, indices, shape = inputs[0], inputs[1].long(), optional(inputs, 2)
    nd = x.dim() - 2
    if shape is not None:
        out_shape = [int(v) for v in shape.tolist()]
    else:
        kernel = list(attrs["kernel_shape"])
        strides = list(attrs.get("strides") or [1] * nd)
        pads = list(attrs.get("pads") or [0] * (2 * nd))
        spatial = [
            (n - 1) * s + k - pads[i] - pads[i + nd]
            for i, (n, s, k) in enumerate(zip(x.shape[2:], strides, kernel, strict=True))
        ]
        out_shape = [*x.shape[:2], *spatial]
    out = x.new_zeros(math.prod(out_shape))
    return out.scatter(0, indices.reshape(-1), x.reshape(-1)).reshape(out_shape)


def _stashed(x: Tensor, attrs: Attrs) -> Tensor:
    if attrs.get("stash_type", 1) == 1 and x.dtype in (torch.float16, torch.bfloat16):
        return x.float()
    return x


def _batch_norm(inputs: Inputs, attrs: Attrs) -> Tensor | tuple[Tensor, ...]:
    x, scale, bias, mean, var = inputs[:5]
    eps = float_attr(attrs, "epsilon", 1e-5)
    if not attrs.get("training_mode", 0):
        # Inference semantics: the running statistics are constants of the graph, and
        # distillation keeps them (the student matches the teacher's normalisation).
        return F.batch_norm(x, mean, var, scale, bias, False, 0.0, eps)
    dims = [0, *range(2, x.dim())]
    batch_mean = x.mean(dim=dims)
    batch_var = x.var(dim=dims, unbiased=False)
    y = F.batch_norm(x, batch_mean, batch_var, scale, bias, False, 0.0, eps)
    momentum = float_attr(attrs, "momentum", 0.9)
    running_mean = mean * momentum + batch_mean * (1 - momentum)
    running_var = var * momentum + batch_var * (1 - momentum)
    return (y, running_mean, running_var)[: attrs["_outputs"]]


def _layer_norm(inputs: Inputs, attrs: Attrs) -> Tensor | tuple[Tensor, ...]:
    x, scale, bias = inputs[0], inputs[1], optional(inputs, 2)
    axis = axis_of(attrs.get("axis", -1), x.dim())
    eps = float_attr(attrs, "epsilon", 1e-5)
    shape = tuple(x.shape[axis:])
    dtype = x.dtype
    x = _stashed(x, attrs)
    if attrs["_outputs"] > 1:
        dims = tuple(range(axis, x.dim()))
        mean = x.mean(dim=dims, keepdim=True)
        inv_std = torch.rsqrt(((x - mean) ** 2).mean(dim=dims, keepdim=True) + eps)
        y = ((x - mean) * inv_std).to(dtype) * scale
        y = y + bias if bias is not None else y
        return (y, mean, inv_std)[: attrs["_outputs"]]
    if tuple(scale.shape) == shape and (bias is None or tuple(bias.shape) == shape):
        weight = scale.to(x.dtype)
        return F.layer_norm(x, shape, weight, None if bias is None else bias.to(x.dtype),
                            eps).to(dtype)  # fmt: skip
    y = F.layer_norm(x, shape, None, None, eps).to(dtype) * scale
    return y + bias if bias is not None else y


def _instance_norm(inputs: Inputs, attrs: Attrs) -> Tensor:
    x, scale, bias = inputs[:3]
    return F.instance_norm(x, weight=scale, bias=bias, eps=float_attr(attrs, "epsilon", 1e-5))


def _group_norm(inputs: Inputs, attrs: Attrs) -> Tensor:
    x, scale, bias = inputs[:3]
    groups = attrs["num_groups"]
    channels = x.shape[1]
    if scale.numel() == groups and groups != channels:  # opset 18: one scale per group
        scale = scale.repeat_interleave(channels // groups)
        bias = bias.repeat_interleave(channels // groups)
    dtype = x.dtype
    y = F.group_norm(_stashed(x, attrs), groups, None, None, float_attr(attrs, "epsilon", 1e-5))
    view = (1, channels, *([1] * (x.dim() - 2)))
    return y.to(dtype) * scale.reshape(view) + bias.reshape(view)


def _rms_norm(inputs: Inputs, attrs: Attrs) -> Tensor:
    x, scale = inputs[0], inputs[1]
    axis = axis_of(attrs.get("axis", -1), x.dim())
    dtype = x.dtype
    stashed = _stashed(x, attrs)
    dims = tuple(range(axis, x.dim()))
    mean_square = (stashed * stashed).mean(dim=dims, keepdim=True)
    y = stashed * torch.rsqrt(mean_square + float_attr(attrs, "epsilon", 1e-5))
    return y.to(dtype) * scale


def _mean_variance_norm(inputs: Inputs, attrs: Attrs) -> Tensor:
    x = inputs[0]
    axes = tuple(attrs.get("axes") or (0, 2, 3))
    mean = x.mean(dim=axes, keepdim=True)
    variance = (x * x).mean(dim=axes, keepdim=True) - mean * mean
    return (x - mean) / (torch.sqrt(variance) + 1e-9)


def _lp_norm(inputs: Inputs, attrs: Attrs) -> Tensor:
    x = inputs[0]
    axis, p = attrs.get("axis", -1), attrs.get("p", 2)
    norm = x.abs().sum(dim=axis, keepdim=True) if p == 1 else x.norm(dim=axis, keepdim=True)
    return torch.where(norm == 0, torch.zeros_like(x), x / norm)  # a zero vector stays zero


def _lrn(inputs: Inputs, attrs: Attrs) -> Tensor:
    x = inputs[0]
    size = attrs["size"]
    alpha, beta = float_attr(attrs, "alpha", 1e-4), float_attr(attrs, "beta", 0.75)
    bias = float_attr(attrs, "bias", 1.0)
    before, after = (size - 1) // 2, -(-(size - 1) // 2)  # ONNX's window, also for even sizes
    squares = (x * x).reshape(x.shape[0], 1, x.shape[1], -1)
    squares = F.pad(squares, (0, 0, before, after))
    sums = F.avg_pool2d(squares, (size, 1), stride=1) * size
    return x / (bias + alpha / size * sums.reshape(x.shape)) ** beta


def _softmax(fn: Callable[..., Tensor]) -> OpFn:
    def apply(inputs: Inputs, attrs: Attrs) -> Tensor:
        x = inputs[0]
        if attrs["_opset"] >= 13:
            return fn(x, dim=attrs.get("axis", -1))
        axis = axis_of(attrs.get("axis", 1), x.dim())  # older opsets: coerce to 2-D at axis
        flat = x.reshape(math.prod(x.shape[:axis]), -1)
        return fn(flat, dim=1).reshape(x.shape)

    return apply


def _hardmax_along(x: Tensor, dim: int) -> Tensor:
    return F.one_hot(x.argmax(dim=dim), x.shape[dim]).movedim(-1, dim).to(x.dtype)


def _nll(inputs: Inputs, attrs: Attrs, log_prob: Tensor) -> Tensor:
    target, weight = inputs[1].long(), optional(inputs, 2)
    ignore = attrs.get("ignore_index")
    loss = F.nll_loss(
        log_prob,
        target,
        weight,
        ignore_index=-100 if ignore is None else ignore,
        reduction=attrs.get("reduction", "mean"),
    )
    return loss.to(log_prob.dtype)


def _softmax_cross_entropy(inputs: Inputs, attrs: Attrs) -> Tensor | tuple[Tensor, ...]:
    log_prob = torch.log_softmax(inputs[0], dim=1)
    return (_nll(inputs, attrs, log_prob), log_prob)[: attrs["_outputs"]]


OPS: dict[str, OpFn] = {
    "MatMul": binary(torch.matmul),
    "Gemm": _gemm,
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "MaxPool": _max_pool,
    "AveragePool": _average_pool,
    "LpPool": _lp_pool,
    "MaxUnpool": _max_unpool,
    "GlobalAveragePool": _global_pool(torch.mean),
    "GlobalMaxPool": _global_pool(torch.amax),
    "GlobalLpPool": _global_lp_pool,
    "BatchNormalization": _batch_norm,
    "LayerNormalization": _layer_norm,
    "InstanceNormalization": _instance_norm,
    "GroupNormalization": _group_norm,
    "RMSNormalization": _rms_norm,
    "MeanVarianceNormalization": _mean_variance_norm,
    "LpNormalization": _lp_norm,
    "LRN": _lrn,
    "Softmax": _softmax(torch.softmax),
    "LogSoftmax": _softmax(torch.log_softmax),
    "Hardmax": _softmax(_hardmax_along),
    "NegativeLogLikelihoodLoss": lambda i, a: _nll(i, a, i[0]),
    "SoftmaxCrossEntropyLoss": _softmax_cross_entropy,
    "Det": lambda i, a: torch.linalg.det(i[0]),
}
