"""ONNX Runtime's ``MatMulNBits`` (com.microsoft) weight layout, from blocked linear codes.

``MatMulNBits(A, B, scales[, zero_points])`` computes ``A @ W`` with ``W`` ``[K, N]`` stored
transposed and blocked along K: ``B`` is uint8 ``[N, ceil(K / block), block * bits / 8]`` of
unsigned codes (4 bits: the even element of a pair in the low nibble), ``scales``
``[N, ceil(K / block)]`` in A's dtype, ``zero_points`` unsigned codes ``[N, ceil(K / block)]``
(8 bits) or packed two to a byte per row (4 bits); without them the zero point is
``2^(bits-1)``. A signed code ``c`` of :mod:`onnxcomp.quant.linear` (zero point ``z``) is the
unsigned ``c + 2^(bits-1)`` (zero point ``z + 2^(bits-1)``), so both forms dequantise to the
same weights. K is padded with zero codes to whole blocks.
"""

from __future__ import annotations

import numpy as np


def to_matmulnbits(
    codes: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray | None,
    bits: int,
    block_size: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``B``, ``scales`` and ``zero_points`` (None when symmetric) for MatMulNBits, from signed
    ``codes`` ``[K, N]`` with ``scale`` / ``zero_point`` ``[ceil(K / block), N]``."""
    if bits not in (4, 8):
        raise ValueError(f"MatMulNBits takes 4 or 8 bits here, not {bits}")
    k, n = codes.shape
    blocks = -(-k // block_size)
    offset = 2 ** (bits - 1)
    unsigned = np.full((n, blocks * block_size), offset, dtype=np.uint8)
    unsigned[:, :k] = (codes.T.astype(np.int16) + offset).astype(np.uint8)
    unsigned = unsigned.reshape(n, blocks, block_size)
    packed = unsigned[..., 0::2] | (unsigned[..., 1::2] << 4) if bits == 4 else unsigned
    scales = np.ascontiguousarray(np.asarray(scale).T)
    zeros = None
    if zero_point is not None:
        z = (np.asarray(zero_point).T.astype(np.int16) + offset).astype(np.uint8)
        if bits == 4:
            z = np.pad(z, ((0, 0), (0, blocks % 2)))
            z = z[:, 0::2] | (z[:, 1::2] << 4)
        zeros = np.ascontiguousarray(z)
    return np.ascontiguousarray(packed), scales, zeros


def from_matmulnbits(
    packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, bits: int, k: int
) -> np.ndarray:
    """The float ``[K, N]`` weight MatMulNBits computes with (the inverse of
    :func:`to_matmulnbits` followed by dequantisation), for checks and for reading back."""
    n, blocks, _ = packed.shape
    if bits == 4:
        unsigned = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, blocks, -1)
    else:
        unsigned = packed
    offset = 2 ** (bits - 1)
    if zero_points is None:
        z = np.full((n, blocks), offset, dtype=np.float64)
    elif bits == 4:
        z = np.stack([zero_points & 0x0F, zero_points >> 4], axis=-1).reshape(n, -1)[:, :blocks]
    else:
        z = zero_points
    values = (unsigned.astype(np.float64) - np.asarray(z, np.float64)[..., None]) * np.asarray(
        scales, np.float64
    ).reshape(n, blocks)[..., None]
    return values.reshape(n, -1)[:, :k].T.astype(np.asarray(scales).dtype)
