"""Truncated SVD: ``W[m, n] ≈ L[m, r]·R[r, n]``, ``L = U_r·sqrt(S_r)``, ``R = sqrt(S_r)·V_r^T``.

Splitting the singular values evenly between the factors keeps both on the same scale (better
conditioned for fine-tuning and for quantising them later). By Eckart–Young the truncation is
the best rank-``r`` approximation in the Frobenius norm, and its relative error is
``sqrt(sum(s[r:]^2) / sum(s^2))``, which :func:`relative_error` returns without forming the
product. Factoring saves parameters only when ``r·(m + n) < m·n``; :func:`break_even_rank`
is the largest such ``r``. Computation runs in float64; factors come back in ``W``'s dtype.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class Factors:
    """``left @ right`` approximates the matrix; ``relative_error`` is the Frobenius error over
    the matrix's norm, ``energy`` the share of squared singular values kept."""

    left: np.ndarray
    right: np.ndarray
    relative_error: float
    energy: float

    @property
    def rank(self) -> int:
        return int(self.left.shape[1])


def break_even_rank(m: int, n: int) -> int:
    """The largest rank whose factors hold fewer parameters than the ``m x n`` matrix."""
    return (m * n - 1) // (m + n)


def rank_for_energy(singular_values: np.ndarray, energy: float) -> int:
    """The fewest leading singular values whose squares hold ``energy`` of the total (0 for
    an all-zero matrix)."""
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], not {energy}")
    squares = np.square(np.asarray(singular_values, dtype=np.float64))
    total = squares.sum()
    if total == 0:
        return 0
    kept = np.cumsum(squares) / total
    # a relative slack of 1e-12 so energy=1.0 is not missed to rounding
    return int(np.searchsorted(kept, energy - 1e-12) + 1)


def rank_for_ratio(m: int, n: int, ratio: float) -> int:
    """``ratio`` of the full rank ``min(m, n)``, rounded, at least 1."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], not {ratio}")
    return max(1, round(ratio * min(m, n)))


def relative_error(singular_values: np.ndarray, rank: int) -> float:
    """``||W - W_r||_F / ||W||_F`` for the best rank-``rank`` approximation ``W_r``."""
    squares = np.square(np.asarray(singular_values, dtype=np.float64))
    total = squares.sum()
    return math.sqrt(squares[rank:].sum() / total) if total > 0 else 0.0


def singular_values(w: np.ndarray) -> np.ndarray:
    """Singular values of a 2-D matrix, largest first (float64)."""
    return np.linalg.svd(np.asarray(w, dtype=np.float64), compute_uv=False)


def factorize(w: np.ndarray, rank: int) -> Factors:
    """The rank-``rank`` truncated SVD of the 2-D matrix ``w`` as two factors."""
    if w.ndim != 2:
        raise ValueError(f"factorize needs a 2-D matrix, got shape {w.shape}")
    if not 1 <= rank <= min(w.shape):
        raise ValueError(f"rank must be in [1, {min(w.shape)}], not {rank}")
    u, s, vt = np.linalg.svd(np.asarray(w, dtype=np.float64), full_matrices=False)
    root = np.sqrt(s[:rank])
    left = (u[:, :rank] * root).astype(w.dtype)
    right = (root[:, None] * vt[:rank]).astype(w.dtype)
    squares = np.square(s)
    total = squares.sum()
    energy = float(squares[:rank].sum() / total) if total > 0 else 1.0
    return Factors(left, right, relative_error(s, rank), energy)
