"""Unstructured magnitude masks: zero exactly the ``round(sparsity * size)`` lowest scores.

Ties are broken by position: among equal scores, the element with the lower flat (row-major)
index is pruned first; across tensors (global masks) earlier tensors come first. The threshold
is found with ``np.partition`` (linear time); only elements equal to it are ever ordered.

:func:`prune_smallest` applies such a mask to a float32 weight without making the mask: a
sample brackets the threshold, and one pass over the weight writes the pruned copy while it
gathers the few ``|w|`` in the bracket, among which the threshold is then selected (a radix
select on the bits of ``|w|`` when the bracket misses); on threads, in cache-sized pieces
(:mod:`onnxcomp.chunks`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import numpy as np

from onnxcomp import chunks

# Bits of a float32 |w| (sign cleared), read as an integer: for non-negative floats their
# order is the order of the numbers, +inf above every finite value, NaNs above +inf.
_MAGNITUDE = 0x7FFFFFFF
_INF = 0x7F800000
_BUCKET_BITS = 16  # the select counts the high 16 bits, then the low 16 in one bucket


def prune_count(size: int, sparsity: float) -> int:
    """How many of ``size`` elements a ``sparsity`` target zeroes: nearest integer, half up."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    # A small epsilon keeps products like 0.29 * 100 = 28.999999999999996 at 29.
    return min(size, math.floor(sparsity * size + 0.5 + 1e-9))


def magnitude_mask(scores: np.ndarray, sparsity: float) -> np.ndarray:
    """Keep mask zeroing exactly :func:`prune_count` of the lowest ``scores``."""
    scores = np.asarray(scores)
    flat = scores.reshape(-1)
    return _keep_flat(flat, prune_count(flat.size, sparsity)).reshape(scores.shape)


def global_magnitude_masks(scores: Sequence[np.ndarray], sparsity: float) -> list[np.ndarray]:
    """Keep masks for several tensors under one threshold: exactly ``round(sparsity * total)``
    elements are zeroed across all of them, the lowest scores wherever they are."""
    arrays = [np.asarray(s) for s in scores]
    if not arrays:
        return []
    flat = np.concatenate([a.reshape(-1).astype(np.float64, copy=False) for a in arrays])
    keep = _keep_flat(flat, prune_count(flat.size, sparsity))
    masks, start = [], 0
    for array in arrays:
        masks.append(keep[start : start + array.size].reshape(array.shape))
        start += array.size
    return masks


def _keep_flat(flat: np.ndarray, count: int) -> np.ndarray:
    keep = np.ones(flat.shape, dtype=bool)
    if count <= 0:
        return keep
    if count >= flat.size:
        keep[:] = False
        return keep
    threshold = np.partition(flat, count - 1)[count - 1]
    if np.isnan(threshold):
        # NaN scores sort last: they are pruned only once every number is.
        nan = np.isnan(flat)
        keep[~nan] = False
        keep[np.flatnonzero(nan)[: count - int(np.count_nonzero(~nan))]] = False
        return keep
    below = flat < threshold
    keep[below] = False
    keep[np.flatnonzero(flat == threshold)[: count - int(np.count_nonzero(below))]] = False
    return keep


