"""Reductions and arg-reductions, in the attribute form (older opsets) and the input form."""

from __future__ import annotations

from collections.abc import Callable

import torch

from onnxcomp.distill.ops._common import (
    Attrs,
    Inputs,
    OpFn,
    Tensor,
    axes_of,
    axis_of,
    highest,
    lowest,
    widened,
)

Reduction = Callable[[Tensor, tuple[int, ...], bool], Tensor]


def _reduce(fn: Reduction, empty: Callable[[torch.dtype], float | int] | None = None) -> OpFn:
    """``empty`` gives the value of a reduction over no elements where torch refuses one."""

    def apply(inputs: Inputs, attrs: Attrs) -> Tensor:
        x = inputs[0]
        axes = axes_of(inputs, attrs, 1)
        keepdims = bool(attrs.get("keepdims", 1))
        if not axes:
            if attrs.get("noop_with_empty_axes", 0):
                return x
            axes = list(range(x.dim()))
        dims = tuple(axis_of(a, x.dim()) for a in axes)
        if empty is not None and any(x.shape[d] == 0 for d in dims):
            shape = [1 if d in dims else n for d, n in enumerate(x.shape)]
            out = torch.full(shape, empty(x.dtype), dtype=x.dtype, device=x.device)
            return out if keepdims else out.squeeze(dims)
        return fn(x, dims, keepdims)

    return apply


def _arg(fn: Callable[..., Tensor]) -> OpFn:
    def apply(inputs: Inputs, attrs: Attrs) -> Tensor:
        x = inputs[0]
        axis = axis_of(attrs.get("axis", 0), x.dim())
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


def _sum(x: Tensor, dims: tuple[int, ...], keep: bool) -> Tensor:
    return torch.sum(x, dim=dims, keepdim=keep).to(x.dtype)


OPS: dict[str, OpFn] = {
    "ReduceSum": widened(_reduce(_sum)),
    "ReduceMean": _reduce(lambda x, d, k: torch.mean(x, dim=d, keepdim=k)),
    "ReduceMax": widened(_reduce(lambda x, d, k: torch.amax(x, dim=d, keepdim=k), lowest)),
    "ReduceMin": widened(_reduce(lambda x, d, k: torch.amin(x, dim=d, keepdim=k), highest)),
    "ReduceProd": widened(_reduce(lambda x, d, k: _prod(x, d, k).to(x.dtype))),
    "ReduceL1": _reduce(lambda x, d, k: torch.sum(x.abs(), dim=d, keepdim=k).to(x.dtype)),
    "ReduceL2": _reduce(lambda x, d, k: torch.sqrt(torch.sum(x * x, dim=d, keepdim=k))),
    "ReduceSumSquare": _reduce(lambda x, d, k: torch.sum(x * x, dim=d, keepdim=k).to(x.dtype)),
    "ReduceLogSum": _reduce(lambda x, d, k: torch.log(torch.sum(x, dim=d, keepdim=k))),
    "ReduceLogSumExp": _reduce(lambda x, d, k: torch.logsumexp(x, dim=d, keepdim=k)),
    "ArgMax": _arg(torch.argmax),
    "ArgMin": _arg(torch.argmin),
}
