"""Size, speed, memory and accuracy of several models side by side: ``onnxcomp bench``.

Every model is measured under every setting (ONNX Runtime provider x intra-op threads x batch
size). What the numbers promise:

- Timing is :func:`measure`, the one timing loop onnxcomp and ``benchmarks/`` share. Warm-up
  runs are not recorded; then the models take turns run by run (round-robin, the starting model
  rotating every round), so drift of the machine (clock, thermal, a noisy neighbour) lands on
  all of them alike. It stops after ``runs`` rounds or when ``time_budget`` seconds have passed,
  whichever comes first; a round is never cut short, so every model has the same count.
- Session creation is timed on a second creation, models interleaved, so one-off start-up
  costs are not charged to whichever model came first.
- Latency is the wall time of ``InferenceSession.run`` on feeds already in memory (on CUDA that
  includes copying inputs to and outputs from the device); p50/p90/p99 by linear interpolation;
  throughput is batch / p50, in samples per second.
- Peak memory is measured in a fresh child process per model and setting (see
  :data:`MEMORY_METHOD`), because in one long-lived process freed memory is reused and later
  models would look smaller than they are.
- Each figure has a ratio to the first model under the same setting (first model = 1.0).
- A model that fails (cannot be loaded, rejected by ONNX Runtime, data that does not match it)
  is a row with its error; the other models are still measured. A provider that this
  onnxruntime build lacks gives rows marked unavailable, not an error. A model with a static
  batch dimension gives "n/a (static batch N)" for other batch sizes.
- Ctrl-C stops the run; the report holds what was measured so far (``interrupted`` is set).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from onnxcomp import runtime
from onnxcomp.data import (
    DEFAULT_OTHER_DIM,
    Dataset,
    graph_inputs,
    load_data,
    random_inputs,
    static_batch,
)
from onnxcomp.errors import OnnxcompError, UsageError
from onnxcomp.instrument import compare_arrays, top1_accuracy
from onnxcomp.io import external_files, load, save

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "dml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "qnn": "QNNExecutionProvider",
}
INSTALL_HINTS = {
    "CUDAExecutionProvider": "install onnxruntime-gpu instead of onnxruntime, with CUDA and cuDNN",
    "TensorrtExecutionProvider": "install onnxruntime-gpu and TensorRT",
}
TIMING_METHOD = (
    "wall time of InferenceSession.run (time.perf_counter_ns) on feeds already in memory; "
    "models interleaved run by run, round-robin with a rotating start; warm-up runs not recorded"
)
SESSION_METHOD = (
    "onnxcomp.runtime.make_session (serialise the model, create the InferenceSession), timed on "
    "a second creation, models interleaved; the first creation absorbs one-off start-up costs"
)
MEMORY_METHOD = (
    "peak resident set size (VmHWM, reset through /proc/self/clear_refs) above the RSS before "
    "session creation, in a fresh child process per model and setting that first built a trivial "
    "session (so ONNX Runtime's own start-up is not charged to the model); covers session creation "
    "and the warm-up runs at that batch size; host memory only (not GPU memory)"
)
DEFAULT_SAMPLES = 512
Status = Literal["ok", "n/a", "unavailable", "error"]


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A model to bench: a path, or an in-memory onnx_ir model with a label. ``error`` marks a
    candidate that could not be made (a failed pipeline): it is reported, not measured. ``meta``
    is carried into the report as it is (e.g. how an external quantiser made the model)."""

    label: str
    model: ir.Model | str | os.PathLike | None
    error: str | None = None
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Setting:
    """One ONNX Runtime configuration every model is measured under."""

    provider: str  # full name, e.g. CPUExecutionProvider
    threads: int  # intra-op threads; 0 = ONNX Runtime's default
    batch: int

    @property
    def label(self) -> str:
        short = next((k for k, v in PROVIDERS.items() if v == self.provider), self.provider)
        threads = self.threads or "default"
        return f"{short} · threads {threads} · batch {self.batch}"


@dataclasses.dataclass
class ModelInfo:
    """A benched model's file and, if it could not be benched at all, why."""

    label: str
    path: str | None
    file_bytes: int | None = None
    external_data_bytes: int = 0
    error: str | None = None
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)  # the candidate's ``meta``


