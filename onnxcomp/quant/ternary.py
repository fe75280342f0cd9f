"""Binary and ternary weight codes with one scale ``alpha`` per channel or block.

- :func:`binarize`: ``w' = alpha * sign(w)`` with ``alpha = mean |w|`` (XNOR-Net), the
  least-squares scale for sign codes.
- :func:`ternarize`: ``w' = alpha * t``, ``t`` in {-1, 0, +1}, ``t = sign(w)`` where
  ``|w| > delta``. Rule ``"twn"`` is Ternary Weight Networks' ``delta = 0.7 * mean |w|``;
  rule ``"optimal"`` (default) picks, per group, the threshold that minimises
  ``||w - alpha t||^2``: keeping the ``k`` largest magnitudes costs
  ``||w||^2 - (sum of those k)^2 / k``, so one sort and a cumulative sum find the best ``k``.
  Its reconstruction error is never above TWN's, for which ``alpha`` is also the mean of
  the kept magnitudes.

Neither keeps accuracy without fine-tuning; they are the starting point for distillation.
Codes are int8 arrays; scales are float64 (callers cast them to the weight's dtype).

Float weights are coded a cache-sized piece at a time without float64 copies of the weight.
The means are float64 sums of float32 magnitudes, whose last bit depends on the order they
are added in: :func:`_group_sums` adds them exactly as ``np.nanmean`` over
:func:`~onnxcomp.quant.linear.reduce_groups`' layout does (pairwise along contiguous groups,
one row after another along strided ones), so the results are bit for bit those of the
plain formulation (tests/quant/test_ternary.py keeps it as the reference).
"""

from __future__ import annotations

import warnings
from typing import Literal

import ml_dtypes
import numpy as np

from onnxcomp.quant import linear
from onnxcomp.quant.linear import (
    FLOAT32_EXACT,
    broadcast_index,
    expand,
    param_shape,
    pieces,
    reduce_groups,
    split3,
)

TernaryRule = Literal["optimal", "twn"]
TWN_FACTOR = 0.7


