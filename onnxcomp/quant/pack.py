"""Sub-byte packing in ONNX's layout: INT4 and INT2 elements in row-major order, the first
element in the lowest bits of each byte, the last byte padded with zero bits."""

from __future__ import annotations

import numpy as np

# Values packed at once: the int64 temporaries stay small for a big weight.
CHUNK = 1 << 22


def pack(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack signed ``bits``-bit integers (4 or 2) into a flat uint8 array."""
    if bits not in (2, 4):
        raise ValueError(f"only 2- and 4-bit values are packed, not {bits}")
    flat = np.asarray(values).reshape(-1)
    if flat.size <= CHUNK:
        return _pack(flat, bits)
    out = np.empty(-(-flat.size * bits // 8), dtype=np.uint8)
    per_chunk = CHUNK * bits // 8  # bytes: CHUNK is a multiple of every per-byte count
    for start in range(0, flat.size, CHUNK):
        out[start * bits // 8 : start * bits // 8 + per_chunk] = _pack(
            flat[start : start + CHUNK], bits
        )
    return out


def _pack(values: np.ndarray, bits: int) -> np.ndarray:
    per_byte = 8 // bits
    flat = values.astype(np.int64)
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if flat.size and (flat.min() < low or flat.max() > high):
        raise ValueError(f"values outside the {bits}-bit range [{low}, {high}]")
    codes = flat & (2**bits - 1)
    codes = np.pad(codes, (0, -flat.size % per_byte)).reshape(-1, per_byte)
    shifts = np.arange(per_byte, dtype=np.int64) * bits
    return (codes << shifts).sum(axis=1).astype(np.uint8)


def unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The first ``count`` signed ``bits``-bit integers (int8) held in ``packed``."""
    if bits not in (2, 4):
        raise ValueError(f"only 2- and 4-bit values are packed, not {bits}")
    per_byte = 8 // bits
    shifts = np.arange(per_byte, dtype=np.uint8) * bits
    codes = (np.asarray(packed, dtype=np.uint8)[:, None] >> shifts) & (2**bits - 1)
    codes = codes.reshape(-1)[:count].astype(np.int8)
    return np.where(codes >= 2 ** (bits - 1), codes - 2**bits, codes).astype(np.int8)