@dataclasses.dataclass
class Latency:
    """Per-run latency statistics in milliseconds."""

    p50: float
    p90: float
    p99: float
    mean: float
    min: float
    max: float
    runs: int

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Latency:
        ms = np.asarray(seconds, dtype=np.float64) * 1e3
        p50, p90, p99 = (float(v) for v in np.percentile(ms, [50, 90, 99]))
        return cls(p50, p90, p99, float(ms.mean()), float(ms.min()), float(ms.max()), len(ms))


@dataclasses.dataclass
class Cell:
    """One model under one setting."""

    model: str
    provider: str
    threads: int
    batch: int
    status: Status
    note: str = ""
    session_seconds: float | None = None
    latency: Latency | None = None
    throughput: float | None = None  # samples per second = batch / p50
    peak_memory_bytes: int | None = None
    accuracy: float | None = None  # top-1 against the data's labels
    agreement: float | None = None  # share of samples whose top-1 matches the first model's
    cosine: float | None = None  # lowest cosine over outputs, against the first model
    max_abs_err: float | None = None  # largest over outputs, against the first model
    ratios: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def setting(self) -> Setting:
        return Setting(self.provider, self.threads, self.batch)


@dataclasses.dataclass
class BenchReport:
    """Everything ``onnxcomp bench`` measured, and how."""

    models: list[ModelInfo]
    settings: list[Setting]
    cells: list[Cell]
    config: dict[str, Any]
    notes: list[str] = dataclasses.field(default_factory=list)
    interrupted: bool = False

    def cell(self, model: str, setting: Setting) -> Cell | None:
        for cell in self.cells:
            if cell.model == model and cell.setting == setting:
                return cell
        return None

    def failed_models(self) -> list[str]:
        """Models with an error and nothing measured."""
        failed = []
        for info in self.models:
            cells = [c for c in self.cells if c.model == info.label]
            if info.error or (
                any(c.status == "error" for c in cells) and not any(c.status == "ok" for c in cells)
            ):
                failed.append(info.label)
        return failed

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "onnxcomp-bench",
            "config": self.config,
            "models": [dataclasses.asdict(m) for m in self.models],
            "settings": [dataclasses.asdict(s) | {"label": s.label} for s in self.settings],
            "results": [dataclasses.asdict(c) for c in self.cells],
            "notes": self.notes,
            "interrupted": self.interrupted,
        }


class MeasureInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`measure`; ``samples`` holds the complete rounds measured so far."""

    def __init__(self, samples: list[list[float]]):
        super().__init__()
        self.samples = samples


def measure(
    calls: Sequence[Callable[[], object]],
    *,
    runs: int,
    warmup: int = 0,
    time_budget: float | None = None,
    on_round: Callable[[int], None] | None = None,
) -> list[list[float]]:
    """Time each of ``calls`` (in seconds), interleaved: round r runs every call once, starting
    at call r mod n. ``warmup`` rounds first, not recorded; then up to ``runs`` rounds, fewer if
    ``time_budget`` seconds run out (at least one). ``on_round`` gets the rounds done so far.
    """
    if runs < 1 or warmup < 0:
        raise UsageError(f"runs must be >= 1 and warm-up >= 0 (got {runs}, {warmup})")
    n = len(calls)
    samples: list[list[float]] = [[] for _ in calls]
    clock = time.perf_counter_ns
    try:
        for r in range(warmup):
            for i in range(n):
                calls[(r + i) % n]()
            if on_round:
                on_round(r + 1)
        started = time.perf_counter()
        for r in range(runs):
            round_times = [0] * n
            for i in range(n):
                index = (r + i) % n
                t0 = clock()
                calls[index]()
                round_times[index] = clock() - t0
            for index, ns in enumerate(round_times):
                samples[index].append(ns * 1e-9)
            if on_round:
                on_round(warmup + r + 1)
            if time_budget is not None and time.perf_counter() - started >= time_budget:
                break
    except KeyboardInterrupt:
        raise MeasureInterrupted(samples) from None
    return samples


def provider_name(name: str) -> str:
    """``cuda`` -> ``CUDAExecutionProvider``; full ONNX Runtime names pass through."""
    key = name.strip()
    if key.lower() in PROVIDERS:
        return PROVIDERS[key.lower()]
    if key.endswith("ExecutionProvider"):
        return key
    raise UsageError(
        f"unknown provider '{name}' (use {', '.join(PROVIDERS)} or a full ONNX Runtime name "
        "such as CUDAExecutionProvider)"
    )


def parse_provider_options(specs: Sequence[str]) -> dict[str, dict[str, str]]:
    """``cuda:device_id=1:arena_extend_strategy=kSameAsRequested`` (repeatable) -> per provider."""
    options: dict[str, dict[str, str]] = {}
    for spec in specs:
        name, *pairs = spec.split(":")
        if not pairs:
            raise UsageError(f"bad provider option '{spec}': expected PROVIDER:KEY=VALUE, "
                             "e.g. cuda:device_id=1")
        target = options.setdefault(provider_name(name), {})
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep or not key:
                raise UsageError(f"bad provider option '{pair}' in '{spec}': expected KEY=VALUE")
            target[key.strip()] = value.strip()
    return options


def settings_grid(
    providers: Sequence[str], threads: Sequence[int], batches: Sequence[int]
) -> list[Setting]:
    """Every provider x threads x batch combination, in that nesting order."""
    if any(t < 0 for t in threads) or any(b < 1 for b in batches):
        raise UsageError("threads must be >= 0 (0 = ONNX Runtime's default) and batch >= 1")
    names = list(dict.fromkeys(provider_name(p) for p in providers))
    return [Setting(p, t, b) for p in names for t in dict.fromkeys(threads)
            for b in dict.fromkeys(batches)]  # fmt: skip


def make_feeds(
    model: ir.Model,
    batch: int,
    data: Dataset | None = None,
    shapes: dict[str, tuple[int, ...]] | None = None,
) -> dict[str, np.ndarray]:
    """``batch`` samples: the first of ``data`` (repeated when it has fewer), else random inputs
    (seed 0, so models with the same inputs get the same values). Dims other than the batch come
    from ``shapes`` or the model, dynamic ones default to 32."""
    if data is not None:
        feeds = {}
        for name, array in data.inputs.items():
            if len(array) < batch:
                array = np.concatenate([array] * -(-batch // len(array)))
            feeds[name] = np.ascontiguousarray(array[:batch])
        return feeds
    shapes = shapes or {}
    chosen = {}
    for value in graph_inputs(model):
        if value.shape is None:
            continue
        shape = list(shapes.get(value.name) or [
            dim if isinstance(dim, int) else DEFAULT_OTHER_DIM for dim in value.shape
        ])  # fmt: skip
        if shape and len(value.shape) and not isinstance(value.shape[0], int):
            shape[0] = batch
        chosen[value.name] = tuple(shape)
    return random_inputs(model, chosen, seed=0).inputs


@dataclasses.dataclass(frozen=True)
class BenchOptions:
    """How to measure: the settings grid, run counts, and ONNX Runtime's configuration."""

    providers: tuple[str, ...] = ("cpu",)
    threads: tuple[int, ...] = (1,)  # intra-op threads; 0 = ONNX Runtime's default
    batches: tuple[int, ...] = (1,)
    runs: int = 100  # measured rounds (each model runs once per round)
    warmup: int = 10  # rounds before measuring, not recorded
    time_budget: float | None = None  # seconds per setting; stops early once spent
    level: str = "all"  # ONNX Runtime graph optimisation level (runtime.LEVELS)
    provider_options: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    samples: int = DEFAULT_SAMPLES  # samples of the data the accuracy figures use
    memory: bool = True  # measure peak memory in a child process per model and setting

    def validate(self) -> list[Setting]:
        """The settings grid, or a UsageError for an option out of range."""
        if self.level not in runtime.LEVELS:
            raise UsageError(f"unknown optimisation level '{self.level}' "
                             f"(use {', '.join(runtime.LEVELS)})")
        if self.runs < 1 or self.warmup < 0 or self.samples < 1:
            raise UsageError("runs and samples must be >= 1 and warm-up >= 0")
        if self.time_budget is not None and self.time_budget <= 0:
            raise UsageError("the time budget must be > 0 seconds")
        for name in self.provider_options:
            provider_name(name)
        return settings_grid(self.providers, self.threads, self.batches)

    def config(self) -> dict[str, Any]:
        """What the report records about how it measured."""
        return {
            "runs": self.runs,
            "warmup": self.warmup,
            "time_budget_s": self.time_budget,
            "level": self.level,
            "threads": "intra_op_num_threads per setting (0 = ONNX Runtime default), "
                       "inter_op_num_threads = 1, sequential execution",
            "provider_options": {provider_name(k): v for k, v in self.provider_options.items()},
            "shapes": {k: list(v) for k, v in self.shapes.items()},
            "timing": TIMING_METHOD,
            "session_creation": SESSION_METHOD,
            "memory": MEMORY_METHOD if self.memory else "not measured",
        }  # fmt: skip


