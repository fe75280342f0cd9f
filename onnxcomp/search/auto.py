"""Compression by goal: search pruning x quantisation x distillation for the smallest or fastest
model that stays within ``max_drop`` of the input model on held-out data.

How it searches:

1. Per-layer sensitivity (:mod:`onnxcomp.search.sensitivity`) of int8/int4/int2 weights and
   int8 activations, stored in the study so resumed and parallel runs share it.
2. The search space, built from the registered passes and their options: channel-pruning
   ratios, unstructured sparsities, low-rank energies, a precision per layer (float, int8,
   int4, 2-bit weights), int8 activations (``int8-static``, ``int8-dynamic``) on the int8
   layers whose activations sensitivity does not exclude, and distillation epochs when torch
   is installed. A point of the space is a pipeline string run by :func:`onnxcomp.optimize`.
3. Sensitivity-guided candidates first (deterministic: the lowest precision each layer
   tolerates alone, at a few allowances, with and without pruning and distillation), queued
   with ``study.enqueue_trial``; then Optuna's multi-objective TPE (metric up, size and/or
   latency down) with the bound as a constraint.

Optuna is imported here only (``pip install 'onnxcomp[search]'``). Its storage makes a search
resumable and shareable: a journal file or a database URL, several processes (or machines on
a shared file system / database) working on one study. Every trial records its pipeline
string, size, latency and metric. The winner is re-run from its pipeline string, checked on
the held-out data again, and only then written (atomically).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from onnxcomp.data import Dataset
from onnxcomp.errors import OnnxcompError, UsageError
from onnxcomp.search.evaluate import DEFAULT_TIMING, Evaluator, Outcome, Timing
from onnxcomp.search.metrics import Metric
from onnxcomp.search.sensitivity import SensitivityReport, lossless_prefix, run_sensitivity
from onnxcomp.search.space import Layer, find_layers, patterns_of, step
from onnxcomp.target import Target

Objective = Literal["size", "latency", "balanced"]
OBJECTIVES = ("size", "latency", "balanced")
PRECISIONS = ("float", "int8", "int4", "int2")
WEIGHT_PASS = {"int8": "int8", "int4": "int4", "int2": "ternary"}
SENSITIVITY_TECHNIQUES = ("int8", "int4", "int2", "int8-act")
DEFAULT_DISTILL_EPOCHS = (0, 10, 30)
DEFAULT_TRIALS = 30
COMPUTE_OPS = ("Conv", "Gemm", "MatMul")
Progress = Callable[[str, int, int], None]


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """The choices a trial makes, and how a choice becomes a pipeline string."""

    prefix: str
    layers: tuple[Layer, ...]
    channel_ratios: tuple[float, ...]
    prune_heads: tuple[bool, ...]  # (False, True) when the model has attention heads to prune
    sparsities: tuple[float, ...]
    lowrank_energies: tuple[float, ...]
    activations: tuple[str, ...]
    act_excluded: tuple[str, ...]  # layers whose int8 activations alone break the bound
    distill_epochs: tuple[int, ...]
    distill_options: str

    def suggest(self, trial: Any) -> dict[str, Any]:
        """Ask an Optuna trial for one point of the space."""
        params: dict[str, Any] = {}
        for key, choices in self._dimensions():
            params[key] = trial.suggest_categorical(key, list(choices))
        return params

    def _dimensions(self) -> list[tuple[str, Sequence[Any]]]:
        dims: list[tuple[str, Sequence[Any]]] = []
        for key, choices in (("prune_channels", self.channel_ratios),
                             ("prune_heads", self.prune_heads),
                             ("prune", self.sparsities), ("lowrank", self.lowrank_energies),
                             ("activations", self.activations),
                             ("distill", self.distill_epochs)):  # fmt: skip
            if len(choices) > 1:
                dims.append((key, choices))
        dims += [(f"bits/{layer.name}", PRECISIONS) for layer in self.layers]
        return dims

    def complete(self, params: dict[str, Any]) -> dict[str, Any]:
        """``params`` with every dimension filled in (the first choice where missing)."""
        return {key: params.get(key, choices[0]) for key, choices in self._dimensions()}

    def pipeline(self, params: dict[str, Any]) -> str:
        """The pipeline string of one point of the space."""
        p = self.complete(params)
        steps = [self.prefix] if self.prefix else []
        if p.get("prune_channels", 0):
            # heads=false: hidden units only (FFN, Conv channels), every attention head kept
            heads = None if p.get("prune_heads", self.prune_heads[-1]) else False
            steps.append(step("prune-channels", ratio=p["prune_channels"], heads=heads))
        if p.get("prune", 0):
            steps.append(step("prune", sparsity=p["prune"]))
        if p.get("lowrank", 0):
            steps.append(step("lowrank", energy=p["lowrank"]))
        bits = {layer.name: p[f"bits/{layer.name}"] for layer in self.layers}
        act = p.get("activations", "float")
        distill = step("distill", epochs=p.get("distill", 0)) + self.distill_options
        if p.get("distill", 0) and act != "float":
            # distillation cannot train through run-time quantisation (MatMulInteger): train
            # first; weight-only passes otherwise go first, so training sees their grid
            steps.append(distill)
        # int8 activations before weight-only passes: int8-static/-dynamic leave an already
        # quantised model alone
        if act != "float":
            ops = COMPUTE_OPS if act == "int8-static" else ("Gemm", "MatMul")
            chosen = [layer for layer in self.layers if bits[layer.name] == "int8"
                      and layer.name not in self.act_excluded
                      and set(layer.op_types) <= set(ops)]  # fmt: skip
            if chosen:
                steps.append(self._only(act, chosen))
        for level, pass_name in WEIGHT_PASS.items():
            chosen = [layer for layer in self.layers if bits[layer.name] == level]
            if chosen:
                steps.append(self._only(pass_name, chosen))
        if p.get("distill", 0) and act == "float":
            steps.append(distill)
        steps.append("strip")
        return ",".join(steps)

    def _only(self, pass_name: str, chosen: Sequence[Layer]) -> str:
        names = {layer.name for layer in chosen}
        others = patterns_of(layer for layer in self.layers if layer.name not in names)
        return step(pass_name, exclude=others or None)

    def describe(self) -> dict[str, Any]:
        return {key: list(choices) for key, choices in self._dimensions()
                if not key.startswith("bits/")} | {
            "per_layer_precision": [layer.name for layer in self.layers],
            "precisions": list(PRECISIONS), "act_excluded": list(self.act_excluded),
        }  # fmt: skip


@dataclasses.dataclass
class TrialRecord:
    """One trial of the study, as stored: its choices, its pipeline and what it gave."""

    number: int
    state: str
    source: str  # "sensitivity" (queued candidate), "optuna", or "cached" (seen before)
    worker: str
    params: dict[str, Any]
    outcome: Outcome
    feasible: bool


@dataclasses.dataclass
class AutoResult:
    """The study's trials, the winner (None when no trial met the bound) and what was written."""

    model: str
    objective: str
    metric: str
    unit: str
    max_drop: float
    base_score: float
    base_bytes: int
    held_out: str
    study_name: str
    storage: str | None
    space: dict[str, Any]
    timing: dict[str, int]  # the batch and threads every trial's latency was measured at
    trials: list[TrialRecord]
    best: TrialRecord | None
    closest: TrialRecord | None
    fit: Dataset | None = dataclasses.field(default=None, repr=False)  # what passes saw
    output: str | None = None
    final: Outcome | None = None  # the written model, re-run from its pipeline string
    # trials whose latency was measured again, together, before the winner was chosen
    retimed: list[int] = dataclasses.field(default_factory=list)

    @property
    def pipeline(self) -> str | None:
        return self.best.outcome.pipeline if self.best else None

    def pareto(self) -> list[TrialRecord]:
        """Completed trials no other completed trial beats on metric and on size/latency."""
        done = [t for t in self.trials if t.state == "COMPLETE" and t.outcome.error is None]
        keys = {}
        for t in done:  # all minimised: the metric negated
            score, *rest = _objective_values(t.outcome, self.objective, self.base_bytes)
            keys[t.number] = (-score, *rest)

        def dominates(a: TrialRecord, b: TrialRecord) -> bool:
            ka, kb = keys[a.number], keys[b.number]
            return all(x <= y for x, y in zip(ka, kb, strict=True)) and ka != kb

        front = [t for t in done if not any(dominates(o, t) for o in done)]
        return sorted(front, key=lambda t: keys[t.number][1:])

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(dataclasses.replace(self, fit=None))
        del data["fit"]
        data["kind"] = "onnxcomp-auto"
        data["pipeline"] = self.pipeline
        data["pareto"] = [t.number for t in self.pareto()]
        return data


