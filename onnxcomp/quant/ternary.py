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
plain formulation (tests/quant/test_identity.py keeps it as the reference). Long groups find
their best ``k`` without the full sort (:func:`_binned_rows`: 2-3x faster on channels of
4096-8192), with the sort's thresholds to the bit (tests/quant/test_identity.py).

The search for the optimal threshold also yields alpha's sum and count, the magnitudes above
the threshold: where that float64 sum is exact (multiples of the smallest one's ulp, below
2^53 of them), every order of addition gives it, nanmean's included, so :func:`ternarize`
skips the second pass over the weight for those groups (all of them on real weights; sums
that may round and groups with NaN or inf are added again). tests/quant/test_ternary_sums.py.
TWN's sums come from the coding pass (:func:`_ternary_codes`), exact by the same argument.

Speed (4096x8192 float32, per-output-channel, Zen 4; by_groups on 2 threads, ns per element):
TWN ~2.4, the optimal rule ~6.5 (one thread ~9: gathering strided channels ~2, binning ~4,
the window ~2). What was tried for the optimal rule and did not pay: binning strided channels
in place on column bands (3-6%), other bin and call sizes (within noise), a sample to bracket
the threshold (bounds that prove no threshold outside the bracket is better need it ~0.8x to
~1.7x the threshold: ~30% of a channel to gather and sort, plus more passes), numba kernels
(a prototype binned at ~2.2 ns and read at ~0.6: the search at ~3.5 against ~9, still above
TWN, for a compiler dependency and ~1.5 s of first-run compilation).
"""

from __future__ import annotations

import math
import threading
import warnings
from typing import Literal

import ml_dtypes
import numpy as np

from onnxcomp.quant import linear
from onnxcomp.quant.linear import (
    FLOAT32_EXACT,
    NonFiniteWeight,
    broadcast_index,
    expand,
    param_shape,
    pieces,
    reduce_groups,
    split3,
)

TernaryRule = Literal["optimal", "twn"]
# per group: the optimal threshold, the sum of the magnitudes above it, how many
Found = tuple[np.ndarray, np.ndarray, np.ndarray]
TWN_FACTOR = 0.7


def binarize(
    w: np.ndarray, *, axis: int | None, block_size: int = 0, finite: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Codes in {-1, +1} (zero maps to +1) and ``alpha = mean |w|`` per group. ``finite``:
    raise :class:`~onnxcomp.quant.linear.NonFiniteWeight` for a ``w`` holding inf or NaN
    (float64 sums of its magnitudes are not finite exactly then) instead of coding it."""
    w = np.asarray(w)
    summed = _group_sums(w, axis, block_size) if _fast(w) else None
    if finite and summed is not None and not np.isfinite(summed[0]).all():
        raise NonFiniteWeight("the weight holds inf or NaN")
    if summed is None or np.isnan(summed[0]).any():  # NaN: nanmean leaves it out
        alpha = reduce_groups(w, axis, block_size, lambda g, axis: np.nanmean(np.abs(g), axis))
    else:
        alpha = summed[0] / summed[1]
    codes = np.greater_equal(w, 0).view(np.int8)  # a fresh bool array, reused as the codes
    codes *= 2
    codes -= 1
    return codes, alpha


