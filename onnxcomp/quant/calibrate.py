"""Calibration math for static activation quantisation, in pure numpy.

An activation's range is estimated from its values over calibration data. Values stream in
batch by batch into a :class:`Histogram` (memory does not grow with the data): equal bins on a
symmetric range ``[-limit, limit]`` that doubles (merging bin pairs) when a batch exceeds it,
plus the exact minimum and maximum. A method turns the histogram into a range ``(low, high)``:

- :func:`minmax_range`: the exact observed minimum and maximum;
- :func:`percentile_range`: drop the ``100 - percentile`` percent most extreme values (of
  ``|x|`` when symmetric, split between both tails otherwise);
- :func:`entropy_range`: TensorRT's KL-divergence threshold: the clipping threshold whose
  ``levels``-bin quantised histogram of ``|x|`` is closest (KL) to the clipped reference;
- :func:`mse_range`: the range ``alpha * (low, high)`` (``alpha`` in (0, 1]) that minimises the
  expected squared error of quantise-dequantise over the histogram (rounding plus clipping).

Every range contains 0 (so zero is exact) and lies within the observed ``[min, max]``.
:func:`trim_padding` cuts token batches to their longest unpadded row, so calibration is not
thrown off by padding positions.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import numpy as np

from onnxcomp.quant.linear import linear_params, qrange

Method = Literal["minmax", "percentile", "entropy", "mse"]
METHODS: tuple[str, ...] = ("minmax", "percentile", "entropy", "mse")
DEFAULT_BINS = 2048
DEFAULT_PERCENTILE = 99.999
INT8_LEVELS = 128  # |x| codes of symmetric int8: 0..127
MSE_CANDIDATES = 100


class Histogram:
    """Streaming histogram of one tensor's values on ``[-limit, limit]`` (``bins`` equal bins).

    The first batch sets ``limit`` to its largest magnitude; a later batch beyond it doubles
    ``limit`` (adjacent bins merge, so counts stay exact) as often as needed. NaN and Inf are
    not counted. ``low`` / ``high`` are the exact extremes seen.
    """

    def __init__(self, bins: int = DEFAULT_BINS):
        if bins < 8 or bins % 4:
            raise ValueError(f"bins must be a multiple of 4 and >= 8, not {bins}")
        self.bins = bins
        self.counts = np.zeros(bins, dtype=np.float64)
        self.limit = 0.0
        self.low = np.inf
        self.high = -np.inf
        self.zeros = 0  # exact zeros (a ReLU output's spike): exact on any grid

    @property
    def empty(self) -> bool:
        return not np.isfinite(self.low)

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(-self.limit, self.limit, self.bins + 1)

    @property
    def centres(self) -> np.ndarray:
        edges = self.edges
        return (edges[:-1] + edges[1:]) / 2

    def add(self, values: np.ndarray) -> None:
        """Count ``values`` (any shape)."""
        x = np.asarray(values, dtype=np.float64).reshape(-1)
        x = x[np.isfinite(x)]
        if not x.size:
            return
        lo, hi = float(x.min()), float(x.max())
        self.zeros += int(np.count_nonzero(x == 0))
        self.low, self.high = min(self.low, lo), max(self.high, hi)
        amax = max(abs(lo), abs(hi))
        if self.limit == 0.0:
            self.limit = amax if amax > 0 else 1.0
        while amax > self.limit:
            self._double()
        index = np.floor((x + self.limit) * (self.bins / (2 * self.limit)))
        index = np.clip(index, 0, self.bins - 1).astype(np.int64)
        self.counts += np.bincount(index, minlength=self.bins)

    def _double(self) -> None:
        merged = self.counts.reshape(-1, 2).sum(axis=1)
        counts = np.zeros_like(self.counts)
        quarter = self.bins // 4
        counts[quarter : quarter + merged.size] = merged
        self.counts = counts
        self.limit *= 2

    def magnitudes(self) -> tuple[np.ndarray, np.ndarray]:
        """Histogram of ``|x|``: counts and edges (``bins / 2`` bins on ``[0, limit]``)."""
        half = self.bins // 2
        counts = self.counts[half:] + self.counts[:half][::-1]
        return counts, np.linspace(0.0, self.limit, half + 1)


def minmax_range(hist: Histogram, symmetric: bool = False) -> tuple[float, float]:
    """The observed ``(min, max)``, widened to contain 0 (``(-a, a)`` when symmetric)."""
    _require(hist)
    low, high = min(hist.low, 0.0), max(hist.high, 0.0)
    if symmetric:
        amax = max(-low, high)
        return -amax, amax
    return low, high


def percentile_range(
    hist: Histogram, percentile: float = DEFAULT_PERCENTILE, symmetric: bool = False
) -> tuple[float, float]:
    """The range holding ``percentile`` percent of the values, up to one bin width.

    Symmetric: ``(-t, t)`` with ``t`` the percentile of ``|x|``. Otherwise each tail loses
    ``(100 - percentile) / 2`` percent. Never wider than the observed extremes.
    """
    _require(hist)
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], not {percentile}")
    if symmetric:
        counts, edges = hist.magnitudes()
        t = _upper_quantile(counts, edges, percentile / 100)
        amax = max(-hist.low, hist.high, 0.0)
        t = min(t, amax)
        return -t, t
    tail = (100 - percentile) / 200
    edges = hist.edges
    high = _upper_quantile(hist.counts, edges, 1 - tail)
    low = -_upper_quantile(hist.counts[::-1], -edges[::-1], 1 - tail)
    return min(max(low, hist.low), 0.0), max(min(high, hist.high), 0.0)


def entropy_range(
    hist: Histogram, levels: int = INT8_LEVELS, symmetric: bool = False
) -> tuple[float, float]:
    """TensorRT's entropy calibration on ``|x|``: the threshold ``t`` minimising
    ``KL(P_t || Q_t)``, with ``P_t`` the histogram clipped at ``t`` (outliers added to the last
    bin) and ``Q_t`` that histogram merged into ``levels`` bins and spread back over its
    non-empty bins. The range is ``(-t, t)`` when symmetric, else ``(-t, t)`` cut to the
    observed extremes (a ReLU output keeps ``low = 0``)."""
    _require(hist)
    counts, edges = hist.magnitudes()
    # Exact zeros cost nothing at any threshold; left in, a ReLU output's spike at 0 dominates
    # the divergence and drags the threshold down (1.6-2.0 instead of ~4 for a half-normal).
    counts = counts.copy()
    counts[0] = max(counts[0] - hist.zeros, 0.0)
    nbins = counts.size
    best_t, best_kl = edges[-1], np.inf
    total_outside = np.concatenate([np.cumsum(counts[::-1])[::-1], [0.0]])
    for i in range(levels, nbins + 1):
        reference = counts[:i].copy()
        reference[-1] += total_outside[i]
        if reference.sum() == 0:
            continue
        kl = _kl_merged(reference, counts[:i], levels)
        if kl < best_kl:
            best_kl, best_t = kl, edges[i]
    amax = max(-hist.low, hist.high, 0.0)
    t = float(min(best_t, amax))
    if symmetric:
        return -t, t
    return max(-t, min(hist.low, 0.0)), min(t, max(hist.high, 0.0))


def mse_range(
    hist: Histogram,
    bits: int = 8,
    symmetric: bool = False,
    candidates: int = MSE_CANDIDATES,
) -> tuple[float, float]:
    """The range ``alpha * minmax_range`` (``alpha`` on a grid in (0, 1]) whose
    quantise-dequantise of the histogram's bin centres has the least expected squared error."""
    _require(hist)
    low, high = minmax_range(hist, symmetric)
    if high - low == 0:
        return low, high
    centres, counts = hist.centres, hist.counts
    keep = counts > 0
    centres, counts = centres[keep], counts[keep]
    alphas = np.linspace(1.0 / candidates, 1.0, candidates)
    errors = np.array(
        [
            (
                counts * (centres - fake_quantize(centres, a * low, a * high, bits, symmetric)) ** 2
            ).sum()
            for a in alphas
        ]
    )
    best = float(alphas[int(np.argmin(errors))])
    return best * low, best * high