class TrialClock:
    """How long trials of each kind (distilled or not) took here, so that a trial expected
    to run past the deadline is left out: Optuna's timeout only stops *starting* trials, and
    a distilled trial begun near the end ran a minute past a 480 s budget. A kind not timed
    yet is always tried."""

    def __init__(self, deadline: float | None, now: Callable[[], float] = time.monotonic):
        self.deadline, self.now = deadline, now
        self.longest: dict[bool, float] = {}

    @staticmethod
    def kind(pipeline: str) -> bool:
        return "distill" in pipeline

    def fits(self, pipeline: str) -> bool:
        if self.deadline is None:
            return True
        return self.now() + self.longest.get(self.kind(pipeline), 0.0) <= self.deadline

    def record(self, pipeline: str, seconds: float) -> None:
        kind = self.kind(pipeline)
        self.longest[kind] = max(self.longest.get(kind, 0.0), seconds)


# Feasible trials whose models are kept to be timed again together (latency objectives), and
# the largest model kept for it.
FINALISTS = 3
FINALIST_MAX_BYTES = 256 << 20


class Finalists:
    """The best few trials within the bound so far, with their models, timed again in one
    loop before the winner is chosen. A trial's speed-up comes from its own short loop, which a
    load spike on the input model can inflate: a 1.56x model once timed 3.4x and won. Only
    trials of this process are kept; those of other workers keep their own figures."""

    def __init__(self, objective: str, max_drop: float, base_bytes: int):
        self.objective, self.max_drop, self.base_bytes = objective, max_drop, base_bytes
        self.kept: dict[str, tuple[Outcome, ir.Model]] = {}

    def offer(self, outcome: Outcome, model: ir.Model | None) -> None:
        if (self.objective == "size" or model is None or outcome.error is not None
                or outcome.drop is None or outcome.drop > self.max_drop + 1e-9
                or (outcome.bytes or 0) > FINALIST_MAX_BYTES):  # fmt: skip
            return
        self.kept[outcome.pipeline] = (outcome, model)
        ranked = sorted(self.kept, key=lambda k: _rank(self.kept[k][0], self.objective,
                                                       self.base_bytes))  # fmt: skip
        for pipeline in ranked[FINALISTS:]:
            del self.kept[pipeline]

    def retime(self, evaluator: Evaluator, feasible: Sequence[TrialRecord]) -> list[int]:
        """Time the kept models together with the input model and put the new figures in
        their records (``feasible``); returns the trial numbers re-timed (none when fewer
        than two are kept)."""
        records = [r for r in feasible if r.outcome.pipeline in self.kept]
        pipelines = list(dict.fromkeys(r.outcome.pipeline for r in records))
        if len(pipelines) < 2:
            return []
        models = [self.kept[p][1] for p in pipelines]
        seconds = evaluator.timing.seconds * len(models)
        figures = dict(zip(pipelines, evaluator.latencies(models, seconds), strict=True))
        for record in records:
            latency_ms, speedup = figures[record.outcome.pipeline]
            record.outcome = dataclasses.replace(record.outcome, latency_ms=latency_ms,
                                                 speedup=speedup)  # fmt: skip
        return [r.number for r in records]


