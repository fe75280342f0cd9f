"""Per-layer sensitivity: what each technique costs when applied to one layer alone.

For every weight layer and technique, the technique's pass runs with every *other* layer
excluded (``exclude=``), through :func:`onnxcomp.optimize`, and the result is scored on the
held-out data: the metric drop, bytes saved and, on request, time saved against the input
model. ``passes=P`` instead explains a given pipeline (the culprit finder): P is run whole and
once per layer with that layer left out; the metric a layer's absence wins back is its share of
the error P causes. Layers are evaluated in parallel worker processes, each scoring with one
ONNX Runtime thread; latency, which parallel work would disturb, is timed afterwards in this
process.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

import onnx_ir as ir

from onnxcomp.data import Dataset
from onnxcomp.errors import OnnxcompError, UsageError
from onnxcomp.search.evaluate import DEFAULT_TIMING, Evaluator, Outcome, Timing, model_bytes
from onnxcomp.search.metrics import Metric, resolve_metric
from onnxcomp.search.space import add_exclusions, find_layers, has_op, only
from onnxcomp.target import Target

# technique -> the pass (with options) that applies it; per layer through exclude=
TECHNIQUES: dict[str, str] = {
    "int8": "int8",
    "int4": "int4",
    "int2": "ternary",
    "binary": "binary",
    "int8-act": "int8-static",
    "int8-dynamic": "int8-dynamic",
    "prune-channels": "prune-channels:ratio=0.5",
    "prune": "prune:sparsity=0.5:skip_first=false:skip_last=false",
    "lowrank": "lowrank:ratio=0.5:min_size=0",
}
DEFAULT_TECHNIQUES = ("int8", "int4", "int2", "int8-act", "prune-channels", "prune")
Progress = Callable[[str, int, int], None]


@dataclasses.dataclass
class LayerSensitivity:
    """One layer's figures, technique by technique (None: the technique cannot apply)."""

    name: str
    op_types: tuple[str, ...]
    params: int
    bytes: int
    results: dict[str, Outcome | None] = dataclasses.field(default_factory=dict)

    @property
    def worst_drop(self) -> float:
        drops = [o.drop for o in self.results.values() if o is not None and o.drop is not None]
        return max(drops, default=float("-inf"))


@dataclasses.dataclass
class Culprit:
    """One layer's part in the error of a given pipeline (leave-one-layer-out)."""

    name: str
    drop_without: float | None  # the pipeline's drop with this layer left out
    recovery: float | None  # drop of the whole pipeline minus drop_without
    share: float | None  # recovery / sum of positive recoveries
    error: str | None = None


@dataclasses.dataclass
class SensitivityReport:
    """What :func:`sensitivity` measured; ``layers`` ranked most sensitive first."""

    model: str
    metric: str
    unit: str
    base_score: float
    base_bytes: int
    held_out: str
    prefix: str
    prefix_bytes: int  # after the lossless prefix: what bytes saved are counted from
    techniques: list[str]
    layers: list[LayerSensitivity]
    pipeline: str | None = None  # culprit mode: the pipeline explained
    pipeline_outcome: Outcome | None = None
    culprits: list[Culprit] = dataclasses.field(default_factory=list)

    def drop(self, layer: str, technique: str) -> float | None:
        for row in self.layers:
            if row.name == layer:
                outcome = row.results.get(technique)
                return None if outcome is None else outcome.drop
        return None

    def excluded(self, technique: str, max_drop: float) -> list[str]:
        """Layers where ``technique`` alone drops the metric by more than ``max_drop``."""
        return [
            row.name
            for row in self.layers
            if (o := row.results.get(technique)) is not None
            and (o.error is not None or (o.drop is not None and o.drop > max_drop))
        ]

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["kind"] = "onnxcomp-sensitivity"
        return data


def parse_techniques(text: str | Sequence[str] | None) -> list[str]:
    """``int8,int4`` -> checked technique names (default: :data:`DEFAULT_TECHNIQUES`)."""
    if text is None:
        return list(DEFAULT_TECHNIQUES)
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text)]
    names = [t for t in names if t]
    unknown = [t for t in names if t not in TECHNIQUES]
    if unknown or not names:
        raise UsageError(f"unknown technique '{unknown[0] if unknown else text}' (available: "
                         f"{', '.join(TECHNIQUES)})")  # fmt: skip
    return list(dict.fromkeys(names))


def lossless_prefix(model: ir.Model) -> str:
    """What every per-layer pipeline starts with: BatchNormalization folded first, so a
    Conv's weights are judged as they will be quantised (with BN inside); ``simplify`` when
    the model has Erf, as it puts erf-GELU in the order ONNX Runtime fuses (fewer nodes)."""
    steps = ["fold-bn"] if has_op(model, "BatchNormalization") else []
    if has_op(model, "Erf"):
        steps.append("simplify")
    return ",".join(steps)


