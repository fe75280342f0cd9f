"""Linear (affine) quantisation: ``q = saturate(round(w / s) + z)``, ``w' = (q - z) * s``.

Symmetric quantisation uses the narrow range ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` with ``z = 0`` and
``s = max|w| / qmax``; affine quantisation uses the full signed range and a range that always
includes 0, so ``z`` is a representable integer. Either way every element comes back within
``s / 2`` of where it started (``|w - w'| <= s / 2``), with ``s`` the scale as stored in the
scale dtype (rounded up when cast, so the bound holds for the stored scale).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import ml_dtypes
import numpy as np

from onnxcomp import chunks

Reducer = Callable[..., np.ndarray]
# Elements of a weight coded at once by :func:`by_groups`: the float64 temporaries of the
# functions here (several times the chunk) stay in the tens of MB whatever the weight's size.
CHUNK_ELEMENTS = 1 << 21
# Elements worked on at once inside one call: each pass over a piece's few float32 / float64
# temporaries stays in the core's L2 cache instead of streaming a slice through memory
# (4-10x faster on a 4096x8192 weight than whole-slice temporaries; 32K-128K all do as well).
PIECE_ELEMENTS = chunks.PIECE
# numpy loops over runs shorter than this (a block of 32 along the last axis) pay a per-run
# overhead many times their work: such layouts are rearranged a piece at a time first.
SHORT_RUN = 64
# Weight dtypes coded in float32: every value converts to float32 exactly.
FLOAT32_EXACT = frozenset(np.dtype(t) for t in (np.float32, np.float16, ml_dtypes.bfloat16))


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
    if w.shape[axis] % block_size:
        padding = [(0, 0)] * w.ndim
        padding[axis] = (0, blocks * block_size - w.shape[axis])
        w = np.pad(w, padding, constant_values=np.nan)
    split = w.reshape((*w.shape[:axis], blocks, block_size, *w.shape[axis + 1 :]))
    return np.asarray(reducer(np.moveaxis(split, axis + 1, -1), axis=-1), dtype=np.float64)


def split3(shape: tuple[int, ...], axis: int) -> tuple[int, int, int]:
    """``shape`` as ``(before, along, after)`` around ``axis``: how the layouts here see a
    weight (a parameter varies along the middle axis only)."""
    return (
        int(np.prod(shape[:axis], dtype=np.int64)),
        shape[axis],
        int(np.prod(shape[axis + 1 :], dtype=np.int64)),
    )


def pieces(shape: tuple[int, ...], target: int = 0) -> Iterator[tuple]:
    """Index tuples that cut an array of ``shape`` into C-ordered pieces of at most about
    ``target`` elements (:data:`PIECE_ELEMENTS` by default): whole trailing axes, a run of
    indices along the axis before them, single indices along the axes before that."""
    target = target or PIECE_ELEMENTS
    inner, split = 1, len(shape)
    while split > 0 and inner * shape[split - 1] <= target:
        split -= 1
        inner *= shape[split]
    if split == 0:
        yield ()
        return
    step = max(1, target // inner)
    length = shape[split - 1]
    for lead in np.ndindex(*shape[: split - 1]):
        for start in range(0, length, step):
            yield (*lead, slice(start, min(start + step, length)))


def broadcast_index(index: tuple, shape: tuple[int, ...]) -> tuple:
    """``index`` (from :func:`pieces`) for an array that broadcasts along its length-1 axes."""
    return tuple(
        i if size > 1 else (0 if isinstance(i, int) else slice(None))
        for i, size in zip(index, shape, strict=False)
    )


def _views(w: np.ndarray, param: np.ndarray | None, axis: int | None, block_size: int) -> list:
    """``(w_view, param_view)`` pairs covering ``w`` in which each parameter broadcasts over its
    group: one flat view per tensor, ``(before, channels, after)`` per channel, and per block
    ``(before, blocks, block, after)`` for whole blocks plus ``(before, rest, after)`` for a
    last partial one. ``param`` may be None (views of ``w`` only, paired with None)."""
    if axis is None:
        flat = w.reshape(-1)
        return [(flat, None if param is None else np.asarray(param).reshape(1))]
    before, along, after = split3(w.shape, axis)
    w3 = w.reshape(before, along, after)
    if block_size == 0:
        return [(w3, None if param is None else np.asarray(param).reshape(1, along, 1))]
    whole = along // block_size
    p3 = None if param is None else np.asarray(param).reshape(before, -1, after)
    views = []
    if whole:
        main = w3[:, : whole * block_size].reshape(before, whole, block_size, after)
        views.append((main, None if p3 is None else p3[:, :whole, None, :]))
    if along % block_size:
        views.append((w3[:, whole * block_size :], None if p3 is None else p3[:, whole:]))
    return views


def group_extremes(
    w: np.ndarray, axis: int | None, block_size: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """``(min, max)`` of each group (float64, :func:`param_shape`), reduced in ``w``'s own
    dtype without copies; None when a group holds NaN (the NaN-ignoring reductions of
    :func:`reduce_groups` decide those)."""
    shape = param_shape(w.shape, axis, block_size)
    lows, highs = [], []
    for view, _ in _views(w, None, axis, block_size):
        if axis is None:
            reduce_axes: tuple[int, ...] = (0,)
        elif block_size == 0:
            reduce_axes = (0, 2)
        else:
            reduce_axes = (2,) if view.ndim == 4 else (1,)
        if view.ndim == 4 and view.shape[3] < SHORT_RUN:
            low, high = _block_extremes(view)
        else:
            low, high = _extremes(view, reduce_axes)
            if not (view.ndim == 3 and block_size > 0):  # a partial last block keeps its axis
                low, high = low.squeeze(reduce_axes), high.squeeze(reduce_axes)
        lows.append(low)
        highs.append(high)
    low = np.concatenate(lows, axis=1) if len(lows) > 1 else lows[0]
    high = np.concatenate(highs, axis=1) if len(highs) > 1 else highs[0]
    low = np.asarray(low, dtype=np.float64).reshape(shape)
    high = np.asarray(high, dtype=np.float64).reshape(shape)
    if np.isnan(low).any() or np.isnan(high).any():
        return None
    return low, high


def _extremes(view: np.ndarray, reduce_axes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """``np.min`` and ``np.max`` of ``view`` over ``reduce_axes`` (kept as length-1 axes), both
    taken from each cache-sized piece in turn (the view is read from memory once, not once
    per reduction), slices of it on a thread per core. Pieces run along the first axis of
    more than one index; min and max are exact in any order, NaN propagates, so the results
    are those of whole-array reductions (up to the sign of a zero extreme)."""
    split = 0 if view.shape[0] > 1 or view.ndim == 1 else 1
    count = view.shape[split]
    per_index = view.size // count if count else 0
    if count < 2 or view.size <= PIECE_ELEMENTS:
        return np.min(view, reduce_axes, keepdims=True), np.max(view, reduce_axes, keepdims=True)
    across = split in reduce_axes  # pieces then reduce to the same groups: combined after
    step = max(1, PIECE_ELEMENTS // per_index)
    lead = (slice(None),) * split

    def reduce(start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        lows, highs = [], []
        for begin, end in chunks.pieces(start, stop, step):
            piece = view[(*lead, slice(begin, end))]
            low = np.min(piece, reduce_axes, keepdims=True)
            high = np.max(piece, reduce_axes, keepdims=True)
            if across and lows:
                np.minimum(lows[0], low, out=lows[0])
                np.maximum(highs[0], high, out=highs[0])
            else:
                lows.append(low)
                highs.append(high)
        return _joined(lows, split, across, np.minimum), _joined(highs, split, across, np.maximum)

    with np.errstate(invalid="ignore"):  # NaN: propagated, as whole reductions do
        parts = chunks.map_slices(reduce, count, max(step, chunks.SLICE // per_index))
        return (
            _joined([low for low, _ in parts], split, across, np.minimum),
            _joined([high for _, high in parts], split, across, np.maximum),
        )


def _joined(parts: list[np.ndarray], axis: int, across: bool, combine: np.ufunc) -> np.ndarray:
    """Partial extremes of consecutive pieces: combined (pieces of the same groups) or
    concatenated along ``axis`` (pieces of different groups)."""
    if len(parts) == 1:
        return parts[0]
    return combine.reduce(parts) if across else np.concatenate(parts, axis=axis)


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
    low = np.flatnonzero(stored.astype(np.float64) < safe)  # about half of them
    if low.size:
        bumped = safe.reshape(-1)[low] * (1 + 2 * float(info.eps))
        stored.reshape(-1)[low] = bumped.astype(dtype)
    return stored


def _block_extremes(view: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-block min and max of ``(before, blocks, block, after)`` with a short ``after``:
    numpy reduces short contiguous runs ~20x slower per element than long ones, so each
    piece is copied with the block axis first and reduced across rows."""
    before, blocks, block, after = view.shape
    low = np.empty((before, blocks, after), dtype=view.dtype)
    high = np.empty((before, blocks, after), dtype=view.dtype)
    rows = max(1, PIECE_ELEMENTS // (blocks * block * after))
    size = min(before, rows) * blocks * block * after
    indices = list(pieces((before, blocks), max(1, PIECE_ELEMENTS // (block * after))))
    per_thread = -(-len(indices) // min(os.cpu_count() or 1, chunks.MAX_THREADS))

    def reduce(first: int) -> None:  # a run of pieces, with a buffer of its own
        buffer = np.empty(size, dtype=view.dtype)
        for index in indices[first : first + per_thread]:
            part = view[index]
            moved = np.moveaxis(part, -2, 0)
            rows_first = buffer[: part.size].reshape(moved.shape)
            np.copyto(rows_first, moved)
            np.min(rows_first, axis=0, out=low[index])
            np.max(rows_first, axis=0, out=high[index])

    chunks.parallel_map(reduce, range(0, len(indices), per_thread))
    return low, high


class NonFiniteWeight(ValueError):
    """A weight holding inf or NaN, which has no linear codes."""


def linear_params(
    w: np.ndarray,
    bits: int,
    *,
    axis: int | None,
    block_size: int = 0,
    symmetric: bool = True,
    dtype: np.dtype | type = np.float32,
    limit: int | None = None,
    finite: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Scale (in ``dtype``) and zero point (int8, or None when symmetric) for ``w``.
    ``limit`` caps the code magnitude of symmetric codes below the narrow range (63: 7-bit
    weights, for integer kernels that overflow 16 bits with full 8-bit ones). ``finite``:
    raise :class:`NonFiniteWeight` for a float ``w`` holding inf or NaN (seen in the groups'
    extremes: no pass over ``w`` of its own) instead of coding around them."""
    qmin, qmax = qrange(bits, symmetric)
    if limit is not None:
        if not symmetric or not 0 < limit <= qmax:
            raise ValueError(f"limit must be in (0, {qmax}] and symmetric, not {limit}")
        qmax = limit
    w = np.asarray(w)
    floating = w.dtype.kind == "f" or w.dtype in FLOAT32_EXACT
    extremes = group_extremes(w, axis, block_size) if floating else None
    if finite and floating and (
        extremes is None or not all(np.isfinite(e).all() for e in extremes)
    ):
        raise NonFiniteWeight("the weight holds inf or NaN")
    if symmetric:
        if extremes is None:
            amax = reduce_groups(
                w, axis, block_size, lambda g, axis: np.nanmax(np.abs(g), axis=axis), exact=True
            )
        else:  # max |w| without an |w| copy; NaN-free groups, so the same values
            amax = np.maximum(extremes[1], -extremes[0])
        return store_scale(amax / qmax, np.dtype(dtype)), None
    if extremes is None:
        extremes = (
            reduce_groups(w, axis, block_size, np.nanmin, exact=True),
            reduce_groups(w, axis, block_size, np.nanmax, exact=True),
        )
    low, high = np.minimum(extremes[0], 0.0), np.maximum(extremes[1], 0.0)
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
    within ``[-limit, limit]`` when given (as for :func:`linear_params`).

    The codes are ``clip(rint(w / s) + z)`` with ``w / s`` divided in float64. Weights whose
    dtype converts to float32 exactly, with scales that do too, are divided in float32 a
    cache-sized piece at a time: the float32 quotient is the exact one correctly rounded, as
    is the float64 one, and rounding is monotonic, so both lie on the same side of every
    half-integer float32 holds (all of them below 2^23; codes saturate long before) and
    round to the same integer, unless the float32 quotient lands on a half-integer itself:
    those elements alone are divided again in float64."""
    qmin, qmax = qrange(bits, symmetric=zero_point is None)
    if limit is not None and zero_point is None:
        qmin, qmax = -limit, limit
    w = np.asarray(w)
    scale = np.asarray(scale)
    scale64 = scale.astype(np.float64)
    if scale.dtype in FLOAT32_EXACT:  # float32 already (float16, bfloat16: exactly)
        exact, scale32 = True, scale.astype(np.float32)
    else:
        scale32 = scale64.astype(np.float32)
        exact = np.array_equal(scale32, scale64)
    if w.dtype in FLOAT32_EXACT and exact:
        codes = np.empty(w.shape, dtype=np.int8)
        zero32 = None if zero_point is None else np.asarray(zero_point, dtype=np.float32)
        scales = _views(codes, scale32, axis, block_size)
        zeros = _views(codes, zero32, axis, block_size)
        tasks = []
        for (part, _), (out, s), (_, z) in zip(
            _views(w, None, axis, block_size), scales, zeros, strict=True
        ):
            for index in _spans(part.shape):
                tasks.append((
                    part[index], s[broadcast_index(index, s.shape)],
                    None if z is None else z[broadcast_index(index, z.shape)], out[index],
                ))  # fmt: skip
        chunks.parallel_map(lambda task: _round_pieces(*task, qmin, qmax), tasks)
        return codes
    shape = w.shape
    s = expand(scale64, shape, axis, block_size)
    q = np.array(w, dtype=np.float64)  # the one float64 temporary: the rest works in place
    np.divide(q, s, out=q)
    np.rint(q, out=q)
    if zero_point is not None:
        q += expand(zero_point.astype(np.float64), shape, axis, block_size)
    np.clip(q, qmin, qmax, out=q)
    return q.astype(np.int8)


def _round_pieces(
    w: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray | None,
    out: np.ndarray,
    qmin: int,
    qmax: int,
) -> None:
    """``out = clip(rint(w / scale) + zero_point)`` in float32 with the float64 fix-up of
    :func:`quantize`, a piece of ``w`` at a time (``scale`` and ``zero_point`` broadcast)."""
    size = min(w.size, PIECE_ELEMENTS)
    quotient_buffer = np.empty(size, dtype=np.float32)
    rounded_buffer = np.empty(size, dtype=np.float32)
    for index in pieces(w.shape):
        part = w[index]
        param = broadcast_index(index, scale.shape)
        quotient = quotient_buffer[: part.size].reshape(part.shape)
        rounded = rounded_buffer[: part.size].reshape(part.shape)
        divisor = scale[param]
        offset = None if zero_point is None else zero_point[param]
        if part.ndim and part.shape[-1] < SHORT_RUN:
            divisor, offset = _dense(divisor, part.shape), _dense(offset, part.shape)
        np.divide(part, divisor, out=quotient)
        np.rint(quotient, out=rounded)
        np.subtract(quotient, rounded, out=quotient)  # in [-0.5, 0.5]; +-0.5 only at halves
        if part.size and not (quotient.min() > -0.5 and quotient.max() < 0.5):
            halves = np.nonzero(np.abs(quotient) == 0.5)
            if halves[0].size:
                exact = np.broadcast_to(divisor, part.shape)[halves].astype(np.float64)
                rounded[halves] = np.rint(part[halves].astype(np.float64) / exact)
        if offset is not None:
            np.add(rounded, offset, out=rounded)
        np.clip(rounded, qmin, qmax, out=rounded)
        np.copyto(out[index], rounded, casting="unsafe")


def _spans(shape: tuple[int, ...]) -> list[tuple]:
    """Index tuples cutting ``shape`` along its first axis longer than 1 into spans of about
    :data:`CHUNK_ELEMENTS`: the work of one thread at a time."""
    axis = next((i for i, size in enumerate(shape) if size > 1), None)
    if axis is None:
        return [()]
    inner = int(np.prod(shape[axis + 1 :], dtype=np.int64))
    step = max(1, CHUNK_ELEMENTS // max(inner, 1))
    lead = (slice(None),) * axis
    return [(*lead, slice(i, min(i + step, shape[axis]))) for i in range(0, shape[axis], step)]


def _dense(param: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray | None:
    """``param`` repeated along its broadcast axes to ``shape`` (np.repeat copies runs in
    blocks, where broadcasting in a ufunc loops over each short run)."""
    if param is None:
        return None
    for axis, (size, full) in enumerate(zip(param.shape, shape, strict=True)):
        if size == 1 and full > 1:
            param = np.repeat(param, full, axis=axis)
    return param


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

    # Slices are independent: one thread per core (a few slices' temporaries at once).
    parts = chunks.parallel_map(one, range(0, length, step))
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