def run_auto(
    model: ir.Model,
    fit: Dataset,
    held_out: Dataset,
    *,
    metric: Metric,
    target: Target,
    max_drop: float,
    objective: Objective = "size",
    trials: int = DEFAULT_TRIALS,
    time_budget: float | None = None,
    storage: str | None = None,
    resume: bool = False,
    study_name: str | None = None,
    distill_epochs: Sequence[int] | None = None,
    distill_options: str = "",
    timing: Timing = DEFAULT_TIMING,
    workers: int = 1,
    seed: int = 0,
    label: str = "model",
    progress: Progress | None = None,
) -> AutoResult:
    """Search, and return every trial of the study with the winner (see the module docstring).
    Writes nothing: :func:`onnxcomp.auto` re-runs and writes the winner."""
    optuna = _optuna()
    if objective not in OBJECTIVES:
        raise UsageError(f"unknown objective '{objective}' (use {', '.join(OBJECTIVES)})")
    if not 0 <= max_drop <= 100:
        raise UsageError(f"--max-drop must be in [0, 100], not {max_drop}")
    if trials < 1:
        raise UsageError(f"--trials must be >= 1, not {trials}")
    started = time.monotonic()
    study_storage = open_storage(storage)
    name = study_name or f"onnxcomp-{label}-{objective}"
    study = _open_study(optuna, study_storage, name, objective, resume, seed, storage)
    if timing.batch < 1 or timing.threads < 1:
        raise UsageError(f"the timing batch and threads must be >= 1, not {timing.batch} and "
                         f"{timing.threads}")  # fmt: skip
    # latencies at another batch or thread count are not comparable: part of the study
    config = {"model": _fingerprint(model), "objective": objective, "max_drop": max_drop,
              "metric": metric.spec, "target": target.kind,
              "timing": [timing.batch, timing.threads]}  # fmt: skip
    existing = study.user_attrs.get("config")
    if existing is not None and existing != config:
        changed = ", ".join(k for k in config if existing.get(k) != config[k])
        raise UsageError(f"study '{name}' was made for another search ({changed} differ); "
                         "choose another --study-name")  # fmt: skip
    evaluator = Evaluator(model, fit, held_out, metric, target=target, timing=timing)
    sensitivity = _sensitivity(study, model, fit, held_out, metric, target, workers, progress)
    space = build_space(model, sensitivity, max_drop, distill_epochs, distill_options)
    if existing is None:
        study.set_user_attr("config", config)
    for params in candidates(space, sensitivity, max_drop, objective):
        study.enqueue_trial(params, user_attrs={"source": "sensitivity"}, skip_if_exists=True)

    worker = f"{socket.gethostname()}:{os.getpid()}"
    clock = TrialClock(None if time_budget is None else started + time_budget)
    finalists = Finalists(objective, max_drop, evaluator.base_bytes)

    def run_trial(trial: Any) -> tuple[float, ...]:
        params = space.complete(space.suggest(trial))
        pipeline = space.pipeline(params)
        trial.set_user_attr("pipeline", pipeline)
        trial.set_user_attr("worker", worker)
        trial.set_user_attr("source", trial.user_attrs.get("source", "optuna"))
        seen = _seen(study, pipeline)
        if seen is not None:
            outcome = seen
            trial.set_user_attr("source", "cached")
        elif not clock.fits(pipeline):
            raise optuna.TrialPruned("a trial of this kind would run past --time-budget")
        else:
            began = time.monotonic()
            outcome, compressed = evaluator.evaluate_model(pipeline, latency=True)
            clock.record(pipeline, time.monotonic() - began)
            finalists.offer(outcome, compressed)
        trial.set_user_attr("outcome", _finite(outcome.as_dict()))
        if outcome.error is not None or outcome.drop is None:
            raise _TrialFailed(outcome.error or "no score")
        trial.set_user_attr("constraint", outcome.drop - max_drop)
        if hasattr(trial, "set_constraint"):  # Optuna >= 5; older ones read constraints_func
            trial.set_constraint("drop", outcome.drop - max_drop)
        return _objective_values(outcome, objective, evaluator.base_bytes)

    def report_progress(study_: Any, _: Any) -> None:
        if progress:
            progress("trials", min(len(study_.trials), trials), trials)

    remaining = None
    if time_budget is not None:
        remaining = max(time_budget - (time.monotonic() - started), 1.0)
    already = len(study.trials) - _waiting(study)
    if already < trials:
        report_progress(study, None)
        # trials of every process count, queued ones only once they run
        states = tuple(optuna.trial.TrialState[s] for s in ("COMPLETE", "FAIL", "RUNNING"))
        max_trials = optuna.study.MaxTrialsCallback(trials, states=states)
        study.optimize(run_trial, n_trials=trials - already, timeout=remaining,
                       catch=(_TrialFailed,), callbacks=[max_trials, report_progress])  # fmt: skip
    records = [_record(t, max_drop) for t in study.get_trials(deepcopy=False)]
    records = [r for r in records if r is not None]
    feasible = [r for r in records if r.feasible]
    best = min(feasible, key=lambda r: _rank(r.outcome, objective, evaluator.base_bytes),
               default=None)  # fmt: skip
    retimed = finalists.retime(evaluator, feasible)
    if retimed:
        best = min(feasible, key=lambda r: _rank(r.outcome, objective, evaluator.base_bytes))
    scored = [r for r in records if r.outcome.drop is not None]
    closest = min(scored, key=lambda r: r.outcome.drop, default=None) if best is None else None
    return AutoResult(
        model=label, objective=objective, metric=metric.spec, unit=metric.unit,
        max_drop=max_drop, base_score=evaluator.base_score, base_bytes=evaluator.base_bytes,
        held_out=held_out.description, study_name=name, storage=storage,
        space=space.describe(), timing={"batch": timing.batch, "threads": timing.threads},
        trials=records, best=best, closest=closest, fit=fit, retimed=retimed,
    )  # fmt: skip


