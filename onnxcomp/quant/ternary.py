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
"""

from __future__ import annotations

import warnings
from typing import Literal

import numpy as np

from onnxcomp.quant.linear import expand, reduce_groups

TernaryRule = Literal["optimal", "twn"]
TWN_FACTOR = 0.7


def binarize(
    w: np.ndarray, *, axis: int | None, block_size: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Codes in {-1, +1} (zero maps to +1) and ``alpha = mean |w|`` per group."""
    alpha = reduce_groups(w, axis, block_size, lambda g, axis: np.nanmean(np.abs(g), axis=axis))
    codes = np.where(np.asarray(w) >= 0, 1, -1).astype(np.int8)
    return codes, alpha


def ternarize(
    w: np.ndarray, *, axis: int | None, block_size: int = 0, rule: TernaryRule = "optimal"
) -> tuple[np.ndarray, np.ndarray]:
    """Codes in {-1, 0, +1} and the least-squares ``alpha`` for them, per group."""
    source = np.asarray(w)
    w = np.asarray(w, dtype=np.float64)
    shape = w.shape
    if rule == "twn":
        mean_abs = reduce_groups(w, axis, block_size, lambda g, axis: np.nanmean(np.abs(g), axis))
        delta = TWN_FACTOR * mean_abs
    elif rule == "optimal":
        # exact: the groups keep the weight's own dtype, which sorts several times faster
        # than float64; _optimal_threshold sums in float64 itself, so the result is the same
        delta = reduce_groups(source, axis, block_size, _optimal_threshold, exact=True)
    else:
        raise ValueError(f"unknown ternary rule '{rule}' (optimal, twn)")
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