def prune_smallest(
    array: np.ndarray, count: int, out: np.ndarray | None = None
) -> tuple[np.ndarray | None, int]:
    """``array`` (float32) with its ``count`` smallest ``|w|`` set to +0, exactly as
    ``np.where(magnitude_mask(np.abs(array), s), array, 0)`` for ``count = prune_count(size,
    s)`` (the same ties pruned, NaN last), and the zero count of that result. The array is
    None when no new zero would be made (the result equals ``array`` up to the sign of zeros).
    ``out`` (float32, ``array``'s shape, not overlapping it) is the memory the result is
    written to, else new memory; what it held is overwritten (also when the result is None).

    No mask, sort or copy of ``|w|``: one pass writes the result with every ``|w|`` below a
    sampled window (:func:`sample_window`) zeroed and gathers the window's keys, where the
    count-th smallest is selected; the few below it are then zeroed (:func:`_prune_in_window`).
    When the window misses, the value is selected on the bits of ``|w|``
    (:func:`counted_threshold`) and a second pass writes the result. Memory is the result,
    a few pieces per thread and the window's keys and positions (about 3% of the weight's
    bytes at half sparsity)."""
    if array.dtype != np.float32:
        raise TypeError(f"prune_smallest takes float32, not {array.dtype}")
    if out is None:
        out = np.empty(array.shape, np.float32)
    elif out.dtype != np.float32 or out.shape != array.shape or not out.flags.c_contiguous:
        raise ValueError("prune_smallest: out must be C-contiguous float32 of the array's shape")
    flat = np.ascontiguousarray(array).reshape(-1)
    size = flat.size
    if count <= 0 or count >= size:
        zeros = size - int(np.count_nonzero(flat))
        if count <= 0 or zeros == size:
            return None, zeros
        out.fill(0)
        return out, size
    bits = flat.view(np.uint32)
    if size > SAMPLE:
        window = sample_window(bits, count)
        done = _prune_in_window(out, bits, count, *window) if window else None
        if done is not None:
            return done
        threshold, below, ties = counted_threshold(bits, count)
    else:  # small: the value is selected from all of it
        keys = np.minimum(bits & np.uint32(_MAGNITUDE), np.uint32(NAN_KEY))
        threshold, below, ties = _selected(keys, count)
    if threshold == 0:
        return None, ties  # only zeros go: they are the zeros there were
    is_tie: Callable[[np.ndarray], np.ndarray]
    if threshold == NAN_KEY:  # every number goes, then the first NaNs in flat order
        keep_above, is_tie = _MAGNITUDE, functools.partial(_above, limit=_INF)
    else:
        keep_above, is_tie = threshold, functools.partial(_equal, value=threshold)
    result, out = out, out.reshape(-1).view(np.uint32)
    split = ties > count - below  # the later ties stay: they are copied back after
    equal = split and threshold != NAN_KEY  # where they are is counted in the same pass
    step = chunks.SLICE
    found = chunks.map_slices(
        functools.partial(_keep_above, bits, out, keep_above, equal), size, step
    )
    if split:
        _restore_ties(bits, out, is_tie, count - below, found if equal else None, step)
    return result, count


# The threshold key :func:`counted_threshold` and :func:`_selected` give when the
# count-th smallest |w| is a NaN (all NaNs are one value for the ranking, as for np.partition).
NAN_KEY = _INF + 1
SAMPLE = 1 << 16  # elements sampled to bracket the threshold
# The one-read pass goes 4 pieces at a time: its ten numpy calls a piece then cost ~20% less
# per element than one piece at a time (Zen 4: the 1 MB buffers stay in L2/L3).
_WINDOW_PIECES = 4


def counted_threshold(bits: np.ndarray, count: int) -> tuple[int, int, int]:
    """``(key, below, ties)``: the bits of the ``count``-th smallest ``|w|`` of float32
    ``bits`` (:data:`NAN_KEY` for a NaN), how many ``|w|`` are smaller and how many equal it.

    A radix select: a histogram of the high 16 bits of ``|w|`` finds the bucket holding it, a
    histogram of the low 16 bits inside that bucket the value; two reads, any data."""
    size = bits.size
    coarse = np.sum(chunks.map_slices(functools.partial(_coarse_histogram, bits), size), axis=0)
    cumulative = np.cumsum(coarse)
    # Buckets above +inf's hold NaNs only: a threshold there is settled in +inf's bucket.
    bucket = min(int(np.searchsorted(cumulative, count)), _INF >> _BUCKET_BITS)
    before = int(cumulative[bucket - 1]) if bucket else 0
    low = bucket << _BUCKET_BITS
    fine = np.sum(chunks.map_slices(functools.partial(_fine_histogram, bits, low), size), axis=0)
    if low == _INF and count > before + int(fine[0]):
        numbers = before + int(fine[0])
        return NAN_KEY, numbers, size - numbers
    fine_cumulative = np.cumsum(fine)
    index = int(np.searchsorted(fine_cumulative, count - before))
    below = before + (int(fine_cumulative[index - 1]) if index else 0)
    return low + index, below, int(fine[index])


def sample_window(bits: np.ndarray, count: int) -> tuple[int, int, float] | None:
    """``(low, high, share)``: a window of ``|w|`` keys (bits of float32 ``bits`` with the sign
    cleared) likely to hold the ``count``-th smallest, ``low <= key < high``, from a sample.

    :data:`SAMPLE` elements (evenly spread, jittered so that no row or column pattern lines up
    with the stride) give the window with a margin of 4 standard deviations of the sample
    quantile; ``share`` is the sample's share in it (about 1.6% at half sparsity). The window
    stops below the NaNs (None when the sample puts it among them): a NaN threshold (all NaNs
    rank as one value, last) is left to the counted select."""
    size = bits.size
    step = size // SAMPLE
    jitter = np.random.default_rng(0).integers(0, step, size=SAMPLE)
    picks = np.arange(SAMPLE, dtype=np.int64) * step + jitter
    share = count / size
    margin = 4.0 * math.sqrt(SAMPLE * share * (1.0 - share)) + 16.0
    first, last = math.floor(share * SAMPLE - margin), math.ceil(share * SAMPLE + margin)
    ends = [end for end in (first, last) if 0 <= end < SAMPLE]
    sample = np.partition(bits[picks] & np.uint32(_MAGNITUDE), ends) if ends else None
    low = int(sample[first]) if sample is not None and first >= 0 else 0
    high = int(sample[last]) + 1 if sample is not None and last < SAMPLE else NAN_KEY
    if low >= NAN_KEY:
        return None
    return low, min(high, NAN_KEY), (min(last, SAMPLE) - max(first, 0) + 1) / SAMPLE