def build_space(
    model: ir.Model,
    sensitivity: SensitivityReport,
    max_drop: float,
    distill_epochs: Sequence[int] | None = None,
    distill_options: str = "",
) -> SearchSpace:
    """The space for ``model``: only the dimensions that can change it."""
    prefix = lossless_prefix(model)
    layers = tuple(find_layers(model))
    compute = [layer for layer in layers if set(layer.op_types) & set(COMPUTE_OPS)]
    big_matrices = [layer for layer in layers if set(layer.op_types) & {"Gemm", "MatMul"}
                    and len(layer.shape) == 2 and layer.params >= 1024]  # fmt: skip
    activations = ["float"]
    if compute:
        activations.append("int8-static")
    if any(set(layer.op_types) & {"Gemm", "MatMul"} for layer in layers):
        activations.append("int8-dynamic")
    if distill_epochs is None:
        distill_epochs = DEFAULT_DISTILL_EPOCHS if _has_torch() else (0,)
    epochs = tuple(dict.fromkeys([0, *(int(e) for e in distill_epochs)]))
    if any(e < 0 for e in epochs):
        raise UsageError("distill epochs must be >= 0")
    if epochs != (0,) and not _has_torch():
        raise UsageError("distillation needs torch: pip install torch==2.13.0")
    options = distill_options.strip(":")
    if epochs != (0,) and "threads=" not in options:
        # trials run one at a time and are timed on one thread: so is training, which runs
        # several times faster than on torch's default team when other processes share the cores
        options = ":".join(filter(None, ["threads=1", options]))
    return SearchSpace(
        prefix=prefix,
        layers=layers,
        channel_ratios=(0.0, 0.25, 0.5) if compute else (0.0,),
        prune_heads=(False, True) if compute and _has_attention_heads(model) else (True,),
        sparsities=(0.0, 0.5, 0.8) if compute else (0.0,),
        lowrank_energies=(0.0, 0.99, 0.95) if big_matrices else (0.0,),
        activations=tuple(activations),
        act_excluded=tuple(sensitivity.excluded("int8-act", max_drop / 2)),
        distill_epochs=epochs,
        distill_options=f":{options}" if options else "",
    )