def ternarize(
    w: np.ndarray,
    *,
    axis: int | None,
    block_size: int = 0,
    rule: TernaryRule = "optimal",
    finite: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Codes in {-1, 0, +1} and the least-squares ``alpha`` for them, per group. ``finite``:
    raise :class:`~onnxcomp.quant.linear.NonFiniteWeight` for a ``w`` holding inf or NaN,
    seen in sums the coding takes anyway (the optimal rule looks at ``w`` itself only when
    some group's sum is unknown, which inf and NaN make it)."""
    if rule not in ("optimal", "twn"):
        raise ValueError(f"unknown ternary rule '{rule}' (optimal, twn)")
    w = np.asarray(w)
    if not _fast(w):
        return _ternarize_plain(w, axis, block_size, rule)
    if rule == "twn":
        total, count = _group_sums(w, axis, block_size)
        if finite and not np.isfinite(total).all():
            raise NonFiniteWeight("the weight holds inf or NaN")
        if np.isnan(total).any():
            return _ternarize_plain(w, axis, block_size, rule)
        delta = TWN_FACTOR * (total / count)
        codes, total, count = _ternary_codes(w, delta, axis, block_size, sums=True)
    else:
        delta, total, count = _optimal_thresholds(w, axis, block_size)
        shape = param_shape(w.shape, axis, block_size)
        total, count = total.reshape(shape), count.reshape(shape)
        codes = _ternary_codes(w, delta, axis, block_size)
    unknown = np.isnan(total)
    if unknown.any():  # sums that may round, NaN or inf (see _sorted_rows, _ternary_codes)
        if finite and not np.isfinite(w).all():
            raise NonFiniteWeight("the weight holds inf or NaN")
        redone = _group_sums(w, axis, block_size, delta)
        total[unknown], count[unknown] = redone[0][unknown], redone[1][unknown]
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


def _sorted_rows(rows: np.ndarray, largest: float) -> Found:
    """:func:`_optimal_threshold` of groups that are the rows of a contiguous array of
    magnitudes (sorted in place): the same sort, cumulative sum and argmax. ``largest``: the
    weight dtype's largest value, which inf becomes (rows may be wider than the weight).
    With the sum of the magnitudes above the threshold (its cumulative sum there: alpha's sum
    adds them in another order, the same result where both are exact, as in
    :func:`_binned_rows`; NaN elsewhere) and how many."""
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
    f = np.square(sums)
    np.divide(f, np.arange(1, size + 1), out=f)
    best = np.argmax(f, axis=-1)  # kept: best + 1 largest
    everyone = np.arange(count)
    last_kept = rows[everyone, size - 1 - best].astype(np.float64)
    dropped = np.minimum(best + 1, size - 1)
    first_dropped = np.where(best + 1 < size, rows[everyone, size - 1 - dropped], 0)
    thresholds = (last_kept + first_dropped.astype(np.float64)) / 2
    # above the threshold: the best k, fewer where the k-th ties with the next
    kept = best + 1
    tied = np.flatnonzero(last_kept == first_dropped)
    kept[tied] = np.add.reduce(rows[tied] > thresholds[tied, None], axis=1, dtype=np.intp)
    total = np.where(kept > 0, sums[everyone, np.maximum(kept - 1, 0)], 0.0)
    smallest = rows[everyone, size - np.maximum(kept, 1)].astype(np.float32)
    unit = np.ldexp(1.0, np.maximum(smallest.view(np.int32) >> 23, 1) - 150)
    total[(total * (1 + 4 * (size + 1) * ROUNDING) >= unit * EXACT_UNITS) | odd] = np.nan
    return thresholds, total, kept.astype(np.float64)


# Bins per group in :func:`_binned_rows`: the finest split of float32 bit patterns (8 to 15
# leading bits after the sign) that spans a group from a lower bound of its threshold to its
# largest magnitude, plus one for all below. 256 leave ~1.5% of a Gaussian channel of 8192 to
# sort; fewer sort more, more cost more per group (shorter groups get fewer, down to 128).
MAX_BINS = 256
# Groups shorter than this (blocks) are sorted whole: bins would outnumber their elements.
BINNED_MIN = 1024
# Elements binned at once (a few rows of a piece, or part of one long row).
BIN_ELEMENTS = 1 << 17
# Elements of the channels thresholded in one call of :func:`_binned_rows`.
BINNED_CALL = 1 << 20
# Channels summed at once by :func:`_column_sums`.
COLUMN_RUN = 1024
MANTISSA = 0x7FFFFF
COUNTED = 2.0**38  # what each magnitude adds to its bin besides its mantissa (see _bins)
ROUNDING = 2.0**-53  # float64's unit roundoff
EXACT_UNITS = 2.0**53  # float64 sums of multiples of u below this many u are exact
FINITE_BITS = 0x7F800001  # above every finite float32's bit pattern
LEAST = 2.0**-149  # the smallest float32 above 0


def _binned_rows(rows: np.ndarray, largest: float) -> Found:
    """:func:`_sorted_rows` of contiguous float32 ``rows`` (modified in place), sorting
    only the few magnitudes near each row's threshold.

    ``f(k) = S_k^2 / k`` (``S_k``: the sum of the ``k`` largest) is evaluated only where it
    can be largest. The magnitudes are counted and summed in bins of their bit patterns
    (which order like the values). Inside a bin with upper edge ``e``, ``i`` more magnitudes
    give ``f <= (S_above + i e)^2 / (k_above + i)``, which is largest at one or at all of
    them; bins whose bound stays below ``f`` at some bin boundary cannot hold the best ``k``,
    the others are sorted. There ``S_k`` is the sort's float64 cumulative sum bit for bit:
    float32 values no smaller than ``lo`` are multiples of ``ulp(lo)``, so their sums below
    ``2^53 ulp(lo)`` are exact in any order. Bounds allow for the sort's own rounding; a row
    where exactness cannot be shown (or that needs the bin below the lowest) is sorted whole.
    """
    count, size = rows.shape
    top = np.maximum.reduce(rows, axis=1)
    odd = ~np.isfinite(top)  # NaN and inf become 0 and the dtype's largest, as when sorting
    if odd.any():
        rows[odd] = np.nan_to_num(rows[odd], nan=0.0, posinf=largest)
        top[odd] = np.maximum.reduce(rows[odd], axis=1)
    # at the best k, f(k) > f(k - 1) puts the k-th largest above half the mean of the k
    # largest, itself at least the mean of all and top / sqrt(k) (as f(k) >= f(1) = top^2),
    # less the rounding of f: the bins reach down to a float32 estimate of that (checked in
    # float64 below) and lump all magnitudes under it in one bin
    rounding = 2.1 * (size + 1) * ROUNDING  # of f as the sort computes it, relative
    reach = max(0.5 - 3.1 * (size + 2.0) ** 2 * ROUNDING, 0.0)
    spread = 1 / math.sqrt(size * (1 + rounding))
    everything = np.add.reduce(rows, axis=1, dtype=np.float64)
    mean = (everything / size).astype(np.float32)
    guess = np.maximum(mean, top * np.float32(spread)) * np.float32(reach * (1 - 1e-4))
    top_bits = top.view(np.int32).astype(np.int64)
    low_bits = np.minimum(guess, top).view(np.int32).astype(np.int64)
    bins = 16 * min(max(size // 512, MAX_BINS // 32), MAX_BINS // 16) - 1  # + 1: 16 x k
    fine = sum(((top_bits >> 23 - m) - (low_bits >> 23 - m) < bins).astype(np.int64)
               for m in range(1, 8))  # fmt: skip
    shift = 23 - fine  # exponents alone may not reach low_bits: checked below
    top_key = top_bits >> shift
    # bins are rows here (j-th from the top: bit patterns >> shift == top_key - j; the last
    # one lumps all below), groups are columns: cumulative sums run down, across all groups
    binned = _bins(rows, shift, top_key, bins, everything)
    counts = binned[0].copy()
    _running_sums(binned)
    kept, total = binned
    above = np.empty_like(total)  # the sum above each bin: not total - sums, which rounds
    above[0] = 0
    above[1:] = total[:-1]
    kept_above = kept - counts
    edges = (top_key + 1).astype(np.int32) - np.arange(bins + 1, dtype=np.int32)[:, None]
    np.maximum(edges, 0, out=edges)
    np.left_shift(edges, shift.astype(np.int32), out=edges)  # at most inf's bit pattern
    edge = edges.view(np.float32).astype(np.float64)
    edge[0] = top
    # relative error of f as the sort computes it (float64 sums of up to size values) and of
    # these bounds: one margin covers both
    margin = 8 * (size + bins + 8) * ROUNDING
    floor = np.maximum(total[-1] / size * (1 - 2 * (size + bins) * ROUNDING), top * spread)
    floor *= reach * (1 - 16 * ROUNDING)
    below = edge[-1] < floor  # every lumped magnitude is below the best k's smallest
    bound = counts * edge
    bound += above
    np.square(bound, out=bound)
    bound /= kept  # at least 1: the largest is in the first bin
    one = np.add(above, edge, out=edge)
    np.square(one, out=one)
    one /= kept_above + 1
    np.maximum(bound, one, out=bound)
    bound *= 1 + margin
    bound[counts == 0] = -np.inf
    bound[-1, below] = -np.inf
    boundary = np.square(total, out=one)
    boundary /= kept
    maybe = bound >= np.maximum.reduce(boundary, axis=0) * (1 - margin)
    first = np.argmax(maybe, axis=0)
    last = bins - np.argmax(maybe[::-1], axis=0)
    every = np.arange(count)
    low = np.maximum(top_key - last, 0) << shift  # the lowest sorted bin's lower edge
    high = np.where(first == 0, FINITE_BITS, (top_key - first + 1) << shift)
    unit = np.ldexp(1.0, (np.maximum(low >> 23, 1) - 150).astype(np.int32))  # ulp at low
    exact = total[last, every] * (1 + margin) < unit * EXACT_UNITS
    taken = (kept[last, every] - kept_above[first, every]).astype(np.int64)
    # rows with many to sort (ties, few distinct values) are sorted as they are: a table
    # as wide as them all would cost more
    whole = ~maybe[first, every] | (last == bins) | ~exact | (taken > max(size // 8, 256))
    low[whole], high[whole], taken[whole] = 0, 0, 0
    found = np.empty((3, count))  # thresholds, sums above them, how many
    if not whole.all():
        settled = _sort_bins(rows, low, high, taken, kept_above[first, every], above[first, every])
        found[:, ~whole] = np.asarray(settled)[:, ~whole]
    if whole.any():
        found[:, whole] = _sorted_rows(rows[whole], largest)
    found[1, odd] = np.nan  # inf became the dtype's largest
    return found[0], found[1], found[2]


def _row_thresholds(rows: np.ndarray, largest: float) -> Found:
    """:func:`_sorted_rows`, binned first where the rows are long float32 ones."""
    if rows.dtype == np.float32 and rows.shape[1] >= BINNED_MIN:
        return _binned_rows(rows, largest)
    return _sorted_rows(rows, largest)


def _chunks(count: int, size: int) -> list[tuple[slice, slice]]:
    """(rows, columns) of a ``(count, size)`` array, about :data:`BIN_ELEMENTS` each."""
    if size > BIN_ELEMENTS:
        return [(slice(r, r + 1), slice(c, c + BIN_ELEMENTS))
                for r in range(count) for c in range(0, size, BIN_ELEMENTS)]  # fmt: skip
    step = max(1, BIN_ELEMENTS // size)
    return [(slice(r, r + step), slice(None)) for r in range(0, count, step)]


_SCRATCH = threading.local()
SCRATCH_BYTES = 1 << 23  # per buffer; ~10 MB in all per thread at most


def _scratch(name: str, size: int, dtype: np.dtype | type) -> np.ndarray:
    """A flat buffer of ``size`` elements named ``name``, kept by the calling thread for its
    next calls: first writes to fresh pages are slow (~1 us per 4 KiB on the VMs measured,
    as much as the work on them), and by_groups' threads code many slices each. Buffers
    above :data:`SCRATCH_BYTES` are not kept (a huge lone group: memory, not speed)."""
    dtype = np.dtype(dtype)
    if size * dtype.itemsize > SCRATCH_BYTES:
        return np.empty(size, dtype=dtype)
    held = getattr(_SCRATCH, name, None)
    if held is None or held.size < size * dtype.itemsize:
        held = np.empty(size * dtype.itemsize, dtype=np.uint8)
        setattr(_SCRATCH, name, held)
    return held[: size * dtype.itemsize].view(dtype)


def _running_sums(a: np.ndarray) -> None:
    """``np.cumsum(a, axis=1, out=a)`` for a multiple of 16 rows of many groups (the
    columns), in blocks of 16 rows: numpy accumulates along a non-last axis a column at a time,
    ~10x slower than adding rows. The order of the additions differs; float64 rounding
    bounds it alike, and sums that are exact in one order are exact in all."""
    side = 16
    blocks = a.reshape(a.shape[0], -1, side, *a.shape[2:])
    for i in range(1, side):  # within blocks
        blocks[:, :, i] += blocks[:, :, i - 1]
    ends = blocks[:, :, -1]
    for i in range(1, ends.shape[1]):  # the blocks' totals
        ends[:, i] += ends[:, i - 1]
    blocks[:, 1:, :-1] += ends[:, :-1, None]


def _bins(
    rows: np.ndarray, shift: np.ndarray, top_key: np.ndarray, bins: int, total: np.ndarray
) -> np.ndarray:
    """Count and float64 sum, ``(2, bins + 1, rows)``, of each row's magnitudes whose bit
    patterns ``>> shift`` are ``top_key - j`` (bin ``j``), and in the last bin of all below
    (whose sum is what ``total``, the rows' sums, leaves).

    One bincount gives both: every magnitude in a bin (one binade: ``shift`` <= 23) is its
    23 mantissa bits ``m`` times the binade's unit, plus the implicit bit (except denormals),
    so a bin's sum is exactly ``(sum m + count 2^23) unit``. Each magnitude adds the integer
    ``2^38 + m`` to its bin: below 2^53 for up to 2^15 of them, the float64 sums are exact
    integers whose high part counts them and whose low part sums ``m``."""
    count, _ = rows.shape
    counts, mantissas = np.zeros((2, bins + 1, count))
    bits = rows.view(np.int32)  # non-negative floats order like their bit patterns
    shift32 = shift.astype(np.int32)[:, None]
    chunks = _chunks(*rows.shape)
    # buffers reused chunk after chunk: fresh pages are slow to fault in, and bincount
    # copies its arguments unless they are intp and float64 already
    largest = max(bits[index].size for index in chunks)
    keys_buffer = _scratch("keys", largest, np.int32)
    flat_buffer = _scratch("flat", largest, np.intp)
    weights_buffer = _scratch("weights", largest, np.float64)
    for index in chunks:
        part = bits[index]
        width = part.shape[0]
        first = np.arange(width) * (bins + 1)  # bin j of row i is counted at first[i] + j
        keys = keys_buffer[: part.size].reshape(part.shape)
        np.right_shift(part, shift32[index[0]], out=keys)
        np.subtract((top_key[index[0]] + first).astype(np.int32)[:, None], keys, out=keys)
        np.minimum(keys, (first + bins).astype(np.int32)[:, None], out=keys)
        flat = flat_buffer[: part.size]
        np.copyto(flat, keys.reshape(-1))
        np.bitwise_and(part, MANTISSA, out=keys)
        weights = weights_buffer[: part.size].reshape(part.shape)
        length = (bins + 1) * width
        if part.shape[1] < 1 << 15:
            np.add(keys, COUNTED, out=weights)
            found = np.bincount(flat, weights.reshape(-1), minlength=length)
            tally = np.floor(found * (1 / COUNTED))
            found -= tally * COUNTED
        else:  # a bin could count 2^15 or more
            np.copyto(weights, keys)
            tally = np.bincount(flat, minlength=length).astype(np.float64)
            found = np.bincount(flat, weights.reshape(-1), minlength=length)
        counts[:, index[0]] += tally.reshape(width, bins + 1).T
        mantissas[:, index[0]] += found.reshape(width, bins + 1).T
    # each bin's exponent bits (its bit patterns >> 23) and unit 2^(exponent - 150) (a
    # denormal's exponent is 0, its unit that of 1), in float64 arithmetic: numpy shifts
    # int64 arrays by arrays and ldexp element by element, 40x slower
    keys = top_key - np.arange(bins, dtype=np.float64)[:, None]
    binade = np.maximum(np.floor(keys * np.exp2(shift - 23.0)), 0)
    implicit = np.where(binade > 0, counts[:-1] * 2.0**23, 0)
    unit = (np.maximum(binade, 1).astype(np.int64) + (1023 - 150) << 52).view(np.float64)
    sums = np.empty_like(counts)
    sums[:-1] = (mantissas[:-1] + implicit) * unit
    sums[-1] = np.maximum(total - np.add.reduce(sums[:-1], axis=0), 0)
    return np.stack([counts, sums])


def _sort_bins(
    rows: np.ndarray,
    low: np.ndarray,
    high: np.ndarray,
    taken: np.ndarray,
    kept_above: np.ndarray,
    above: np.ndarray,
) -> Found:
    """Per row, the threshold when the best k has its k-th largest magnitude among the
    ``taken`` ones with bit patterns in ``[low, high)``, of which ``kept_above`` magnitudes
    summing to ``above`` (exactly) are larger: those are sorted, the rest are not. With the
    (exact) sum of the magnitudes above the threshold and how many."""
    count, size = rows.shape
    bits = rows.view(np.int32)
    low32 = low.astype(np.int32)[:, None]
    chosen = []
    chunks = _chunks(count, size)
    largest = max(bits[index].size for index in chunks)
    buffer = _scratch("inside", largest, np.bool_)
    offsets = _scratch("offsets", largest, np.uint32)
    # low <= bits < high as one unsigned comparison: bits - low wraps around below low
    start, span = low.astype(np.uint32)[:, None], (high - low).astype(np.uint32)[:, None]
    for index in chunks:
        part = bits[index]
        inside = buffer[: part.size].reshape(part.shape)
        offset = offsets[: part.size].reshape(part.shape)
        np.subtract(part.view(np.uint32), start[index[0]], out=offset)
        np.less(offset, span[index[0]], out=inside)
        chosen.append(np.compress(inside.reshape(-1), rows[index].reshape(-1)))
    flat = np.concatenate(chosen)
    width = max(int(taken.max()), 1)
    every = np.arange(count)
    table = np.full((count, width), -1.0, dtype=np.float32)  # padding sorts first
    starts = np.cumsum(taken) - taken
    table.reshape(-1)[np.arange(flat.size) + np.repeat(every * width - starts, taken)] = flat
    table.sort(axis=1)
    largest_first = table[:, ::-1].astype(np.float64)
    sums = np.cumsum(largest_first, axis=1)
    sums += above[:, None]  # exact: sums of multiples of ulp(low) below 2^53 ulp(low)
    f = np.square(sums)
    np.divide(f, kept_above[:, None] + np.arange(1, width + 1), out=f)
    f[np.arange(width) >= taken[:, None]] = -np.inf
    best = np.argmax(f, axis=1)
    last_kept = largest_first[every, best]
    first_dropped = largest_first[every, np.minimum(best + 1, width - 1)]
    ends = np.flatnonzero((best + 1 >= taken) & (taken > 0))
    first_dropped[ends] = 0  # then the largest magnitude below the sorted ones, if any
    for index in _chunks(ends.size, size):
        chosen_rows = ends[index[0]]
        part = rows[chosen_rows, index[1]]
        below = np.where(part.view(np.int32) < low32[chosen_rows], part, np.float32(0))
        first_dropped[chosen_rows] = np.maximum(first_dropped[chosen_rows], below.max(axis=1))
    thresholds = (last_kept + first_dropped) / 2
    # kept: all above the sorted ones and the sorted ones above the threshold (the best k
    # of them, fewer where the k-th ties with the next); none below (all at most
    # first_dropped); their sum is exact too, as every kept magnitude is at least low
    inside = np.add.reduce(largest_first > thresholds[:, None], axis=1, dtype=np.intp)
    total = np.where(inside > 0, sums[every, np.maximum(inside - 1, 0)], above)
    return thresholds, total, (kept_above + inside).astype(np.float64)


def _optimal_thresholds(w: np.ndarray, axis: int | None, block_size: int) -> Found:
    """``reduce_groups(w, ..., _optimal_threshold, exact=True)``, a few groups at a time: the
    threshold of a group depends on its magnitudes only, not on their order. With, in the
    same shape, the float64 sum of the magnitudes above each threshold (NaN where it could
    differ from :func:`_group_sums`') and how many."""
    kind = np.float32 if w.dtype in FLOAT32_EXACT else w.dtype  # float16 too: the same values
    largest = float(ml_dtypes.finfo(w.dtype).max)
    if axis is None:
        rows = np.empty((1, w.size), dtype=kind)
        np.abs(w.reshape(1, -1), out=rows)
        return tuple(found.reshape(()) for found in _row_thresholds(rows, largest))
    before, along, after = split3(w.shape, axis)
    w3 = w.reshape(before, along, after)
    if block_size == 0:
        out = np.empty((3, along))
        # 64 channels at a time at least: a channel strided across rows is gathered a row's
        # run of channels at a time, then transposed in cache (4x faster than channel by
        # channel on a 4096x8192 weight); binned channels more, as each call costs ~0.2 ms
        size = before * after
        step = max(64, (BINNED_CALL if size >= BINNED_MIN else linear.PIECE_ELEMENTS) // size)
        buffer = _scratch("gathered", min(step, along) * size, kind).reshape(-1, before, after)
        for start in range(0, along, step):
            part = w3[:, start : start + step]
            width = part.shape[1]
            rows = buffer[:width]
            for sub in range(0, width, 64):
                gathered = part[:, sub : sub + 64]
                if after == 1:  # rows of 64 magnitudes, then their transpose in cache
                    run = gathered.shape[1]
                    copied = _scratch("transposed", before * run, kind).reshape(before, run, 1)
                    gathered = np.abs(gathered, out=copied)
                np.abs(np.moveaxis(gathered, 1, 0), out=rows[sub : sub + 64])
            out[:, start : start + step] = _row_thresholds(rows.reshape(width, -1), largest)
        return out[0], out[1], out[2]
    blocks = -(-along // block_size)
    out = np.empty((3, before, blocks, after))
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
        found = _row_thresholds(grouped.reshape(-1, block_size), largest)
        out[:, full[0], first:last, full[2]] = np.reshape(found, (3, count, last - first, width))
    return out[0], out[1], out[2]


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
    if block_size == 0 and after == 1 and along > 1:
        return _column_sums(w3[:, :, 0], threshold, careful)
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


def _column_sums(
    w: np.ndarray, threshold: np.ndarray | None, careful: bool
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_sums` of the columns of 2-D ``w`` (channels strided across rows, two or more).

    numpy's reduce over the strided layout adds a run of channels one row after another:
    ``((x0 + x1) + x2) + ...`` per channel. So do these: blocks of rows copied in float64
    below the running sum, and reduced along the first axis (numpy adds a C-contiguous
    array's rows one after another too, a row's run of channels at a time), which keeps the
    order with wide runs of channels in a cache-sized buffer (short runs cost ~3x more)."""
    rows, channels = w.shape
    total, count = np.empty(channels), np.full(channels, float(rows))
    for first, last in _channel_runs(channels, COLUMN_RUN):
        width = last - first
        step = max(1, linear.PIECE_ELEMENTS // width)
        buffer = _scratch("column_sums", (step + 1) * width, np.float64).reshape(-1, width)
        limit = None if threshold is None else threshold[first:last]
        kept = 0
        for start in range(0, rows, step):
            block = w[start : start + step, first:last]
            magnitudes = buffer[1 : len(block) + 1]
            np.abs(block, out=magnitudes)
            mask = _drop(magnitudes, limit, careful)
            if mask is not None:
                kept += np.add.reduce(mask, axis=0, dtype=np.intp)
            if start:  # the running sum first
                buffer[0] = total[first:last]
                magnitudes = buffer[: len(block) + 1]
            np.add.reduce(magnitudes, axis=0, out=total[first:last])
        if limit is not None:
            count[first:last] = kept
    return total, count


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
    w: np.ndarray, delta: np.ndarray, axis: int | None, block_size: int, *, sums: bool = False
) -> np.ndarray | tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``sign(w) * (|w| > delta)`` as int8, compared in ``w``'s precision: for float32 values
    ``x > delta`` holds exactly when ``x > delta'`` for ``delta`` rounded down to float32.

    ``sums``: also, in ``delta``'s shape, the float64 sum of the coded ``|w|`` and how many,
    taken from each piece while it is in cache (a second pass over ``w`` costs as much as the
    coding). They are added in another order than ``np.nanmean``'s, the same sum where it is
    exact: float32 values above ``delta`` are multiples of ``ulp(lo)``, ``lo`` the smallest
    float32 above it, so their float64 sums below ``2^53 ulp(lo)`` are exact in any order.
    TWN's (``delta = 0.7 * mean |w|``) always are for finite groups of fewer than ~3e8
    elements (the kept sum is below ``n delta / 0.7``). Sums that may round, those of float64
    weights and of groups with inf (``inf * 0`` is NaN) are NaN: :func:`ternarize` adds those
    again with :func:`_group_sums`."""
    delta = np.asarray(delta, dtype=np.float64)
    fused = sums and w.dtype in FLOAT32_EXACT
    if w.dtype in FLOAT32_EXACT:
        low = np.asarray(delta.astype(np.float32))
        above = low > delta
        if delta.size and delta.min() >= 0:  # one bit pattern down: nextafter toward 0
            np.subtract(low.view(np.int32), above, out=low.view(np.int32))
        else:
            low[above] = np.nextafter(low[above], np.float32(-np.inf))
        delta = low
    codes = np.empty(w.shape, dtype=np.int8)
    total = np.zeros(delta.shape) if fused else np.full(delta.shape, np.nan)
    count = np.zeros(delta.shape)
    for (part, d), (out, _), (_, summed), (_, counted) in zip(
        linear._views(w, delta, axis, block_size),
        linear._views(codes, None, axis, block_size),
        linear._views(w, total, axis, block_size),
        linear._views(w, count, axis, block_size),
        strict=True,
    ):
        if part.ndim > 1 and part.shape[-1] == 1:  # channels strided across rows: rows of
            # them against a row of thresholds, not runs of one repeated to the piece's shape
            part, d, out, summed, counted = (a[..., 0] for a in (part, d, out, summed, counted))
        negative = -d
        for index in pieces(part.shape):
            groups = broadcast_index(index, d.shape)
            threshold, below = d[groups], negative[groups]
            piece = part[index]
            if piece.ndim and piece.shape[-1] < linear.SHORT_RUN:
                threshold = linear._dense(threshold, piece.shape)
                below = linear._dense(below, piece.shape)
            target = out[index]
            np.greater(piece, threshold, out=target.view(np.bool_))
            target -= np.less(piece, below).view(np.int8)
            if fused:
                _add_coded(piece, target, summed[groups], counted[groups])
    if not sums:
        return codes
    if fused:
        # every kept x is >= lo, the smallest float32 above delta, whose ulp exceeds
        # lo 2^-24 (2^-149 at least): exact below 2^53 ulp(lo) holds below lo 2^29. All
        # groups at once first (one comparison), each group where that fails; NaN fails
        rounding = 1 + 4 * (w.size // delta.size + 1) * ROUNDING  # of the sums, at most
        units = EXACT_UNITS * 2.0**-24
        if not total.max() * rounding < max(float(delta.min()), LEAST) * units:
            lowest = np.maximum(delta, np.float32(LEAST)).astype(np.float64)
            total[~(total * rounding < lowest * units)] = np.nan
    return codes, total, count


def _add_coded(piece: np.ndarray, codes: np.ndarray, total: np.ndarray, count: np.ndarray) -> None:
    """Add the float64 sum of ``|piece|`` where ``codes`` is not 0 and how many, per group, to
    ``total`` and ``count`` (views of one element per group: their length-1 axes are the ones
    each group spans in the piece). ``piece * codes`` is that magnitude or 0, exactly."""
    axes = tuple(k for k, size in enumerate(total.shape) if size == 1)
    coded = _scratch("coded", piece.size, np.float32).reshape(piece.shape)
    np.multiply(piece, codes, out=coded, dtype=np.float32)
    total += np.add.reduce(coded, axis=axes, dtype=np.float64, keepdims=True)
    ones = _scratch("ones", piece.size, np.uint8).reshape(piece.shape)
    np.bitwise_and(codes.view(np.uint8), 1, out=ones)  # -1 is 0xFF
    # the narrowest integers that hold a group's count in the piece: uint8 sums are ~7x
    # faster than intp ones
    each = piece.size // total.size
    kind = np.uint8 if each < 1 << 8 else np.uint16 if each < 1 << 16 else np.intp
    count += np.add.reduce(ones, axis=axes, dtype=kind, keepdims=True)