def run_bench(
    candidates: Sequence[Candidate | str | os.PathLike],
    options: BenchOptions = BenchOptions(),
    *,
    data: str | os.PathLike | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> BenchReport:
    """Measure every candidate under every setting; see the module docstring for what is promised.

    ``data`` is an ``.npz`` file (as ``--data``); without it, inputs are random.
    ``progress(what, done, total)`` is called as rounds complete.
    """
    settings = options.validate()
    if data is not None and not Path(data).is_file():
        raise UsageError(f"no such data file: {data}")
    candidates = _as_candidates(candidates)
    available = ort.get_available_providers()
    config = options.config() | {
        "data": str(data) if data is not None else None,
        "accuracy_samples": options.samples if data is not None else None,
        "environment": _environment(available),
    }
    report = BenchReport(models=[], settings=settings, cells=[], config=config)
    for provider in dict.fromkeys(s.provider for s in settings):
        if provider not in available:
            hint = INSTALL_HINTS.get(provider, "not in this onnxruntime build")
            report.notes.append(f"{provider} is not available ({hint}); available: "
                                f"{', '.join(available)}")
    with tempfile.TemporaryDirectory(prefix="onnxcomp-bench-") as tmp:
        loaded = _load_all(candidates, report, data, Path(tmp))
        counts = [item.data.num_samples for item in loaded if item.data is not None]
        if counts:
            config["accuracy_samples"] = min(options.samples, counts[0])
        bench = _Bench(report, loaded, options, available, Path(tmp), progress)
        try:
            for index, setting in enumerate(settings):
                bench.measure_setting(index, setting)
        except KeyboardInterrupt:
            report.interrupted = True
            done = {(c.model, c.setting) for c in report.cells}
            left = [s.label for s in settings if any((m.label, s) not in done for m in loaded)]
            report.notes.append("interrupted (Ctrl-C); not measured: " + "; ".join(left))
    _add_ratios(report)
    return report


@dataclasses.dataclass
class _Loaded:
    label: str
    model: ir.Model | None
    path: Path | None  # a file ONNX Runtime can load in the memory probe
    data: Dataset | None
    error: str | None


def _as_candidates(items: Sequence[Candidate | str | os.PathLike]) -> list[Candidate]:
    if not items:
        raise UsageError("give at least one model")
    candidates = [
        item if isinstance(item, Candidate) else Candidate(Path(item).stem, item) for item in items
    ]
    seen: dict[str, int] = {}
    unique = []
    for c in candidates:
        seen[c.label] = seen.get(c.label, 0) + 1
        label = c.label if seen[c.label] == 1 else f"{c.label} ({seen[c.label]})"
        unique.append(dataclasses.replace(c, label=label))
    return unique


def _load_all(
    candidates: list[Candidate], report: BenchReport, data: str | os.PathLike | None, tmp: Path
) -> list[_Loaded]:
    loaded = []
    for index, candidate in enumerate(candidates):
        info = ModelInfo(candidate.label, None, meta=dict(candidate.meta))
        report.models.append(info)
        model = path = dataset = None
        try:
            if candidate.error is not None or candidate.model is None:
                raise OnnxcompError(candidate.error or "no model given")
            if isinstance(candidate.model, ir.Model):
                # Saved as onnxcomp would save it: that is its size, and the memory probe's file.
                model = candidate.model
                path = tmp / f"model{index}" / "model.onnx"
                path.parent.mkdir()
                save(model, path)
                extras = [p for p in path.parent.iterdir() if p != path]
            else:
                path = Path(candidate.model)
                info.path = str(path)
                model = load(path)
                extras = [p for p in external_files(model) if p.exists()]
            info.external_data_bytes = sum(p.stat().st_size for p in extras)
            info.file_bytes = path.stat().st_size + info.external_data_bytes
            if data is not None:
                dataset = load_data(data, model)
        except OnnxcompError as e:
            info.error = str(e)
        except Exception as e:  # one broken model must not stop the others
            info.error = f"{type(e).__name__}: {e}"
        loaded.append(_Loaded(candidate.label, model, path, dataset, info.error))
    return loaded


_Live = tuple[_Loaded, Cell, ort.InferenceSession, dict[str, np.ndarray]]


class _Bench:
    """One bench run: measures the settings one by one into ``report``."""

    def __init__(
        self,
        report: BenchReport,
        loaded: list[_Loaded],
        options: BenchOptions,
        available: list[str],
        tmp: Path,
        progress: Callable[[str, int, int], None] | None,
    ):
        self.report, self.loaded, self.options = report, loaded, options
        self.available, self.tmp, self.progress = available, tmp, progress
        self.provider_options = {provider_name(k): v for k, v in options.provider_options.items()}
        self.rounds = options.warmup + options.runs
        self.total = self.rounds * len(report.settings)
        self.outputs: dict[tuple[str, str], list[np.ndarray]] = {}  # (model, provider) -> outputs
        self.trivial = _trivial_model()
        self.trivial_path: Path | None = None  # for the memory probe, which needs Linux's /proc
        if options.memory and Path("/proc/self/clear_refs").exists():
            self.trivial_path = tmp / "trivial.onnx"
            ir.save(self.trivial, self.trivial_path)

    def measure_setting(self, index: int, setting: Setting) -> None:
        base = index * self.rounds
        self._progress(setting, base)
        cells = [Cell(item.label, setting.provider, setting.threads, setting.batch, "ok")
                 for item in self.loaded]  # fmt: skip
        try:
            self._warm_runtime(setting)
            live = [
                (item, cell, *prepared)
                for item, cell in zip(self.loaded, cells, strict=True)
                if (prepared := self._prepare(item, cell, setting)) is not None
            ]
            if self.trivial_path is not None:
                for item, cell, _, feeds in live:
                    self._probe(item, cell, setting, feeds)
            live = self._time_sessions(live, setting)
            try:
                times = measure(
                    [_runner(session, feeds) for _, _, session, feeds in live],
                    runs=self.options.runs,
                    warmup=self.options.warmup,
                    time_budget=self.options.time_budget,
                    on_round=lambda r: self._progress(setting, base + r),
                )
            except MeasureInterrupted as stop:
                if stop.samples and stop.samples[0]:
                    for (_, cell, _, _), got in zip(live, stop.samples, strict=True):
                        _set_latency(cell, got)
                        cell.note = _join(cell.note, f"interrupted after {len(got)} runs")
                    self.report.cells.extend(cells)
                raise
            for (_, cell, _, _), got in zip(live, times, strict=True):
                _set_latency(cell, got)
            self.report.cells.extend(cells)
            if any(item.data is not None for item, *_ in live):
                self._accuracy(live, setting)
        finally:
            self._progress(setting, base + self.rounds)

    def _warm_runtime(self, setting: Setting) -> None:
        """Build and run a trivial session under this setting, so that one-off start-up costs
        are not charged to the first model's session time."""
        if setting.provider not in self.available:
            return
        with contextlib.suppress(Exception):  # the models' own sessions report what is wrong
            session = runtime.make_session(
                self.trivial,
                providers=_providers(setting.provider, self.provider_options),
                level=self.options.level,
                threads=setting.threads,
            )
            session.run(None, {"x": np.zeros(1, np.float32)})

    def _progress(self, setting: Setting, done: int) -> None:
        if self.progress is not None:
            self.progress(setting.label, done, self.total)

    def _prepare(
        self, item: _Loaded, cell: Cell, setting: Setting
    ) -> tuple[ort.InferenceSession, dict[str, np.ndarray]] | None:
        """A session and feeds, after one run; None (and the cell says why) when not possible."""
        if item.error:
            cell.status, cell.note = "error", item.error
            return None
        if setting.provider not in self.available:
            cell.status = "unavailable"
            cell.note = "provider not available (see notes)"
            return None
        assert item.model is not None
        fixed = static_batch(item.model)
        if fixed is not None and fixed != setting.batch:
            cell.status, cell.note = "n/a", f"n/a (static batch {fixed})"
            return None
        try:
            feeds = make_feeds(item.model, setting.batch, item.data, self.options.shapes)
            session = self._session(item, setting)
            if session.get_providers()[0] != setting.provider:
                cell.status = "unavailable"
                cell.note = (f"{setting.provider} could not start; ONNX Runtime fell back to "
                             f"{session.get_providers()[0]}")
                return None
            runtime.run_batches(session, [feeds])  # the first warm-up run: errors show here
        except OnnxcompError as e:
            cell.status, cell.note = "error", str(e)
            return None
        return session, feeds

    def _session(self, item: _Loaded, setting: Setting) -> ort.InferenceSession:
        assert item.model is not None
        return runtime.make_session(
            item.model,
            providers=_providers(setting.provider, self.provider_options),
            level=self.options.level,
            threads=setting.threads,
        )

    def _time_sessions(self, live: list[_Live], setting: Setting) -> list[_Live]:
        """Session creation time, taken on a second creation, interleaved like the runs: the
        first (in :meth:`_prepare`) absorbs one-off costs that whichever model went first would
        otherwise pay. The old session is dropped first, so two never hold memory at once."""
        holders: list[list[Any]] = [[session] for _, _, session, _ in live]

        def recreate(item: _Loaded, holder: list[Any]) -> Callable[[], None]:
            def call() -> None:
                holder.clear()
                try:
                    holder.append(self._session(item, setting))
                except OnnxcompError as e:
                    holder.append(e)

            return call

        times = measure([recreate(item, h) for (item, *_), h in zip(live, holders, strict=True)],
                        runs=1)  # fmt: skip
        kept = []
        for (item, cell, _, feeds), holder, seconds in zip(live, holders, times, strict=True):
            if isinstance(holder[0], OnnxcompError):
                cell.status, cell.note = "error", str(holder[0])
                continue
            cell.session_seconds = seconds[0]
            kept.append((item, cell, holder[0], feeds))
        return kept

    def _probe(
        self, item: _Loaded, cell: Cell, setting: Setting, feeds: dict[str, np.ndarray]
    ) -> None:
        assert self.trivial_path is not None and item.path is not None
        cfg = {
            "level": _LEVEL_NAMES[self.options.level],
            "threads": setting.threads,
            "providers": _providers(setting.provider, self.provider_options),
            "runs": max(1, min(self.options.warmup, 5)),
        }
        cell.peak_memory_bytes, problem = _probe_memory(item.path, feeds, self.trivial_path, cfg)
        if problem:
            cell.note = _join(cell.note, f"memory not measured: {problem}")

    def _accuracy(self, live: list[_Live], setting: Setting) -> None:
        """Top-1 and agreement with the first model, once per model and provider, on the first
        ``samples`` samples of the data, batched like the setting."""
        first = self.loaded[0].label
        for item, cell, session, _ in live:
            assert item.data is not None
            key = (item.label, setting.provider)
            if key not in self.outputs:
                try:
                    self.outputs[key] = run_dataset(
                        session, item.data, setting.batch, self.options.samples
                    )
                except OnnxcompError as e:
                    cell.note = _join(cell.note, f"accuracy not measured: {e}")
                    continue
            got = self.outputs[key]
            labels = item.data.labels
            cell.accuracy = top1_accuracy(
                [got[:1]], None if labels is None else labels[: self.options.samples]
            )
            reference = self.outputs.get((first, setting.provider))
            if reference is None or len(reference) != len(got):
                continue
            diffs = [compare_arrays(str(i), [r], [g])
                     for i, (r, g) in enumerate(zip(reference, got, strict=True))]  # fmt: skip
            cell.cosine = min(d.cosine for d in diffs)
            cell.max_abs_err = max(d.max_abs for d in diffs)
            if reference[0].ndim == 2 and reference[0].shape == got[0].shape:
                cell.agreement = float(np.mean(reference[0].argmax(1) == got[0].argmax(1)))


def _providers(provider: str, options: dict[str, dict[str, str]]) -> list[Any]:
    first: Any = (provider, options[provider]) if provider in options else provider
    return [first] if provider == "CPUExecutionProvider" else [first, "CPUExecutionProvider"]


def _runner(session: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> Callable[[], object]:
    def call() -> object:
        return session.run(None, feeds)

    return call


def _set_latency(cell: Cell, seconds: list[float]) -> None:
    cell.latency = Latency.of(seconds)
    cell.throughput = cell.batch / (cell.latency.p50 * 1e-3) if cell.latency.p50 > 0 else None


def run_dataset(
    session: ort.InferenceSession, data: Dataset, batch: int, limit: int
) -> list[np.ndarray]:
    """Outputs over the first ``limit`` samples, concatenated; a short last batch is padded by
    repeating samples (static-batch models need full batches) and trimmed afterwards."""
    batches = []
    for feeds in data.batches(batch, limit):
        n = len(next(iter(feeds.values())))
        if n < batch:
            feeds = {k: np.concatenate([v] * -(-batch // n))[:batch] for k, v in feeds.items()}
        batches.append([o[:n] for o in runtime.run_batches(session, [feeds])[0]])
    return [np.concatenate([b[i] for b in batches]) for i in range(len(batches[0]))]


def _add_ratios(report: BenchReport) -> None:
    """Each figure divided by the first model's under the same setting."""
    if not report.models:
        return
    first = report.models[0].label
    file_bytes = {m.label: m.file_bytes for m in report.models}
    for setting in report.settings:
        ref = report.cell(first, setting)
        if ref is None or ref.status != "ok":
            continue
        ref_values = _figures(ref, file_bytes[first])
        for cell in report.cells:
            if cell.setting != setting or cell.status != "ok":
                continue
            for name, value in _figures(cell, file_bytes[cell.model]).items():
                base = ref_values.get(name)
                if value is not None and base:
                    cell.ratios[name] = value / base


def _figures(cell: Cell, file_bytes: int | None) -> dict[str, float | None]:
    latency = cell.latency
    return {
        "file_bytes": file_bytes,
        "session_seconds": cell.session_seconds,
        "p50": latency.p50 if latency else None,
        "p90": latency.p90 if latency else None,
        "p99": latency.p99 if latency else None,
        "throughput": cell.throughput,
        "peak_memory_bytes": cell.peak_memory_bytes,
    }


def _join(a: str, b: str) -> str:
    return f"{a}; {b}" if a else b


def _environment(available: list[str]) -> dict[str, Any]:
    from onnxcomp import __version__

    return {
        "onnxcomp": __version__,
        "onnxruntime": ort.__version__,
        "available_providers": available,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
    }


# The memory probe runs in a fresh interpreter that imports only numpy and onnxruntime.
_PROBE_SOURCE = r"""
import json, sys
import numpy as np
import onnxruntime as ort

def status():
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024
    return values

def options(cfg):
    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, cfg["level"])
    so.log_severity_level = 3
    if cfg["threads"]:
        so.intra_op_num_threads = cfg["threads"]
        so.inter_op_num_threads = 1
    return so

model, feeds_path, trivial, cfg = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
providers = [tuple(p) if isinstance(p, list) else p for p in cfg["providers"]]
with np.load(feeds_path) as archive:
    feeds = {k: archive[k] for k in archive.files}
warm = ort.InferenceSession(trivial, options(cfg), providers=providers)
warm.run(None, {"x": np.zeros(1, np.float32)})
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status()["VmRSS"]
session = ort.InferenceSession(model, options(cfg), providers=providers)
for _ in range(cfg["runs"]):
    session.run(None, feeds)
print(json.dumps({"peak": status()["VmHWM"] - before}))
"""


def _trivial_model() -> ir.Model:
    """A one-node model (y = Identity(x)): a session for it warms ONNX Runtime's process-wide
    state (environment, kernel registry, a CUDA context) so the first model is not charged."""
    x = ir.Value(name="x", shape=ir.Shape([1]), type=ir.TensorType(ir.DataType.FLOAT))
    node = ir.Node("", "Identity", [x], num_outputs=1)
    node.outputs[0].name, node.outputs[0].shape = "y", ir.Shape([1])
    node.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    graph = ir.Graph([x], node.outputs, nodes=[node], opset_imports={"": 17})
    return ir.Model(graph, ir_version=8)


_LEVEL_NAMES = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}


def _probe_memory(
    model: Path, feeds: dict[str, np.ndarray], trivial: Path, cfg: dict[str, Any]
) -> tuple[int | None, str | None]:
    """Peak memory of one model under one setting, measured in a child process; or why not."""
    feeds_path = trivial.parent / "feeds.npz"
    np.savez(feeds_path, **feeds)
    args = [sys.executable, "-c", _PROBE_SOURCE, str(model), str(feeds_path), str(trivial),
            json.dumps(cfg)]  # fmt: skip
    try:
        done = subprocess.run(args, capture_output=True, text=True, check=False, timeout=600)
    except subprocess.TimeoutExpired:
        return None, "the probe took over 600 s"
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        return None, (lines[-1] if lines else f"exit code {done.returncode}")[:200]
    try:
        return int(json.loads(done.stdout.strip().splitlines()[-1])["peak"]), None
    except (ValueError, KeyError, IndexError):
        return None, "unreadable probe output"