def _has_attention_heads(model: ir.Model) -> bool:
    """Whether prune-channels finds attention heads to remove (its analysis, on a copy)."""
    import onnx_ir.passes.common as common_passes

    from onnxcomp.analysis.channels import analyze_channels

    copy = ir.from_proto(ir.to_proto(model))
    common_passes.ShapeInferencePass()(copy)
    return any(group.heads and group.safe for group in analyze_channels(copy).groups)


def candidates(
    space: SearchSpace, sensitivity: SensitivityReport, max_drop: float, objective: str
) -> list[dict[str, Any]]:
    """Deterministic starting points from per-layer sensitivity: at a few per-layer allowances,
    each layer at the lowest precision that alone stays within it; int8 activations where
    they are safe; then (with torch) pruned and 2-bit stacks that distillation wins back.
    Cheap ones first, so a short time budget still tries them."""
    layers = [layer.name for layer in space.layers]

    def lowest(allowance: float, levels: Sequence[str] = ("int2", "int4", "int8")) -> dict:
        bits = {}
        for name in layers:
            choice = "float"
            for level in levels:
                drop = sensitivity.drop(name, level)
                if drop is not None and drop <= allowance:
                    choice = level
                    break
            bits[f"bits/{name}"] = choice
        return bits

    uniform = {level: {f"bits/{n}": level for n in layers} for level in ("int8", "int4", "int2")}
    allowances = sorted({max_drop / 4, max_drop / 2, max_drop})
    cheap: list[dict[str, Any]] = [uniform["int8"]]
    cheap += [lowest(a) for a in allowances]
    cheap += [lowest(a, ("int4", "int8")) for a in allowances]
    fast: list[dict[str, Any]] = []
    for act in space.activations[1:]:
        fast.append({**uniform["int8"], "activations": act})
        for energy in space.lowrank_energies[1:]:
            fast.append({**uniform["int8"], "activations": act, "lowrank": energy})
    pruned: list[dict[str, Any]] = []  # structured pruning + int8 activations, untrained
    trained: list[dict[str, Any]] = []
    epochs = max(space.distill_epochs)
    ratios = sorted((r for r in space.channel_ratios if r), reverse=True)
    if objective == "latency":
        # fewer channels and heads run faster, low bits do not. Untrained, hidden units (FFN)
        # alone first: attention heads are what a transformer loses most by; trained, the
        # biggest cut first (heads too), as distillation wins most of it back given the data
        # int8 where int8 activations run it (Conv/Gemm/MatMul); embedding tables stay float,
        # as int8 weights alone add a DequantizeLinear per run and save no time
        act, compute = space.activations[-1], set(COMPUTE_OPS)
        int8_compute = {f"bits/{layer.name}": "int8" if set(layer.op_types) & compute
                        else "float" for layer in space.layers}  # fmt: skip
        for ratio in ratios:
            for heads in space.prune_heads:
                shape = {"prune_channels": ratio, "prune_heads": heads}
                pruned.append({**int8_compute, **shape, "activations": act})
        if epochs:
            shapes = [{"prune_channels": ratio, "prune_heads": heads} for ratio in ratios
                      for heads in reversed(space.prune_heads)]  # fmt: skip
            trained = [{**int8_compute, **shape, "activations": act, "distill": epochs}
                       for shape in shapes]  # fmt: skip
            trained += [{**shape, "distill": epochs} for shape in shapes]
    elif epochs:
        for ratio in [*ratios, 0.0]:
            trained.append({**uniform["int2"], "prune_channels": ratio, "distill": epochs})
            trained.append({**uniform["int4"], "prune_channels": ratio, "distill": epochs})
    if objective == "latency":
        ordered = fast[:2] + pruned + trained + fast[2:] + cheap
    elif objective == "size":
        ordered = cheap + trained + fast
    else:
        ordered = cheap + fast + trained
    # the input model itself (every layer float, nothing pruned) is not worth a trial
    out, seen = [], {space.pipeline(space.complete({f"bits/{n}": "float" for n in layers}))}
    for params in ordered:
        full = space.complete(params)
        text = space.pipeline(full)
        if text not in seen:
            seen.add(text)
            out.append(full)
    return out


