"""N:M semi-structured masks: in every group of ``m`` consecutive elements along one axis (the
reduction axis of the layer), keep the ``n`` highest scores and zero the rest.

This is the pattern sparse tensor cores accelerate (2:4 on NVIDIA Ampere and later). When the
axis length is not a multiple of ``m``, the last group is short; it is treated as if padded
with zeros up to ``m`` (the pad counts as the pruned elements first), so a short group of
``r`` elements keeps ``min(n, r)``. That is exactly what a runtime that pads the reduction
dimension to a multiple of ``m`` sees. Ties are broken by position: among equal scores the
element earlier along the axis is pruned first.
"""

from __future__ import annotations

import numpy as np

# Scores ranked at once: the float64 and argsort temporaries stay small for a big weight.
CHUNK_ELEMENTS = 1 << 20


def nm_mask(scores: np.ndarray, n: int, m: int, axis: int) -> np.ndarray:
    """Keep mask with at most ``n`` kept elements in every group of ``m`` along ``axis``."""
    _check_nm(n, m)
    moved = np.moveaxis(np.asarray(scores), axis, -1)
    if moved.ndim < 2:
        return _nm_keep(moved, n, m)
    keep = np.empty(moved.shape, dtype=bool)
    step = max(1, CHUNK_ELEMENTS * moved.shape[0] // max(moved.size, 1))
    for start in range(0, moved.shape[0], step):  # groups never span the leading axis
        keep[start : start + step] = _nm_keep(moved[start : start + step], n, m)
    return np.moveaxis(keep, -1, axis)


def _nm_keep(scores: np.ndarray, n: int, m: int) -> np.ndarray:
    """:func:`nm_mask` along the last axis of ``scores``."""
    moved = scores.astype(np.float64)
    length = moved.shape[-1]
    pad = (-length) % m
    if pad:
        # -inf pads are pruned first, standing in for the zeros a runtime pads with.
        fill = np.full((*moved.shape[:-1], pad), -np.inf)
        moved = np.concatenate([moved, fill], axis=-1)
    groups = moved.reshape(*moved.shape[:-1], -1, m)
    order = np.argsort(groups, axis=-1, kind="stable")
    keep = np.ones(groups.shape, dtype=bool)
    np.put_along_axis(keep, order[..., : m - n], False, axis=-1)
    return keep.reshape(moved.shape)[..., :length]


def group_nonzeros(array: np.ndarray, m: int, axis: int) -> np.ndarray:
    """Nonzero count of every group of ``m`` consecutive elements along ``axis`` (a short last
    group is counted as padded with zeros); shape: the other axes, then the group index."""
    moved = np.moveaxis(np.asarray(array) != 0, axis, -1)
    pad = (-moved.shape[-1]) % m
    if pad:
        moved = np.concatenate([moved, np.zeros((*moved.shape[:-1], pad), bool)], axis=-1)
    return moved.reshape(*moved.shape[:-1], -1, m).sum(axis=-1)


def satisfies_nm(array: np.ndarray, n: int, m: int, axis: int) -> bool:
    """Whether every group of ``m`` along ``axis`` holds at most ``n`` nonzeros."""
    _check_nm(n, m)
    return bool(np.all(group_nonzeros(array, m, axis) <= n))


def _check_nm(n: int, m: int) -> None:
    if not 0 <= n < m:
        raise ValueError(f"N:M needs 0 <= n < m, got {n}:{m}")
