"""Elementwise work over a big flat array: slices on a few threads, cache-sized pieces within.

numpy releases the GIL in its loops, so slices of a tensor run in parallel on threads; within
a slice the work goes :data:`PIECE` elements at a time, so its temporaries stay in the CPU's
cache and the memory a call holds is a few pieces per thread, not a tensor. Weight passes that
stream a big model (fp16, magnitude pruning) spend their time in such loops.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

SLICE = 1 << 21  # elements per thread task: few enough tasks, enough to balance two cores
PIECE = 1 << 16  # elements per numpy call: 256 KB of float32, L2-sized
MAX_THREADS = 8


def map_slices(work: Callable[[int, int], T], size: int, step: int | None = None) -> list[T]:
    """``[work(start, stop) for each slice of range(size)]``, slices of ``step`` (default
    :data:`SLICE`) elements run on threads; results in slice order."""
    step = step or SLICE
    return parallel_map(lambda start: work(start, min(start + step, size)), range(0, size, step))


def parallel_map(work: Callable[[int], T], items: Sequence[int]) -> list[T]:
    """``[work(item) for item in items]`` on up to :data:`MAX_THREADS` threads (one per
    core); ``work`` must spend its time in code that releases the GIL (numpy, zlib)."""
    workers = min(len(items), os.cpu_count() or 1, MAX_THREADS)
    if workers <= 1:
        return [work(item) for item in items]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(work, items))


def pieces(start: int, stop: int, step: int | None = None) -> Iterator[tuple[int, int]]:
    """``(begin, end)`` of consecutive pieces of at most ``step`` (default :data:`PIECE`)
    elements covering ``range(start, stop)``."""
    step = step or PIECE
    for begin in range(start, stop, step):
        yield begin, min(begin + step, stop)