def open_storage(url: str | None) -> Any:
    """An Optuna storage: None (in memory), a database URL (``sqlite:///study.db``,
    ``postgresql://...``), or a journal file (``journal:PATH`` or a plain path) that several
    processes can share through file locks."""
    if url is None:
        return None
    optuna = _optuna()
    if "://" in url:
        try:
            return optuna.storages.RDBStorage(url)
        except Exception as e:
            text = " ".join(str(e).split())[:300] or type(e).__name__
            raise UsageError(f"cannot open --storage {url}: {text}") from None
    path = Path(url.removeprefix("journal:"))
    if not path.name or path.is_dir():
        raise UsageError(f"--storage {url}: expected a journal file path or a database URL")
    if not path.parent.is_dir():
        raise UsageError(f"--storage {url}: directory {path.parent} does not exist")
    from optuna.storages.journal import JournalFileBackend

    try:
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    except Exception as e:
        raise UsageError(f"cannot open --storage {url}: {e}") from None


class _TrialFailed(Exception):
    """A pipeline that failed: the trial is recorded as FAIL with its error."""


def _optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise UsageError("onnxcomp auto needs Optuna: pip install 'onnxcomp[search]'") from None
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # failed trials are recorded
    return optuna


def _has_torch() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None


def _open_study(
    optuna: Any, storage: Any, name: str, objective: str, resume: bool, seed: int,
    url: str | None,
) -> Any:  # fmt: skip
    directions = ["maximize"] + ["minimize"] * (2 if objective == "balanced" else 1)
    legacy = {} if hasattr(optuna.trial.Trial, "set_constraint") else {
        "constraints_func": _constraints}  # fmt: skip
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=5, multivariate=True,
                                         **legacy)  # fmt: skip
    if storage is not None and not resume:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        if name in names:
            raise UsageError(f"study '{name}' already exists in {url}; --resume continues it, "
                             "or choose another --study-name")  # fmt: skip
    try:
        study = optuna.create_study(storage=storage, sampler=sampler, study_name=name,
                                    directions=directions, load_if_exists=resume)  # fmt: skip
    except Exception as e:
        raise UsageError(f"cannot open study '{name}': {' '.join(str(e).split())[:300]}") from None
    if len(study.directions) != len(directions):
        raise UsageError(f"study '{name}' has {len(study.directions)} objectives, "
                         f"--objective {objective} needs {len(directions)}")  # fmt: skip
    return study


