"""Sub-byte packing in ONNX's layout: INT4 and INT2 elements in row-major order, the first
element in the lowest bits of each byte, the last byte padded with zero bits."""

from __future__ import annotations

import sys

import numpy as np

PIECE_WORDS = 1 << 16  # words packed at once: the temporaries stay in cache


def pack(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack signed ``bits``-bit integers (4 or 2) into a flat uint8 array."""
    if bits not in (2, 4):
        raise ValueError(f"only 2- and 4-bit values are packed, not {bits}")
    per_byte = 8 // bits
    flat = np.asarray(values).reshape(-1)
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if flat.size and (flat.min() < low or flat.max() > high):
        raise ValueError(f"values outside the {bits}-bit range [{low}, {high}]")
    flat = np.ascontiguousarray(flat, dtype=np.int8)
    # Little-endian words of per_byte codes: one shifted, masked OR per code position folds a
    # word into its low byte, a cache-sized piece at a time (no temporaries wider than it).
    codes = flat.view(np.uint8)
    whole = flat.size - flat.size % per_byte
    packed = np.empty(-(-flat.size // per_byte), dtype=np.uint8)
    if whole and sys.byteorder == "little":
        word = np.uint16 if bits == 4 else np.uint32
        words = codes[:whole].view(word)
        mask = word(2**bits - 1)
        step = PIECE_WORDS
        for start in range(0, words.size, step):
            part = words[start : start + step]
            folded = part & mask
            for i in range(1, per_byte):
                shifted = part >> word(8 * i - bits * i)
                shifted &= word((2**bits - 1) << (bits * i))
                folded |= shifted
            packed[start : start + part.size] = folded  # the low byte
    else:
        whole = 0
    rest = codes[whole:] & np.uint8(2**bits - 1)
    rest = np.pad(rest, (0, -rest.size % per_byte)).reshape(-1, per_byte)
    tail = rest[:, 0].copy()
    for i in range(1, per_byte):
        tail |= rest[:, i] << np.uint8(i * bits)
    packed[whole // per_byte :] = tail
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