def run_sensitivity(
    model: ir.Model,
    fit: Dataset,
    held_out: Dataset,
    *,
    metric: Metric,
    target: Target,
    techniques: Sequence[str] = DEFAULT_TECHNIQUES,
    passes: str | None = None,
    latency: bool = False,
    timing: Timing = DEFAULT_TIMING,
    workers: int = 1,
    label: str = "model",
    progress: Progress | None = None,
) -> SensitivityReport:
    """Measure per-layer sensitivity (or, with ``passes``, each layer's share of its error)."""
    if workers < 1:
        raise UsageError(f"--workers must be >= 1, not {workers}")
    if passes is not None:
        techniques = []
    if any(TECHNIQUES[t].startswith("int8-static") for t in techniques) and fit is None:
        raise UsageError("int8-act needs data to calibrate on")
    evaluator = Evaluator(model, fit, held_out, metric, target=target, timing=timing)
    prefix = lossless_prefix(model) if passes is None else ""
    prepared = _prepared(evaluator, prefix)
    layers = find_layers(prepared)
    if not layers:
        raise OnnxcompError("the model has no weight layers (Conv/Gemm/MatMul/Gather weights in "
                            "initializers) to measure")  # fmt: skip
    jobs: list[tuple[str, str, str]] = []  # (layer, technique or "", pipeline)
    if passes is None:
        for layer in layers:
            for technique in techniques:
                pipeline = only(TECHNIQUES[technique], layer, layers)
                jobs.append((layer.name, technique, ",".join(filter(None, [prefix, pipeline]))))
    else:
        add_exclusions(passes, [])  # unknown passes fail here, before any work
        jobs.append(("", "", passes))
        jobs += [(layer.name, "", add_exclusions(passes, layer.patterns)) for layer in layers]
    outcomes = _run_jobs(evaluator, [p for _, _, p in jobs], workers, progress)
    if latency:
        for index, outcome in enumerate(outcomes):
            if progress:
                progress("timing", index, len(outcomes))
            if outcome.error is None and outcome.applied:
                model_out, _ = evaluator.compress(outcome.pipeline)
                outcome.latency_ms, outcome.speedup = evaluator.latency(model_out)
    report = SensitivityReport(
        model=label, metric=metric.spec, unit=metric.unit, base_score=evaluator.base_score,
        base_bytes=evaluator.base_bytes, held_out=held_out.description, prefix=prefix,
        prefix_bytes=model_bytes(prepared), techniques=list(techniques), layers=[], pipeline=passes,
    )  # fmt: skip
    rows = {layer.name: LayerSensitivity(layer.name, layer.op_types, layer.params, layer.bytes)
            for layer in layers}  # fmt: skip
    if passes is None:
        for (name, technique, _), outcome in zip(jobs, outcomes, strict=True):
            rows[name].results[technique] = outcome if outcome.applied else None
        report.layers = sorted(rows.values(), key=lambda r: -r.worst_drop)
    else:
        report.pipeline_outcome = whole = outcomes[0]
        report.layers = list(rows.values())
        report.culprits = _culprits(whole, [n for n, _, _ in jobs[1:]], outcomes[1:])
    return report


def _culprits(whole: Outcome, names: list[str], outcomes: list[Outcome]) -> list[Culprit]:
    if whole.error is not None:
        raise OnnxcompError(f"the pipeline failed: {whole.error}")
    culprits = []
    for name, outcome in zip(names, outcomes, strict=True):
        if outcome.error is not None or outcome.drop is None or whole.drop is None:
            culprits.append(Culprit(name, None, None, None, outcome.error))
            continue
        culprits.append(Culprit(name, outcome.drop, whole.drop - outcome.drop, None))
    total = sum(max(c.recovery or 0.0, 0.0) for c in culprits)
    for c in culprits:
        if c.recovery is not None:
            c.share = max(c.recovery, 0.0) / total if total > 0 else 0.0
    return sorted(culprits, key=lambda c: -(c.recovery if c.recovery is not None else -1e9))


def _prepared(evaluator: Evaluator, prefix: str) -> ir.Model:
    """The model as per-layer pipelines see it after their lossless prefix."""
    return evaluator.compress(prefix)[0] if prefix else evaluator.model


def _run_jobs(
    evaluator: Evaluator, pipelines: list[str], workers: int, progress: Progress | None
) -> list[Outcome]:
    total = len(pipelines)
    if progress:
        progress("layers", 0, total)
    workers = min(workers, total)
    if workers <= 1:
        outcomes = []
        for index, pipeline in enumerate(pipelines):
            outcomes.append(evaluator.evaluate(pipeline))
            if progress:
                progress("layers", index + 1, total)
        return outcomes
    state = _WorkerState(
        ir.to_proto(evaluator.model).SerializeToString(), evaluator.fit, evaluator.held_out,
        evaluator.metric.spec, evaluator.metric.function, evaluator.target,
    )  # fmt: skip
    results: list[Outcome | None] = [None] * total
    # spawn: a fresh interpreter per worker; forking a process that holds ONNX Runtime's thread
    # pools can deadlock.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                             initargs=(state,)) as pool:  # fmt: skip
        futures = {pool.submit(_work, p): i for i, p in enumerate(pipelines)}
        for done, future in enumerate(as_completed(futures), start=1):
            results[futures[future]] = future.result()
            if progress:
                progress("layers", done, total)
    return [r for r in results if r is not None]


@dataclasses.dataclass
class _WorkerState:
    model: bytes
    fit: Dataset
    held_out: Dataset
    metric: str
    function: Any
    target: Target


_EVALUATOR: Evaluator | None = None


def _init_worker(state: _WorkerState) -> None:
    global _EVALUATOR
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import onnx

    from onnxcomp.search.metrics import Metric as _Metric

    model = ir.from_proto(onnx.load_from_string(state.model))
    metric = _Metric(state.metric, state.function) if state.function else resolve_metric(
        state.metric, state.held_out)  # fmt: skip
    _EVALUATOR = Evaluator(model, state.fit, state.held_out, metric, target=state.target,
                           threads=1)  # fmt: skip


def _work(pipeline: str) -> Outcome:
    assert _EVALUATOR is not None
    return _EVALUATOR.evaluate(pipeline)