def binarize(
    w: np.ndarray, *, axis: int | None, block_size: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Codes in {-1, +1} (zero maps to +1) and ``alpha = mean |w|`` per group."""
    w = np.asarray(w)
    summed = _group_sums(w, axis, block_size) if _fast(w) else None
    if summed is None or np.isnan(summed[0]).any():  # NaN: nanmean leaves it out
        alpha = reduce_groups(w, axis, block_size, lambda g, axis: np.nanmean(np.abs(g), axis))
    else:
        alpha = summed[0] / summed[1]
    codes = np.greater_equal(w, 0).view(np.int8)  # a fresh bool array, reused as the codes
    codes *= 2
    codes -= 1
    return codes, alpha


def ternarize(
    w: np.ndarray, *, axis: int | None, block_size: int = 0, rule: TernaryRule = "optimal"
) -> tuple[np.ndarray, np.ndarray]:
    """Codes in {-1, 0, +1} and the least-squares ``alpha`` for them, per group."""
    if rule not in ("optimal", "twn"):
        raise ValueError(f"unknown ternary rule '{rule}' (optimal, twn)")
    w = np.asarray(w)
    if not _fast(w):
        return _ternarize_plain(w, axis, block_size, rule)
    if rule == "twn":
        total, count = _group_sums(w, axis, block_size)
        if np.isnan(total).any():
            return _ternarize_plain(w, axis, block_size, rule)
        delta = TWN_FACTOR * (total / count)
    else:
        delta = _optimal_thresholds(w, axis, block_size)
    codes = _ternary_codes(w, delta, axis, block_size)
    total, count = _group_sums(w, axis, block_size, delta)
    with np.errstate(invalid="ignore", divide="ignore"):  # all-zero group: nothing kept
        alpha = total / count
    return codes, np.nan_to_num(alpha, nan=0.0)


def _fast(w: np.ndarray) -> bool:
    """Whether ``w`` takes the piecewise path (float, bfloat16 included; non-empty)."""
    return (w.dtype.kind == "f" or w.dtype in FLOAT32_EXACT) and w.size > 0


def _ternarize_plain(
    w: np.ndarray, axis: int | None, block_size: int, rule: TernaryRule
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`ternarize` on a float64 copy of ``w`` (inputs the piecewise path leaves)."""
    source = np.asarray(w)
    w = np.asarray(w, dtype=np.float64)
    shape = w.shape
    if rule == "twn":
        mean_abs = reduce_groups(w, axis, block_size, lambda g, axis: np.nanmean(np.abs(g), axis))
        delta = TWN_FACTOR * mean_abs
    else:
        delta = reduce_groups(source, axis, block_size, _optimal_threshold, exact=True)
    keep = np.abs(w) > expand(delta, shape, axis, block_size)
    codes = (np.sign(w) * keep).astype(np.int8)
    kept = np.where(keep, np.abs(w), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-zero group: no kept magnitudes
        alpha = reduce_groups(kept, axis, block_size, np.nanmean)
    return codes, np.nan_to_num(alpha, nan=0.0)


def _optimal_threshold(groups: np.ndarray, axis: int = -1) -> np.ndarray:
    """Per group, a threshold between the k-th and (k+1)-th largest magnitude for the best k."""
    assert axis == -1
    ascending = np.sort(np.nan_to_num(np.abs(groups), nan=0.0), axis=-1)
    magnitudes = ascending[..., ::-1].astype(np.float64)  # largest first
    sums = np.cumsum(magnitudes, axis=-1)
    kept = np.arange(1, magnitudes.shape[-1] + 1)
    np.square(sums, out=sums)
    best = np.argmax(np.divide(sums, kept, out=sums), axis=-1)[..., None]
    last_kept = np.take_along_axis(magnitudes, best, axis=-1)[..., 0]
    padded = np.concatenate([magnitudes, np.zeros_like(magnitudes[..., :1])], axis=-1)
    first_dropped = np.take_along_axis(padded, best + 1, axis=-1)[..., 0]
    return (last_kept + first_dropped) / 2


def _sorted_rows(rows: np.ndarray, largest: float) -> np.ndarray:
    """:func:`_optimal_threshold` of groups that are the rows of a contiguous array of
    magnitudes (sorted in place): the same sort, cumulative sum and argmax. ``largest``: the
    weight dtype's largest value, which inf becomes (rows may be wider than the weight)."""
    rows.sort(axis=-1)
    # NaN sorts last, inf just before: nan_to_num makes them 0 and float max, as the plain
    # formulation does before sorting
    odd = ~np.isfinite(rows[:, -1])
    if odd.any():
        fixed = np.nan_to_num(rows[odd], nan=0.0, posinf=largest)
        fixed.sort(axis=-1)
        rows[odd] = fixed
    count, size = rows.shape
    sums = np.empty((count, size))
    np.copyto(sums, rows[:, ::-1])  # largest first, in float64
    np.cumsum(sums, axis=-1, out=sums)
    np.square(sums, out=sums)
    np.divide(sums, np.arange(1, size + 1), out=sums)
    best = np.argmax(sums, axis=-1)  # kept: best + 1 largest
    everyone = np.arange(count)
    last_kept = rows[everyone, size - 1 - best].astype(np.float64)
    dropped = np.minimum(best + 1, size - 1)
    first_dropped = np.where(best + 1 < size, rows[everyone, size - 1 - dropped], 0)
    return (last_kept + first_dropped.astype(np.float64)) / 2


def _optimal_thresholds(w: np.ndarray, axis: int | None, block_size: int) -> np.ndarray:
    """``reduce_groups(w, ..., _optimal_threshold, exact=True)``, a few groups at a time: the
    threshold of a group depends on its magnitudes only, not on their order."""
    kind = np.float32 if w.dtype in FLOAT32_EXACT else w.dtype
    largest = float(ml_dtypes.finfo(w.dtype).max)
    if axis is None:
        rows = np.empty((1, w.size), dtype=kind)
        np.abs(w.reshape(1, -1), out=rows)
        return _sorted_rows(rows, largest).reshape(())
    before, along, after = split3(w.shape, axis)
    w3 = w.reshape(before, along, after)
    if block_size == 0:
        out = np.empty(along)
        # 64 channels at a time at least: a channel strided across rows is gathered a row's
        # run of channels at a time, then transposed in cache (4x faster than channel by
        # channel on a 4096x8192 weight)
        step = max(64, linear.PIECE_ELEMENTS // (before * after))
        for start in range(0, along, step):
            part = w3[:, start : start + step]
            width = part.shape[1]
            gathered = np.abs(part) if after == 1 else part
            rows = np.empty((width, before, after), dtype=kind)
            np.abs(np.moveaxis(gathered, 1, 0), out=rows)
            out[start : start + step] = _sorted_rows(rows.reshape(width, -1), largest)
        return out
    blocks = -(-along // block_size)
    out = np.empty((before, blocks, after))
    for index in pieces((before, blocks, after), max(1, linear.PIECE_ELEMENTS // block_size)):
        full = _full(index, (before, blocks, after))
        first, last = full[1].start, full[1].stop
        part = w3[full[0], first * block_size : last * block_size, full[2]]
        count, valid, width = part.shape
        whole = valid // block_size
        # groups (rows, blocks, after) of block_size magnitudes each; a partial last block
        # is filled up with zeros, as the plain formulation's NaN padding becomes
        grouped = np.empty((count, last - first, width, block_size), dtype=kind)
        if whole:
            np.abs(
                part[:, : whole * block_size].reshape(count, whole, block_size, width),
                out=np.moveaxis(grouped[:, :whole], 3, 2),
            )
        if valid % block_size:
            tail = np.moveaxis(grouped[:, whole], 2, 1)  # (rows, block, after)
            np.abs(part[:, whole * block_size :], out=tail[:, : valid % block_size])
            tail[:, valid % block_size :] = 0
        out[full[0], first:last, full[2]] = _sorted_rows(
            grouped.reshape(-1, block_size), largest
        ).reshape(count, last - first, width)
    return out


def _full(index: tuple, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """``index`` from :func:`pieces` as one bounded slice per axis of ``shape``."""
    full = [i if isinstance(i, slice) else slice(i, i + 1) for i in index]
    full += [slice(None)] * (len(shape) - len(full))
    return tuple(slice(*i.indices(size)[:2]) for i, size in zip(full, shape, strict=True))


def _group_sums(
    w: np.ndarray,
    axis: int | None,
    block_size: int,
    threshold: np.ndarray | None = None,
    *,
    careful: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Per group, the float64 sum of ``|w|`` (of the ``|w| > threshold`` with one) and how many
    were summed, in :func:`param_shape`. Each piece is laid out in float64 as
    ``reduce_groups`` lays out the whole (the same strides, groups of one channel only where
    it has them), so ``np.add.reduce`` adds in the same order ``np.nanmean`` does there.
    ``careful``: drop NaN magnitudes with a masked copy (see :func:`_drop`)."""
    total, count = _sums(w, axis, block_size, threshold, careful)
    if threshold is not None and not careful and np.isnan(total).any():
        total, count = _sums(w, axis, block_size, threshold, True)
    return total, count


def _sums(
    w: np.ndarray,
    axis: int | None,
    block_size: int,
    threshold: np.ndarray | None,
    careful: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_group_sums` in one go."""
    shape = param_shape(w.shape, axis, block_size)
    if axis is None:
        magnitudes = np.abs(w.reshape(1, -1).astype(np.float64))
        count = _drop(magnitudes, threshold, careful)
        total = np.add.reduce(magnitudes, axis=-1)
        return total.reshape(()), np.asarray(w.size if count is None else count.sum(), float)
    before, along, after = split3(w.shape, axis)
    w3 = w.reshape(before, along, after)
    if block_size == 0:
        total, count = np.empty(along), np.full(along, float(before * after))
        for first, last in _channel_runs(along, max(1, linear.PIECE_ELEMENTS // (before * after))):
            magnitudes = np.empty((before, last - first, after))
            np.abs(w3[:, first:last], out=magnitudes)
            limit = None if threshold is None else threshold[None, first:last, None]
            kept = _drop(magnitudes, limit, careful)
            grouped = np.moveaxis(magnitudes, 1, 0).reshape(last - first, -1)
            total[first:last] = np.add.reduce(grouped, axis=-1)
            if kept is not None:
                count[first:last] = kept.sum(axis=(0, 2))
        return total, count
    blocks = -(-along // block_size)
    total, count = np.empty((before, blocks, after)), np.empty((before, blocks, after))
    if threshold is not None:
        threshold = np.asarray(threshold).reshape(before, blocks, after)
    step = max(1, linear.PIECE_ELEMENTS // (block_size * after))
    rows = max(1, step // blocks) if step >= blocks else 1
    for start in range(0, before, rows):
        for first in range(0, blocks, step):
            last = min(first + step, blocks)
            part = w3[start : start + rows, first * block_size : last * block_size]
            # the last block padded with zeros, as reduce_groups pads it with NaN for nanmean
            magnitudes = np.empty((part.shape[0], (last - first) * block_size, after))
            np.abs(part, out=magnitudes[:, : part.shape[1]])
            magnitudes[:, part.shape[1] :] = 0
            split = magnitudes.reshape(part.shape[0], last - first, block_size, after)
            index = (slice(start, start + rows), slice(first, last))
            limit = None if threshold is None else threshold[index][:, :, None]
            kept = _drop(split, limit, careful)
            total[index] = np.add.reduce(np.moveaxis(split, 2, -1), axis=-1)
            if kept is None:
                sizes = np.minimum(block_size, along - np.arange(first, last) * block_size)
                count[index] = sizes[None, :, None]
            else:
                count[index] = kept.sum(axis=2)
    return total.reshape(shape), count.reshape(shape)


def _channel_runs(channels: int, step: int) -> list[tuple[int, int]]:
    """``(first, last)`` runs of channels, ``step`` long, none of length 1 unless there is one
    channel: numpy adds a lone strided channel pairwise but several one row at a time."""
    step = max(step, 2)
    runs = [(i, min(i + step, channels)) for i in range(0, channels, step)]
    if len(runs) > 1 and runs[-1][1] - runs[-1][0] == 1:
        runs[-2:] = [(runs[-2][0], channels)]
    return runs


def _drop(
    magnitudes: np.ndarray, threshold: np.ndarray | None, careful: bool = False
) -> np.ndarray | None:
    """Zero the magnitudes not above ``threshold``, in place; returns the kept mask (None
    without a threshold). A NaN magnitude (or inf at an inf threshold) becomes NaN, not zero
    (a product is 6x faster than a masked copy): :func:`_group_sums` redoes such groups."""
    if threshold is None:
        return None
    kept = np.greater(magnitudes, threshold)
    if careful:
        np.copyto(magnitudes, 0.0, where=~kept)
    else:
        np.multiply(magnitudes, kept, out=magnitudes)
    return kept


def _ternary_codes(
    w: np.ndarray, delta: np.ndarray, axis: int | None, block_size: int
) -> np.ndarray:
    """``sign(w) * (|w| > delta)`` as int8, compared in ``w``'s precision: for float32 values
    ``x > delta`` holds exactly when ``x > delta'`` for ``delta`` rounded down to float32."""
    delta = np.asarray(delta, dtype=np.float64)
    if w.dtype in FLOAT32_EXACT:
        low = delta.astype(np.float32)
        above = low > delta
        low[above] = np.nextafter(low[above], np.float32(-np.inf))
        delta = low
    codes = np.empty(w.shape, dtype=np.int8)
    for (part, d), (out, _) in zip(
        linear._views(w, delta, axis, block_size),
        linear._views(codes, None, axis, block_size),
        strict=True,
    ):
        for index in pieces(part.shape):
            threshold = d[broadcast_index(index, d.shape)]
            piece = part[index]
            if piece.ndim and piece.shape[-1] < linear.SHORT_RUN:
                threshold = linear._dense(threshold, piece.shape)
            target = out[index]
            np.greater(piece, threshold, out=target.view(np.bool_))
            target -= np.less(piece, -threshold).view(np.int8)
    return codes
