"""Clipped quantisation ranges chosen by output error: for each block of a weight, the fraction
of its range that rounds best for the inputs it meets (AWQ's clipping step; GPTQ uses it for
its group scales). Clipping a few large weights gives the rest a finer grid; whether that pays
is judged by ``e^T H e`` on the block's inputs, never by the weight error alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from onnxcomp.quant.linear import dequantize, linear_params, quantize

CLIP_RATIOS = tuple(1 - i / 40 for i in range(17))  # 1.0 down to 0.6


def clip_search(
    w: np.ndarray,
    hessian: np.ndarray,
    bits: int,
    *,
    block_size: int = 0,
    symmetric: bool = True,
    dtype: np.dtype | type = np.float32,
    ratios: Sequence[float] = CLIP_RATIOS,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Scale and zero point of ``w`` (``[in, out]``, blocks of ``block_size`` input rows; 0:
    one block) from a clipped range: for each block and output column, the fraction of the
    range (1 = no clipping) whose rounding gives the smallest output error ``e^T H_bb e`` on
    that block's inputs (AWQ's clipping step; cross-block terms of ``H`` are left out).
    Returns them in :func:`onnxcomp.quant.linear_params`'s ``axis=0`` layout (``axis=1``,
    per column, when ``block_size`` is 0)."""
    w = np.asarray(w, dtype=np.float64)
    rows, cols = w.shape
    block = block_size or rows
    starts = range(0, rows, block)
    best_err = np.full((len(starts), cols), np.inf)
    best_scale = best_zero = None
    for ratio in ratios:
        scale, zero = linear_params(
            w * ratio, bits, axis=0, block_size=block, symmetric=symmetric, dtype=dtype
        )
        codes = quantize(w, scale, zero, bits, axis=0, block_size=block)
        err = w - dequantize(codes, scale, zero, axis=0, block_size=block)
        per_block = np.stack([
            np.sum(e * (hessian[s : s + block, s : s + block] @ e), axis=0)
            for s in starts
            for e in (err[s : s + block],)
        ])  # fmt: skip
        better = per_block < best_err
        best_err = np.where(better, per_block, best_err)
        best_scale = scale if best_scale is None else np.where(better, scale, best_scale)
        if zero is not None:
            best_zero = zero if best_zero is None else np.where(better, zero, best_zero)
    assert best_scale is not None
    if not block_size:
        return best_scale[0], None if best_zero is None else best_zero[0]
    return best_scale, best_zero
