"""Sub-byte packing in ONNX's layout: INT4 and INT2 elements in row-major order, the first
element in the lowest bits of each byte, the last byte padded with zero bits."""

from __future__ import annotations

import numpy as np


def pack(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack signed ``bits``-bit integers (4 or 2) into a flat uint8 array."""
    if bits not in (2, 4):
        raise ValueError(f"only 2- and 4-bit values are packed, not {bits}")
    per_byte = 8 // bits
    flat = np.asarray(values).reshape(-1)
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if flat.size and (flat.min() < low or flat.max() > high):
        raise ValueError(f"values outside the {bits}-bit range [{low}, {high}]")
    # In bytes throughout (the low bits of two's complement): a big weight's codes are packed
    # without temporaries wider than the codes themselves.
    codes = flat.astype(np.uint8) & np.uint8(2**bits - 1)
    codes = np.pad(codes, (0, -flat.size % per_byte)).reshape(-1, per_byte)
    packed = codes[:, 0].copy()
    for i in range(1, per_byte):
        packed |= codes[:, i] << np.uint8(i * bits)
    return packed


def unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The first ``count`` signed ``bits``-bit integers (int8) held in ``packed``."""
    if bits not in (2, 4):
        raise ValueError(f"only 2- and 4-bit values are packed, not {bits}")
    per_byte = 8 // bits
    shifts = np.arange(per_byte, dtype=np.uint8) * bits
    codes = (np.asarray(packed, dtype=np.uint8)[:, None] >> shifts) & (2**bits - 1)
    codes = codes.reshape(-1)[:count].astype(np.int8)
    return np.where(codes >= 2 ** (bits - 1), codes - 2**bits, codes).astype(np.int8)
