"""Sub-byte packing in ONNX's layout: INT4 and INT2 elements in row-major order, the first
element in the lowest bits of each byte, the last byte padded with zero bits."""

from __future__ import annotations

import sys

import numpy as np

from onnxcomp import chunks

PIECE_WORDS = 1 << 16  # words packed at once: the temporaries stay in cache


def pack(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack signed ``bits``-bit integers (4 or 2) into a flat uint8 array."""
    if bits not in (2, 4):
        raise ValueError(f"only 2- and 4-bit values are packed, not {bits}")
    per_byte = 8 // bits
    source = np.asarray(values).reshape(-1)
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if source.dtype != np.int8 and source.size and (source.min() < low or source.max() > high):
        raise ValueError(f"values outside the {bits}-bit range [{low}, {high}]")  # before int8
    flat = np.ascontiguousarray(source, dtype=np.int8)
    # Little-endian words of per_byte codes: one shifted, masked OR per code position folds a
    # word into its low byte, a cache-sized piece at a time (no temporaries wider than it),
    # slices of the words on threads.
    codes = flat.view(np.uint8)
    whole = flat.size - flat.size % per_byte if sys.byteorder == "little" else 0
    packed = np.empty(-(-flat.size // per_byte), dtype=np.uint8)
    word = np.uint16 if bits == 4 else np.uint32
    words = codes[:whole].view(word)
    mask = word(2**bits - 1)

    def pack_slice(start: int, stop: int) -> tuple[int, int]:
        """Pack words [start, stop); the smallest and largest of their codes (taken from
        each piece while it is in cache)."""
        smallest, largest = low, high
        for begin, end in chunks.pieces(start, stop, PIECE_WORDS):
            piece = flat[begin * per_byte : end * per_byte]
            smallest = min(smallest, int(piece.min()))
            largest = max(largest, int(piece.max()))
            part = words[begin:end]
            folded = part & mask
            for i in range(1, per_byte):
                shifted = part >> word(8 * i - bits * i)
                shifted &= word((2**bits - 1) << (bits * i))
                folded |= shifted
            packed[begin:end] = folded  # the low byte
        return smallest, largest

    extremes = chunks.map_slices(pack_slice, words.size)
    rest = flat[whole:]
    if rest.size:
        extremes.append((int(rest.min()), int(rest.max())))
    if any(smallest < low or largest > high for smallest, largest in extremes):
        raise ValueError(f"values outside the {bits}-bit range [{low}, {high}]")
    rest = rest.view(np.uint8) & np.uint8(2**bits - 1)
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
