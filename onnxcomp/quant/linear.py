"""Linear (affine) quantisation: ``q = saturate(round(w / s) + z)``, ``w' = (q - z) * s``.

Symmetric quantisation uses the narrow range ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` with ``z = 0`` and
``s = max|w| / qmax``; affine quantisation uses the full signed range and a range that always
includes 0, so ``z`` is a representable integer. Either way every element comes back within
``s / 2`` of where it started (``|w - w'| <= s / 2``), with ``s`` the scale as stored in the
scale dtype (rounded up when cast, so the bound holds for the stored scale).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import ml_dtypes
import numpy as np

Reducer = Callable[..., np.ndarray]
# Elements of a weight coded at once by :func:`by_groups`: the float64 temporaries of the
# functions here (several times the chunk) stay in the tens of MB whatever the weight's size.
CHUNK_ELEMENTS = 1 << 21
MAX_THREADS = 8


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Signed integer range used for ``bits``-bit codes (narrow when symmetric)."""
    if bits not in (2, 4, 8):
        raise ValueError(f"bits must be 2, 4 or 8, not {bits}")
    high = 2 ** (bits - 1) - 1
    return (-high if symmetric else -high - 1), high


def param_shape(shape: tuple[int, ...], axis: int | None, block_size: int) -> tuple[int, ...]:
    """Shape of the scale (and zero point) DequantizeLinear expects for this layout."""
    if axis is None:
        return ()
    if block_size == 0:
        return (shape[axis],)
    blocked = list(shape)
    blocked[axis] = -(-shape[axis] // block_size)
    return tuple(blocked)


def reduce_groups(
    w: np.ndarray, axis: int | None, block_size: int, reducer: Reducer, *, exact: bool = False
) -> np.ndarray:
    """Apply ``reducer(groups, axis=-1)`` to each group of elements sharing one parameter.

    Returns an array of :func:`param_shape`. A last partial block is padded with NaN, so
    ``reducer`` must ignore NaN (``np.nanmax``, ``np.nanmean``, ...). Works in float64, or,
    with ``exact`` (a reducer whose result is one of its inputs: max, min, max of ``|w|``), in
    ``w``'s own float dtype, which gives the same values without a float64 copy of ``w``.
    """
    w = np.asarray(w)
    if not (exact and w.dtype.kind == "f"):
        w = w.astype(np.float64)
    if axis is None:
        return np.asarray(reducer(w.reshape(1, -1), axis=-1), dtype=np.float64).reshape(())
    if block_size == 0:
        grouped = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
        return np.asarray(reducer(grouped, axis=-1), dtype=np.float64)
    blocks = -(-w.shape[axis] // block_size)
    padding = [(0, 0)] * w.ndim
    padding[axis] = (0, blocks * block_size - w.shape[axis])
    padded = np.pad(w, padding, constant_values=np.nan)
    split = padded.reshape((*w.shape[:axis], blocks, block_size, *w.shape[axis + 1 :]))
    return np.asarray(reducer(np.moveaxis(split, axis + 1, -1), axis=-1), dtype=np.float64)


def expand(
    param: np.ndarray, shape: tuple[int, ...], axis: int | None, block_size: int
) -> np.ndarray:
    """Broadcast a per-tensor / per-channel / per-block parameter to the full ``shape``."""
    param = np.asarray(param)
    if axis is None:
        return np.broadcast_to(param, shape)
    if block_size == 0:
        view = [1] * len(shape)
        view[axis] = shape[axis]
        return np.broadcast_to(param.reshape(view), shape)
    return np.repeat(param, block_size, axis=axis).take(np.arange(shape[axis]), axis=axis)


def store_scale(scale: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Cast float64 scales to ``dtype``, never rounding one down (so error bounds hold) and
    never leaving a zero (an all-zero group gets scale 1; it quantises to zeros anyway)."""
    scale = np.asarray(scale, dtype=np.float64)
    info = ml_dtypes.finfo(dtype)
    safe = np.where(scale > 0, np.maximum(scale, float(info.tiny)), 1.0)
    stored = safe.astype(dtype)
    low = stored.astype(np.float64) < safe
    if np.any(low):
        bumped = (safe * (1 + 2 * float(info.eps))).astype(dtype)
        stored = np.where(low, bumped, stored).astype(dtype)
    return stored


def linear_params(
    w: np.ndarray,
    bits: int,
    *,
    axis: int | None,
    block_size: int = 0,
    symmetric: bool = True,
    dtype: np.dtype | type = np.float32,
    limit: int | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Scale (in ``dtype``) and zero point (int8, or None when symmetric) for ``w``.
    ``limit`` caps the code magnitude of symmetric codes below the narrow range (63: 7-bit
    weights, for integer kernels that overflow 16 bits with full 8-bit ones)."""
    qmin, qmax = qrange(bits, symmetric)
    if limit is not None:
        if not symmetric or not 0 < limit <= qmax:
            raise ValueError(f"limit must be in (0, {qmax}] and symmetric, not {limit}")
        qmax = limit
    if symmetric:
        amax = reduce_groups(
            w, axis, block_size, lambda g, axis: np.nanmax(np.abs(g), axis=axis), exact=True
        )
        return store_scale(amax / qmax, np.dtype(dtype)), None
    low = np.minimum(reduce_groups(w, axis, block_size, np.nanmin, exact=True), 0.0)
    high = np.maximum(reduce_groups(w, axis, block_size, np.nanmax, exact=True), 0.0)
    scale = store_scale((high - low) / (qmax - qmin), np.dtype(dtype))
    zero_point = np.clip(np.rint(qmin - low / scale.astype(np.float64)), qmin, qmax)
    return scale, zero_point.astype(np.int8)


def quantize(
    w: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray | None,
    bits: int,
    *,
    axis: int | None,
    block_size: int = 0,
    limit: int | None = None,
) -> np.ndarray:
    """Integer codes (int8 array) of ``w``; narrow range when ``zero_point`` is None, and
    within ``[-limit, limit]`` when given (as for :func:`linear_params`)."""
    qmin, qmax = qrange(bits, symmetric=zero_point is None)
    if limit is not None and zero_point is None:
        qmin, qmax = -limit, limit
    shape = np.shape(w)
    s = expand(np.asarray(scale, dtype=np.float64), shape, axis, block_size)
    q = np.array(w, dtype=np.float64)  # the one float64 temporary: the rest works in place
    np.divide(q, s, out=q)
    np.rint(q, out=q)
    if zero_point is not None:
        q += expand(zero_point.astype(np.float64), shape, axis, block_size)
    np.clip(q, qmin, qmax, out=q)
    return q.astype(np.int8)


def by_groups(
    code: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray | None]],
    w: np.ndarray,
    *,
    axis: int | None,
    block_size: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``code(w) -> (codes, scale, zero_point or None)`` applied to slices of ``w`` along
    ``axis`` of about :data:`CHUNK_ELEMENTS` elements that split no group sharing a parameter
    (a channel, a block), and joined: the same result as ``code(w)`` in the memory of a
    slice. Per-tensor layouts (``axis=None``) are one group, coded whole."""
    w = np.asarray(w)
    if axis is None or w.size <= CHUNK_ELEMENTS or w.shape[axis] <= 1:
        return code(w)
    length = w.shape[axis]
    step = max(1, CHUNK_ELEMENTS * length // w.size)
    if block_size:
        step = max(block_size, step // block_size * block_size)
    codes = np.empty(w.shape, dtype=np.int8)

    def one(start: int) -> tuple[np.ndarray, np.ndarray | None]:
        index: list = [slice(None)] * w.ndim
        index[axis] = slice(start, min(start + step, length))
        part_codes, scale, zero_point = code(w[tuple(index)])
        codes[tuple(index)] = part_codes
        return scale, zero_point

    # Slices are independent and numpy releases the GIL in its loops: one thread per core
    # (a few slices' temporaries in memory at once, each tens of MB).
    starts = range(0, length, step)
    workers = min(len(starts), os.cpu_count() or 1, MAX_THREADS)
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            parts = list(pool.map(one, starts))
    else:
        parts = [one(start) for start in starts]
    scales = [scale for scale, _ in parts]
    zeros = [zero_point for _, zero_point in parts]
    # Per channel, parameters are 1-D along the channels; per block they keep w's rank.
    joined = 0 if not block_size else axis
    zero_point = None if zeros[0] is None else np.concatenate(zeros, axis=joined)
    return codes, np.concatenate(scales, axis=joined), zero_point


def dequantize(
    q: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray | None,
    *,
    axis: int | None,
    block_size: int = 0,
) -> np.ndarray:
    """``(q - z) * s`` in the scale's dtype, as DequantizeLinear computes it."""
    shape = np.shape(q)
    centred = np.asarray(q, dtype=np.int32)
    if zero_point is not None:
        centred = centred - expand(zero_point.astype(np.int32), shape, axis, block_size)
    s = expand(np.asarray(scale, dtype=np.float32), shape, axis, block_size)
    return (centred.astype(np.float32) * s).astype(np.asarray(scale).dtype)


def quantize_bias(
    bias: np.ndarray, input_scale: float, weight_scale: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Int32 codes and scale of a Conv / Gemm bias for integer kernels: the scale is
    ``input_scale * weight_scale`` (per output channel when the weight's scale is), so the
    bias adds straight onto the int32 accumulator; codes saturate to the int32 range."""
    scale = (np.float32(input_scale) * np.asarray(weight_scale, dtype=np.float32)).astype(
        np.float32
    )
    scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
    info = np.iinfo(np.int32)
    codes = np.rint(np.asarray(bias, dtype=np.float64) / scale.astype(np.float64))
    return np.clip(codes, info.min, info.max).astype(np.int32), scale