def _prune_in_window(
    result: np.ndarray, bits: np.ndarray, count: int, low: int, high: int, share: float
) -> tuple[np.ndarray | None, int] | None:
    """:func:`prune_smallest`'s result, written to ``result``, in one read of ``bits`` when the
    ``count``-th smallest key lies in ``[low, high)`` (where the sample put ``share`` of its
    elements), else None.

    The read writes every ``|w| >= low`` (the rest is below the threshold: zeros) and gathers
    the keys in the window and where they are; the threshold is selected among those, and the
    window's keys below it, then its first ties in flat order, are zeroed in place. None also
    when the window gathers far more than the sample promised (many ties: the counted select
    is then cheaper than gathering them)."""
    size = bits.size
    out = result.reshape(-1).view(np.uint32)
    limit = 4.0 * share  # of the elements gathered; past it, ties are many
    step = chunks.SLICE
    parts = chunks.map_slices(
        functools.partial(_keep_from, bits, out, low, high - low, limit), size, step
    )
    if any(part is None for part in parts):
        return None
    below = sum(part[0] for part in parts)  # type: ignore[index]
    offsets = [part[2] for part in parts]  # type: ignore[index]
    inside = sum(found.size for found in offsets)
    if not below < count <= below + inside:
        return None
    key, below_inside, ties = _selected(np.concatenate(offsets), count - below)
    if low + key == 0:
        return None, ties  # only zeros go: they are the zeros there were

    def zero_below(index: int) -> None:
        _, where, found = parts[index]  # type: ignore[misc]
        out[index * step + where[found < key].astype(np.int64)] = 0

    chunks.parallel_map(zero_below, range(len(parts)))  # scattered writes: both cores
    ties_to_zero = count - below - below_inside  # the first ties in flat order
    for index, (_, where, found) in enumerate(parts):  # type: ignore[misc]
        if ties_to_zero <= 0:
            break
        ties = where[found == key][:ties_to_zero]
        out[index * step + ties.astype(np.int64)] = 0
        ties_to_zero -= ties.size
    return result, count


def _selected(keys: np.ndarray, count: int) -> tuple[int, int, int]:
    """The ``count``-th smallest of ``keys``, how many are smaller and how many equal it."""
    key = int(np.partition(keys, count - 1)[count - 1])
    return key, int(np.count_nonzero(keys < key)), int(np.count_nonzero(keys == key))


def _keep_from(
    bits: np.ndarray, out: np.ndarray, low: int, width: int, limit: float, start: int, stop: int
) -> tuple[int, np.ndarray, np.ndarray] | None:
    """``out = bits where |w| >= low, else 0`` over ``[start, stop)``, and: how many ``|w| <
    low``, where (from ``start``) and ``|w| - low`` of those in ``[low, low + width)``, or None
    past ``limit`` times the slice's size of those.

    In integer arithmetic: ``d = (low - 1) - |w|`` is negative exactly where ``|w| >= low``
    (``d >> 31`` is then all ones) and, as unsigned, at least ``2**32 - width`` exactly in the
    window (both ranges of int32: ``0 <= |w| < 2**31``)."""
    source, target = bits.view(np.int32), out.view(np.int32)
    piece = _WINDOW_PIECES * chunks.PIECE
    buffer = np.empty(piece, np.int32)
    flags = np.empty(piece, np.bool_)
    edge = np.uint32((1 << 32) - width)
    most = limit * (stop - start) + piece
    kept = gathered = 0
    where, found = [], []
    for begin, end in chunks.pieces(start, stop, piece):
        d, inside = buffer[: end - begin], flags[: end - begin]
        np.bitwise_and(source[begin:end], _MAGNITUDE, out=d)
        np.subtract(np.int32(low - 1), d, out=d)
        np.greater_equal(d.view(np.uint32), edge, out=inside)
        at = np.flatnonzero(inside)
        gathered += at.size
        if gathered > most:
            return None
        found.append(np.invert(d[at]).view(np.uint32))  # -1 - d = |w| - low
        where.append((at + (begin - start)).astype(np.uint32))  # slices are < 2**32 long
        np.right_shift(d, 31, out=d)
        kept -= int(np.add.reduce(d, dtype=np.int32))  # d is -1 where kept, else 0
        np.bitwise_and(d, source[begin:end], out=target[begin:end])
    empty = np.empty(0, np.uint32)
    return (
        stop - start - kept,
        np.concatenate(where) if where else empty,
        np.concatenate(found) if found else empty,
    )