def _constraints(trial: Any) -> Sequence[float]:
    return [trial.user_attrs.get("constraint", 1.0)]


def _objective_values(outcome: Outcome, objective: str, base_bytes: int) -> tuple[float, ...]:
    """What the study optimises, first the metric (maximised), then what is minimised: bytes
    relative to the input, and latency relative to the input (1 / speed-up)."""
    score = outcome.score if outcome.score is not None else -math.inf
    size = (outcome.bytes or base_bytes) / base_bytes
    slow = 1.0 / outcome.speedup if outcome.speedup else 1.0
    if objective == "size":
        return (score, size)
    if objective == "latency":
        return (score, slow)
    return (score, size, slow)


def _rank(outcome: Outcome, objective: str, base_bytes: int) -> tuple[float, ...]:
    """Among trials within the bound: smallest, fastest, or smallest size x latency product;
    the better metric breaks ties."""
    score, *rest = _objective_values(outcome, objective, base_bytes)
    return (math.prod(rest), -score)


def _finite(data: dict[str, Any]) -> dict[str, Any]:
    """JSON-safe values for the storage (inf SQNR of an identical model becomes None)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in data.items()}  # fmt: skip


def _seen(study: Any, pipeline: str) -> Outcome | None:
    """The outcome of a finished trial with the same pipeline (Optuna may sample a point
    twice; queued candidates may coincide), so it is not run again."""
    for trial in study.get_trials(deepcopy=False):
        if trial.state.name in ("COMPLETE", "FAIL") and trial.user_attrs.get(
                "pipeline") == pipeline and "outcome" in trial.user_attrs:  # fmt: skip
            return Outcome(**trial.user_attrs["outcome"])
    return None


def _waiting(study: Any) -> int:
    return sum(1 for t in study.get_trials(deepcopy=False) if t.state.name == "WAITING")


def _record(trial: Any, max_drop: float) -> TrialRecord | None:
    attrs = trial.user_attrs
    if "outcome" not in attrs:
        return None
    outcome = Outcome(**attrs["outcome"])
    feasible = (trial.state.name == "COMPLETE" and outcome.error is None
                and outcome.drop is not None and outcome.drop <= max_drop + 1e-9)  # fmt: skip
    return TrialRecord(trial.number, trial.state.name, attrs.get("source", "optuna"),
                       attrs.get("worker", ""), dict(trial.params), outcome, feasible)  # fmt: skip


def _sensitivity(
    study: Any, model: ir.Model, fit: Dataset, held_out: Dataset, metric: Metric,
    target: Target, workers: int, progress: Progress | None,
) -> SensitivityReport:  # fmt: skip
    """Per-layer sensitivity, measured once per study and kept in it."""
    stored = study.user_attrs.get("sensitivity")
    if stored is not None:
        return _sensitivity_from(stored)
    report = run_sensitivity(model, fit, held_out, metric=metric, target=target,
                             techniques=SENSITIVITY_TECHNIQUES, workers=workers,
                             progress=progress)  # fmt: skip
    study.set_user_attr("sensitivity", {
        row.name: {t: (None if o is None or o.drop is None else o.drop)
                   for t, o in row.results.items()} for row in report.layers})  # fmt: skip
    return report


def _sensitivity_from(stored: dict[str, dict[str, float | None]]) -> SensitivityReport:
    from onnxcomp.search.sensitivity import LayerSensitivity

    rows = []
    for name, drops in stored.items():
        row = LayerSensitivity(name, (), 0, 0)
        row.results = {t: None if d is None else Outcome("", drop=d) for t, d in drops.items()}
        rows.append(row)
    return SensitivityReport("", "", "", 0.0, 0, "", "", 0, list(SENSITIVITY_TECHNIQUES), rows)


def _fingerprint(model: ir.Model) -> str:
    return hashlib.sha256(ir.to_proto(model).SerializeToString()).hexdigest()[:16]


def save_npz(dataset: Dataset, path: str | os.PathLike) -> None:
    """Write a data file atomically (the fit split, so the winner can be reproduced)."""
    import tempfile

    target = Path(path)
    arrays = dict(dataset.inputs) | dict(dataset.extras)
    if dataset.labels is not None:
        arrays["labels"] = dataset.labels
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".npz", dir=target.parent)
    os.close(fd)
    try:
        np.savez(tmp, **arrays)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


__all__ = ["AutoResult", "OnnxcompError", "SearchSpace", "TrialRecord", "run_auto"]
