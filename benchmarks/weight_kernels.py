"""Per-tensor compute of ``prune`` (magnitude, per layer) and ``fp16``: before and after.

Times, on random float32 weights of the shapes of ``benchmarks/bigmodel.py``'s 3 GB model, the
code the passes ran before they went through :mod:`onnxcomp.chunks` (written out here) and
what they run now, alternately in one process (best of ``--repeat``), and checks that both
give the same bits. Arrays are in memory: reading a memory-mapped file and writing the result
out come on top in a real run (``benchmarks/bigmodel.py`` times those).

    python benchmarks/weight_kernels.py                 # every shape, 3 repeats
    python benchmarks/weight_kernels.py --shapes 4096x8192 --repeat 5
"""

from __future__ import annotations

import argparse
import os
import time
import zlib
from collections.abc import Callable

import numpy as np
import onnx_ir as ir
from _runner import cpu_header
from rich.table import Table

from onnxcomp import masks
from onnxcomp.passes import fp16, prune
from onnxcomp.report import console

SHAPES = ("4096x8192", "4096x4096x3x1", "32000x4096")


def old_prune(array: np.ndarray, sparsity: float) -> tuple[np.ndarray, int, int]:
    """prune's magnitude path before: score, mask, np.where, two zero counts."""
    score = np.abs(array).astype(np.float32, copy=False)
    keep = masks.magnitude_mask(score, sparsity)
    del score
    pruned = np.where(keep, array, np.zeros((), array.dtype))
    return pruned, pruned.size - np.count_nonzero(pruned), array.size - np.count_nonzero(array)


def old_deflated(array: np.ndarray) -> int:
    flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    chunk = prune.ZIP_SAMPLE_BYTES // 8
    starts = np.linspace(0, flat.size - chunk, 8).astype(np.int64)
    sampled = sum(len(zlib.compress(flat[s : s + chunk].tobytes(), 6)) for s in starts)
    return int(sampled * flat.size / (chunk * 8))


def old_to_half(array: np.ndarray) -> tuple[np.ndarray, int]:
    new = array.astype(np.float16)
    return new, int(np.count_nonzero((new == 0) & (array != 0)))


def old_max_abs(array: np.ndarray) -> float:
    flat, peak = array.reshape(-1), 0.0
    for start in range(0, flat.size, 1 << 20):
        part = flat[start : start + (1 << 20)]
        finite = part[np.isfinite(part)]
        if finite.size:
            peak = max(peak, float(np.abs(finite).max()))
    return peak


def _best(run: Callable[[], object], repeat: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(SHAPES), help="e.g. 4096x8192,1024x1024")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--sparsity", type=float, default=0.5)
    args = parser.parse_args()
    out = console()
    out.print(f"{cpu_header()}; {os.cpu_count()} cores", highlight=False)
    table = Table(title="seconds per tensor (best of --repeat), before -> after")
    for column in ("shape", "function", "before", "after", "speed-up", "same bits"):
        table.add_column(column, justify="left" if column in ("shape", "function") else "right")
    rng = np.random.default_rng(0)
    for spec in args.shapes.split(","):
        shape = tuple(int(d) for d in spec.split("x"))
        w = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
        for name, before, after in _pairs(w, args.sparsity):
            old_s, old = _best(before, args.repeat)
            new_s, new = _best(after, args.repeat)
            table.add_row(spec, name, f"{old_s:.3f}", f"{new_s:.3f}", f"{old_s / new_s:.1f}x",
                          "yes" if _same(old, new) else "NO")  # fmt: skip
            del old, new
    out.print(table)


def _pairs(w: np.ndarray, sparsity: float) -> list[tuple[str, Callable, Callable]]:
    """(function, before, after) for weight ``w``."""
    count, tensor = masks.prune_count(w.size, sparsity), ir.tensor(w)
    reused = np.empty_like(w)  # what a streamed model's pruning writes to after its first weights
    return [
        ("prune: mask + where", lambda: old_prune(w, sparsity)[0],
         lambda: masks.prune_smallest(w, count)[0]),
        ("prune: into new / reused memory", lambda: masks.prune_smallest(w, count)[0],
         lambda: masks.prune_smallest(w, count, out=reused)[0]),
        ("prune: deflate stat", lambda: old_deflated(w),
         lambda: prune._ZipSample.of(w).deflated()),
        ("fp16: cast + flushed", lambda: old_to_half(w), lambda: fp16._to_half(tensor)[:2]),
        ("fp16: range check", lambda: old_max_abs(w), lambda: fp16._max_abs(w)),
    ]  # fmt: skip


def _same(a: object, b: object) -> bool:
    if isinstance(a, tuple) and isinstance(b, tuple):
        return all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    return a == b


if __name__ == "__main__":
    main()
