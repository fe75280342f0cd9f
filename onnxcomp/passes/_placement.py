"""Where int8 pays: choosing a placement of int8 regions from ONNX Runtime timings.

Integer kernels are not faster than float everywhere: on x86 CPUs without VNNI ONNX Runtime's
int8 GEMM has no dot-product instruction, small layers pay more for quantising their inputs
than they save, and a QDQ pair ONNX Runtime does not fuse costs two passes over a tensor. So a
pass that can place int8 in several ways (regions of quantised nodes, HardSwish in int8 or in
float) times the candidates here, on the machine that will run the model, and keeps the
fastest. What this module promises:

- every timing is :func:`onnxcomp.bench.measure` (one timing loop in onnxcomp), ONNX Runtime at
  level ``all`` on one thread, candidates interleaved run by run, the median kept;
- :func:`choose_placement` returns a placement that, as measured, is not slower than float at
  any of the batch sizes it timed (within :data:`NOISE_MARGIN`), or says to stay in float;
- the timer is a parameter, so the decisions can be tested with a deterministic fake.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnxcomp import runtime
from onnxcomp.bench import measure

Feeds = Mapping[str, np.ndarray]
# (models, one feed per batch size, seconds) -> median seconds per model per batch size
Timer = Callable[[Sequence[ir.Model], Sequence[Feeds], float], list[list[float]]]
MAX_RUNS = 100_000  # the time budget decides: tiny models get many runs, big ones few
# A placement within 2% of float's median counts as "not slower": medians of interleaved runs
# of the same model differ by about that much on a quiet machine.
NOISE_MARGIN = 0.02


@dataclasses.dataclass(frozen=True)
class Region:
    """A connected group of quantised nodes (Conv/MatMul/Gemm and the int8 ops around them):
    the unit that stays int8 or goes back to float. ``cores`` names its Conv/MatMul/Gemm by
    output value, which is what the planner is told to keep float."""

    name: str
    cores: frozenset[str]
    ops: Mapping[str, int]

    def describe(self) -> str:
        ops = ", ".join(f"{op} x{n}" if n > 1 else op for op, n in sorted(self.ops.items()))
        return f"{self.name} ({ops})"


# (hard-activation mode, core names to keep float) -> (quantised model, its regions)
Build = Callable[[str, frozenset[str]], tuple[ir.Model, list[Region]]]


@dataclasses.dataclass
class Placement:
    """What :func:`choose_placement` decided and measured (times in milliseconds)."""

    mode: str
    keep_float: frozenset[str] = frozenset()
    float_only: bool = False
    batches: tuple[int, ...] = ()
    mode_ms: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    regions: list[dict[str, object]] = dataclasses.field(default_factory=list)
    final_ms: dict[str, list[float]] = dataclasses.field(default_factory=dict)

    def ratios(self) -> list[float]:
        """The chosen placement's latency over float's, per batch size (empty if not timed)."""
        if "fp32" not in self.final_ms:
            return []
        return [t / f for t, f in zip(self.final_ms["int8"], self.final_ms["fp32"], strict=True)]


def ort_timer(
    models: Sequence[ir.Model], feeds: Sequence[Feeds], seconds: float
) -> list[list[float]]:
    """Median latency of each model on each feed: ONNX Runtime level ``all``, one thread,
    models interleaved run by run, ``seconds`` shared by the feeds (at least one run each)."""
    sessions = [runtime.make_session(m, level="all", threads=1) for m in models]
    medians = [[0.0] * len(feeds) for _ in models]
    for j, feed in enumerate(feeds):
        times = measure(
            [lambda s=s, f=feed: s.run(None, dict(f)) for s in sessions],
            runs=MAX_RUNS,
            warmup=1,
            time_budget=seconds / len(feeds),
        )
        for i, samples in enumerate(times):
            medians[i][j] = float(np.median(samples))
    return medians


def choose_placement(
    build: Build,
    modes: Sequence[str],
    feeds: Mapping[int, Feeds],
    *,
    timer: Timer,
    seconds: float,
    float_model: ir.Model | None = None,
) -> Placement:
    """Time candidate placements and keep the fastest; greedy, in three steps.

    1. Every mode with all its regions int8 (and ``float_model`` when given) is timed in one
       loop; modes are ranked by the sum over batch sizes of their latency relative to float
       (to the first mode without ``float_model``: then the best mode is the answer).
    2. For the best mode, with more than one region: each region in turn is put back in float,
       and stays float unless its int8 version pays, i.e. the model with it in int8 is faster
       (sum of latency ratios over the batch sizes) and not slower at any batch size.
    3. The result is timed against float; if it is slower at some batch size (beyond
       :data:`NOISE_MARGIN`), steps 2-3 are tried with the next mode, and if none passes the
       placement is float only.

    ``feeds`` maps each batch size to an input; ``seconds`` is the budget of all timing loops
    together, split evenly between the most loops these steps can take.
    """
    batches = tuple(feeds)
    inputs = [feeds[b] for b in batches]
    trials = {mode: build(mode, frozenset()) for mode in modes}
    counts = [len(regions) for _, regions in trials.values()]
    if not any(counts):
        return Placement(modes[0], batches=batches)  # nothing would be int8: nothing to time
    loops = 1
    if float_model is not None:
        loops += sum(1 + (n if n > 1 else 0) for n in counts)
    budget = seconds / loops
    candidates = [trials[m][0] for m in modes]
    if float_model is not None:
        candidates.insert(0, float_model)
    times = timer(candidates, inputs, budget)
    base = times[0]
    mode_times = dict(zip(modes, times[1:] if float_model is not None else times, strict=True))
    ranked = sorted(modes, key=lambda m: sum(latency_ratios(mode_times[m], base)))
    mode_ms = {m: to_ms(t) for m, t in mode_times.items()}
    if float_model is None:
        return Placement(ranked[0], batches=batches, mode_ms=mode_ms)
    mode_ms = {"fp32": to_ms(base), **mode_ms}
    tried = []
    for mode in ranked:
        model, regions = trials[mode]
        if not regions:
            continue
        placement = _revert_regions(
            mode, model, regions, mode_times[mode], base, build, float_model, inputs,
            lambda models: timer(models, inputs, budget),
        )  # fmt: skip
        placement.batches, placement.mode_ms = batches, mode_ms
        if not placement.float_only:
            return placement
        tried.append(placement)
    return tried[0]


def _revert_regions(
    mode: str,
    model: ir.Model,
    regions: Sequence[Region],
    int8_times: list[float],
    float_times: list[float],
    build: Build,
    float_model: ir.Model,
    inputs: Sequence[Feeds],
    timed: Callable[[Sequence[ir.Model]], list[list[float]]],
) -> Placement:
    """Steps 2 and 3 of :func:`choose_placement` for one mode, from its all-int8 ``model``
    and the step-1 medians of it and of float."""
    placement = Placement(mode)
    current, current_times, base = model, int8_times, float_times
    keep_float: frozenset[str] = frozenset()
    every = frozenset().union(*(r.cores for r in regions))
    if len(regions) == 1:
        placement.regions.append(_decision(regions[0], True, current_times, base))
    else:
        for region in regions:
            wanted = keep_float | region.cores
            # Reverting the last int8 region leaves float itself: time the float model.
            candidate = float_model if wanted == every else build(mode, wanted)[0]
            with_int8, without = timed([current, candidate])
            ratios = latency_ratios(with_int8, without)
            pays = sum(ratios) < len(ratios) and all(r <= 1.0 for r in ratios)
            placement.regions.append(_decision(region, pays, with_int8, without))
            if not pays:
                keep_float = wanted
                current, current_times = candidate, without
        if keep_float == every:
            base = current_times
        elif keep_float:
            base, current_times = timed([float_model, current])
    placement.keep_float = keep_float
    placement.final_ms = {"fp32": to_ms(base), "int8": to_ms(current_times)}
    slower = any(r > 1 + NOISE_MARGIN for r in latency_ratios(current_times, base))
    placement.float_only = keep_float == every or slower
    return placement


def replaces(times: Sequence[float], current: Sequence[float], base: Sequence[float]) -> bool:
    """Whether a candidate timed ``times`` should replace one timed ``current``: not slower
    than float (``base``) at any batch size, beyond :data:`NOISE_MARGIN`, and faster than the
    current one summed over the batch sizes (all three from one timing loop)."""
    ratios = latency_ratios(times, base)
    return all(r <= 1 + NOISE_MARGIN for r in ratios) and sum(ratios) < sum(
        latency_ratios(current, base)
    )


def latency_ratios(times: Sequence[float], base: Sequence[float]) -> list[float]:
    return [t / b if b > 0 else 1.0 for t, b in zip(times, base, strict=True)]


def to_ms(times: Sequence[float]) -> list[float]:
    return [round(t * 1e3, 3) for t in times]


def _decision(
    region: Region, int8: bool, int8_times: Sequence[float], float_times: Sequence[float]
) -> dict[str, object]:
    """One region's record: kept int8 or not, and the medians (ms per batch size) of the
    model with the region in int8 and with it in float, from the same timing loop."""
    return {
        "region": region.describe(),
        "int8": int8,
        "int8_ms": to_ms(int8_times),
        "float_ms": to_ms(float_times),
    }


__all__ = [
    "NOISE_MARGIN",
    "Placement",
    "Region",
    "choose_placement",
    "latency_ratios",
    "ort_timer",
    "replaces",
    "to_ms",
]
