"""GPTQ: weight quantisation that compensates each column's rounding error with the columns not
yet quantised, using the inverse Hessian of the layer's inputs (Frantar et al., 2022).

For a linear layer ``y = x @ w`` (``w`` is ``[in, out]``, MatMul's layout) the output error of a
quantised ``q`` on calibration inputs ``X`` is ``tr((w - q)^T H (w - q))`` with
``H = X^T X``. Round-to-nearest minimises each element's error alone; GPTQ quantises one input
row of ``w`` at a time and moves the rest by ``-err * Hinv[i, j:] / Hinv[i, i]``, the update
that minimises the output error given that row is fixed. With correlated inputs this lowers the
output error a lot; with uncorrelated inputs (``H`` diagonal) it equals round-to-nearest.

Codes, scales and zero points come back in :mod:`onnxcomp.quant.linear`'s layout for blocks
along the input axis (``axis=0``), so :func:`onnxcomp.quant.dequantize` reads them back. Scales
are computed per block from the weights as updated so far (as the reference implementation
does), then stored in ``dtype`` before rounding, so the codes are exact for the stored scale.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from onnxcomp.quant.clip import clip_search
from onnxcomp.quant.linear import linear_params, qrange


@dataclasses.dataclass
class Hessian:
    """Running ``X^T X / n`` of a layer's inputs (float64), fed batch by batch."""

    size: int
    matrix: np.ndarray = dataclasses.field(init=False)
    count: int = 0

    def __post_init__(self) -> None:
        self.matrix = np.zeros((self.size, self.size))

    def add(self, x: np.ndarray) -> None:
        """Add inputs ``x`` (any leading shape, last axis = ``size``)."""
        rows = np.asarray(x, dtype=np.float64).reshape(-1, self.size)
        total = self.count + len(rows)
        if total == 0:
            return
        self.matrix *= self.count / total
        self.matrix += rows.T @ rows / total
        self.count = total


def output_error(w: np.ndarray, w_hat: np.ndarray, hessian: np.ndarray) -> float:
    """Mean squared output error per input row, ``tr((w - w')^T H (w - w')) / out``, of
    replacing ``w`` by ``w_hat`` for inputs with second moment ``hessian``."""
    e = np.asarray(w, np.float64) - np.asarray(w_hat, np.float64)
    return float(np.sum(e * (hessian @ e)) / e.shape[1])


def gptq_quantize(
    w: np.ndarray,
    hessian: np.ndarray,
    bits: int,
    *,
    block_size: int = 0,
    symmetric: bool = True,
    dtype: np.dtype | type = np.float32,
    damp: float = 0.01,
    lazy: int = 128,
    clip: bool = False,
    act_order: bool = False,
    factor: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Codes (int8, shape of ``w``), scale and zero point (None when symmetric) of ``w``.

    ``w`` is ``[in, out]``; ``block_size`` groups input rows (scales ``[in / block, out]``, as
    :func:`onnxcomp.quant.linear_params` with ``axis=0``); 0 gives one scale per output column
    (shape ``[out]``, ``axis=1``);
    ``damp`` adds that fraction of the mean diagonal to ``H`` (it must be invertible; inputs
    that never fire get a unit diagonal and their rows are zeroed, as they do not matter);
    ``lazy`` is how many rows are updated together before the rest of ``w`` is (speed only);
    ``clip`` picks each group's range by :func:`onnxcomp.quant.clip_search` instead of its
    min/max; ``act_order`` quantises rows in order of decreasing ``H`` diagonal (inputs with
    the most energy first, while the most rows are left to compensate) with every group's
    scale fixed up front from ``w`` ("static groups", so the file layout does not change);
    ``factor`` is :func:`inverse_hessian_factor` of ``hessian`` permuted by
    :func:`act_order_permutation` when ``act_order`` is set, as given otherwise, when the
    caller has it (layers reading the same input share it).
    """
    w = np.asarray(w, dtype=np.float64)
    rows, cols = w.shape
    if hessian.shape != (rows, rows):
        raise ValueError(f"hessian must be {rows}x{rows}, not {hessian.shape}")
    qmin, qmax = qrange(bits, symmetric)
    order = act_order_permutation(hessian) if act_order else np.arange(rows)
    if factor is None:
        factor = inverse_hessian_factor(hessian[np.ix_(order, order)], damp)
    u, dead = factor
    work = w[order]
    work[dead] = 0.0

    group = block_size or rows
    n_groups = -(-rows // group)
    scales = np.zeros((n_groups, cols), dtype=np.dtype(dtype))
    zeros = None if symmetric else np.zeros((n_groups, cols), dtype=np.int8)
    known = np.zeros(n_groups, dtype=bool)

    def set_params(g: int, span: np.ndarray, first: int) -> None:
        if clip:
            h_span = hessian[first : first + len(span), first : first + len(span)]
            scale, zp = clip_search(span, h_span, bits, symmetric=symmetric, dtype=dtype)
        else:
            scale, zp = linear_params(span, bits, axis=1, symmetric=symmetric, dtype=dtype)
        scales[g] = scale
        if zeros is not None:
            zeros[g] = zp
        known[g] = True

    if act_order or not block_size:
        for g in range(n_groups):  # from the weights as given
            set_params(g, w[g * group : (g + 1) * group], g * group)
    elif block_size:
        lazy = max(block_size, lazy // block_size * block_size)  # groups start inside a batch
    codes = np.zeros((rows, cols), dtype=np.int8)
    for start in range(0, rows, lazy):
        stop = min(start + lazy, rows)
        block = work[start:stop]  # a view: updated in place
        errors = np.zeros_like(block)
        for i in range(stop - start):
            row = int(order[start + i])
            g = row // group
            if not known[g]:  # in order, so the group's rows are block[i : i + group]
                set_params(g, block[i : i + group], row)
            scale = scales[g].astype(np.float64)
            zero = 0.0 if zeros is None else zeros[g].astype(np.float64)
            q = np.clip(np.rint(block[i] / scale) + zero, qmin, qmax)
            codes[row] = q.astype(np.int8)
            err = (block[i] - (q - zero) * scale) / u[start + i, start + i]
            block[i:] -= np.outer(u[start + i, start + i : stop], err)
            errors[i] = err
        work[stop:] -= u[start:stop, stop:].T @ errors
    if not block_size:  # per output column: linear's axis=1 layout
        return codes, scales[0], None if zeros is None else zeros[0]
    return codes, scales, zeros


def act_order_permutation(hessian: np.ndarray) -> np.ndarray:
    """Rows by decreasing ``H`` diagonal (stable): GPTQ's ``act_order``."""
    return np.argsort(-np.diag(hessian), kind="stable")


def inverse_hessian_factor(
    hessian: np.ndarray, damp: float = 0.01
) -> tuple[np.ndarray, np.ndarray]:
    """Upper triangular ``U`` with ``U^T U = (H + damp * mean(diag H) * I)^-1``, and the mask of
    dead inputs (zero diagonal; given a unit diagonal). Row ``i`` of ``U`` holds the update GPTQ
    applies to the rows after ``i``, and ``U[i, i]`` its denominator.

    One Cholesky factorisation of ``H`` with its rows and columns reversed gives ``H = R R^T``
    with ``R`` upper triangular; then ``U = R^-1``."""
    h = np.array(hessian, dtype=np.float64)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    h[np.diag_indices(len(h))] += damp * float(np.mean(np.diag(h)))
    lower = np.linalg.cholesky(h[::-1, ::-1])
    r = lower[::-1, ::-1]
    return np.triu(np.linalg.inv(r)), dead