def fake_quantize(
    x: np.ndarray, low: float, high: float, bits: int = 8, symmetric: bool = False
) -> np.ndarray:
    """Quantise then dequantise ``x`` for the range ``(low, high)``, as QuantizeLinear then
    DequantizeLinear compute it (symmetric: narrow range, zero point 0; else full range)."""
    scale, zero_point, qmin, qmax = range_params(low, high, bits, symmetric)
    q = np.clip(np.rint(np.asarray(x, dtype=np.float64) / scale) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def range_params(
    low: float, high: float, bits: int = 8, symmetric: bool = False
) -> tuple[float, int, int, int]:
    """Scale, zero point and code range (qmin, qmax) for a calibrated range, in float64 (the
    same formulas as :func:`onnxcomp.quant.linear.linear_params` on ``[low, high]``)."""
    scale, zero_point = linear_params(
        np.array([low, high]), bits, axis=None, symmetric=symmetric, dtype=np.float32
    )
    qmin, qmax = qrange(bits, symmetric)
    zp = 0 if zero_point is None else int(zero_point)
    return float(scale), zp, qmin, qmax


def compute_range(
    hist: Histogram,
    method: Method,
    *,
    symmetric: bool = False,
    percentile: float = DEFAULT_PERCENTILE,
) -> tuple[float, float]:
    """The range ``method`` gives for ``hist``."""
    if method == "minmax":
        return minmax_range(hist, symmetric)
    if method == "percentile":
        return percentile_range(hist, percentile, symmetric)
    if method == "entropy":
        return entropy_range(hist, symmetric=symmetric)
    if method == "mse":
        return mse_range(hist, symmetric=symmetric)
    raise ValueError(f"unknown calibration method '{method}' ({', '.join(METHODS)})")


def trim_padding(
    feeds: Mapping[str, np.ndarray], mask_names: tuple[str, ...] | None = None
) -> dict[str, np.ndarray]:
    """Cut a token batch to its longest unpadded row.

    ``mask_names`` (default: integer or bool inputs whose name contains ``mask``) are [N, L]
    masks, nonzero on real tokens. Columns past the last nonzero column of every row are
    padding in every row, so every input with the mask's shape is sliced to that width on axis
    1. Batches without a mask are returned unchanged.
    """
    if mask_names is None:
        mask_names = tuple(
            name
            for name, a in feeds.items()
            if "mask" in name.lower() and a.ndim == 2 and (a.dtype.kind in "iub")
        )
    masks = [feeds[name] for name in mask_names if name in feeds]
    if not masks:
        return dict(feeds)
    shape = masks[0].shape
    used = np.zeros(shape[1], dtype=bool)
    for mask in masks:
        if mask.shape == shape:
            used |= (mask != 0).any(axis=0)
    width = int(np.nonzero(used)[0][-1]) + 1 if used.any() else 1
    return {
        name: (a[:, :width] if a.ndim >= 2 and a.shape[:2] == shape else a)
        for name, a in feeds.items()
    }


def unpadded_lengths(mask: np.ndarray) -> np.ndarray:
    """Per row of an [N, L] mask, the index after its last nonzero column (0 if none)."""
    nonzero = np.asarray(mask) != 0
    last = nonzero.shape[1] - np.argmax(nonzero[:, ::-1], axis=1)
    return np.where(nonzero.any(axis=1), last, 0)


def _kl_merged(reference: np.ndarray, clipped: np.ndarray, levels: int) -> float:
    """KL(P || Q): P the normalised reference, Q the clipped histogram merged into ``levels``
    bins and spread evenly back over the bins that were non-empty."""
    size = reference.size
    groups = np.minimum((np.arange(size) * levels) // size, levels - 1)
    nonzero = clipped != 0
    merged = np.bincount(groups, weights=clipped, minlength=levels)
    occupied = np.bincount(groups, weights=nonzero, minlength=levels)
    spread = np.where(nonzero, merged[groups] / np.maximum(occupied[groups], 1), 0.0)
    p = reference / reference.sum()
    q_total = spread.sum()
    if q_total == 0:
        return np.inf
    q = spread / q_total
    mask = p > 0
    # A reference bin with mass where Q has none (the outlier bin after clipping) gets a
    # small floor, as TensorRT's smoothing does, rather than an infinite divergence.
    q = np.where(mask & (q == 0), 1e-12, q)
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


def _upper_quantile(counts: np.ndarray, edges: np.ndarray, fraction: float) -> float:
    """The upper edge of the first bin at which the cumulative share reaches ``fraction``."""
    total = counts.sum()
    if total == 0:
        return 0.0
    cumulative = np.cumsum(counts) / total
    index = int(np.searchsorted(cumulative, fraction - 1e-12))
    return float(edges[min(index, counts.size - 1) + 1])


def _require(hist: Histogram) -> None:
    if hist.empty:
        raise ValueError("no finite values were seen: nothing to calibrate")
