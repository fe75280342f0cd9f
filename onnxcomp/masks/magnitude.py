"""Unstructured magnitude masks: zero exactly the ``round(sparsity * size)`` lowest scores.

Ties are broken by position: among equal scores, the element with the lower flat (row-major)
index is pruned first; across tensors (global masks) earlier tensors come first. The threshold
is found with ``np.partition`` (linear time); only elements equal to it are ever ordered.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


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