def _coarse_histogram(bits: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Counts of the high 16 bits of ``|w|`` (the top one, the sign, cleared: 15) over
    ``bits[start:stop]``."""
    size = 1 << (_BUCKET_BITS - 1)
    counts = np.zeros(size, np.int64)
    buffer = np.empty(chunks.PIECE, np.uint32)
    for begin, end in chunks.pieces(start, stop):
        high = buffer[: end - begin]
        np.right_shift(bits[begin:end], _BUCKET_BITS, out=high)
        high &= size - 1  # (folding the sign's half after a 65536-bin count is ~5x slower)
        counts += np.bincount(high, minlength=size)
    return counts


def _fine_histogram(bits: np.ndarray, low: int, start: int, stop: int) -> np.ndarray:
    """Counts of ``|w| - low`` over ``bits[start:stop]``, for ``|w|`` in one high bucket."""
    counts = np.zeros(1 << _BUCKET_BITS, np.int64)
    buffer = np.empty(chunks.PIECE, np.uint32)
    for begin, end in chunks.pieces(start, stop):
        offset = buffer[: end - begin]
        np.bitwise_and(bits[begin:end], _MAGNITUDE, out=offset)
        offset -= np.uint32(low)  # below the bucket wraps round to large values
        counts += np.bincount(offset[offset < (1 << _BUCKET_BITS)], minlength=1 << _BUCKET_BITS)
    return counts


def _keep_above(
    bits: np.ndarray, out: np.ndarray, limit: int, count_equal: bool, start: int, stop: int
) -> int:
    """``out = bits where |w| > limit, else 0`` over ``[start, stop)``, in integer arithmetic:
    ``(limit - |w|) >> 31`` is all ones exactly where ``|w| > limit``. Returns how many
    ``|w| == limit`` (0 unless ``count_equal``)."""
    source, target = bits.view(np.int32), out.view(np.int32)
    buffer = np.empty(chunks.PIECE, np.int32)
    equal = 0
    for begin, end in chunks.pieces(start, stop):
        mask = buffer[: end - begin]
        np.bitwise_and(source[begin:end], _MAGNITUDE, out=mask)
        np.subtract(np.int32(limit), mask, out=mask)
        if count_equal:
            equal += int(np.count_nonzero(mask == 0))
        np.right_shift(mask, 31, out=mask)
        np.bitwise_and(mask, source[begin:end], out=target[begin:end])
    return equal


def _equal(bits: np.ndarray, value: int) -> np.ndarray:
    return (bits & _MAGNITUDE) == value


def _above(bits: np.ndarray, limit: int) -> np.ndarray:
    return (bits & _MAGNITUDE) > limit


def _restore_ties(
    bits: np.ndarray,
    out: np.ndarray,
    is_tie: Callable[[np.ndarray], np.ndarray],
    skip: int,
    counts: list[int] | None,
    step: int,
) -> None:
    """Copy into ``out`` every tie of ``bits`` but the first ``skip`` in flat order, given the
    tie count of each slice of ``step`` elements (counted here when None)."""
    size = bits.size

    def count(start: int, stop: int) -> int:
        return sum(int(np.count_nonzero(is_tie(bits[b:e]))) for b, e in chunks.pieces(start, stop))

    if counts is None:
        counts = chunks.map_slices(count, size, step)
    firsts = np.cumsum([0, *counts]).tolist()  # ties before each slice

    def restore(start: int, stop: int) -> None:
        seen = firsts[start // step]
        if firsts[start // step + 1] <= skip:
            return  # every tie in this slice is among the first ``skip``
        for begin, end in chunks.pieces(start, stop):
            found = np.flatnonzero(is_tie(bits[begin:end]))
            kept = found[max(skip - seen, 0) :] + begin
            seen += found.size
            out[kept] = bits[kept]

    chunks.map_slices(restore, size, step)
