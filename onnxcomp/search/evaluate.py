"""Run one pipeline string and measure what it gives: the search's unit of work.

Every candidate goes through :func:`onnxcomp.optimize` (the same passes, registry and cleanup
as ``onnxcomp optimize``) on the *fit* data, with the pipeline's own loss guard off: the search
judges the bound itself, on held-out data no pass has seen. The result is scored in ONNX
Runtime at the level users run (``all``, so runtime fusions count), sized as the serialised
model, and timed with :func:`onnxcomp.bench.measure` interleaved with the input model, so a
noisy machine moves both alike and the speed-up stays meaningful.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxcomp import runtime
from onnxcomp.bench import Latency, make_feeds, measure, run_dataset
from onnxcomp.data import Dataset, run_batch_size
from onnxcomp.errors import OnnxcompError
from onnxcomp.instrument import LossBound, min_cosine
from onnxcomp.search.metrics import Metric, output_diffs, sqnr_db
from onnxcomp.target import Target

SCORE_LEVEL = "all"
MAX_RUN_BATCH = 256


@dataclasses.dataclass(frozen=True)
class Timing:
    """How latency is measured: batch, intra-op threads, and the timing loop's budget."""

    batch: int = 1
    threads: int = 1
    seconds: float = 1.0
    runs: int = 200
    warmup: int = 5


DEFAULT_TIMING = Timing()


@dataclasses.dataclass
class Outcome:
    """What one pipeline gave. ``drop`` is in the metric's units (top-1 points by default);
    ``speedup`` is the input model's p50 over this one's, from one interleaved timing loop."""

    pipeline: str
    score: float | None = None
    drop: float | None = None
    cosine: float | None = None
    sqnr_db: float | None = None
    bytes: int | None = None
    size_ratio: float | None = None  # input bytes / these bytes
    latency_ms: float | None = None
    speedup: float | None = None
    seconds: float = 0.0
    applied: bool = True  # False: the passes changed nothing (e.g. every layer excluded)
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def model_bytes(model: ir.Model) -> int:
    """Serialised size: what the file holds when written without external data."""
    return ir.to_proto(model).ByteSize()


class Evaluator:
    """The input model, the fit and held-out data, the metric; scores pipelines against them."""

    def __init__(
        self,
        model: ir.Model,
        fit: Dataset,
        held_out: Dataset,
        metric: Metric,
        *,
        target: Target,
        timing: Timing = DEFAULT_TIMING,
        threads: int | None = None,
    ):
        self.model = model
        self.fit = fit
        self.held_out = held_out
        self.metric = metric
        self.target = target
        self.timing = timing
        self.threads = threads  # of the scoring sessions (1 in worker processes)
        self.base_bytes = model_bytes(model)
        self.reference = self.outputs(model)
        self.base_score = metric.score(self.reference, self.reference, held_out)
        self._base_session: Any = None
        self._feeds: dict[str, np.ndarray] | None = None

    def outputs(self, model: ir.Model) -> dict[str, np.ndarray]:
        """``model``'s outputs on every held-out sample, by output name."""
        session = runtime.make_session(model, level=SCORE_LEVEL, threads=self.threads)
        batch = run_batch_size(model, self.held_out.num_samples, MAX_RUN_BATCH)
        values = run_dataset(session, self.held_out, batch, self.held_out.num_samples)
        return dict(zip(runtime.output_names(session), values, strict=True))

    def compress(self, pipeline: str) -> tuple[ir.Model, bool]:
        """``pipeline`` applied to the input model (in memory, loss guard off); whether any
        pass changed anything."""
        import onnxcomp

        model, report = onnxcomp.optimize(
            self.model, pipeline, data=self.fit, check="none", target=self.target,
            bound=LossBound(allow_loss=True),
        )  # fmt: skip
        return model, any(r.modified for r in report.records if r.name not in LOSSLESS_TAIL)

    def evaluate(self, pipeline: str, *, latency: bool = False) -> Outcome:
        """Compress, score on held-out data, size, and (with ``latency``) time; a pipeline
        that fails is an outcome with its error, not an exception."""
        return self.evaluate_model(pipeline, latency=latency)[0]

    def evaluate_model(
        self, pipeline: str, *, latency: bool = False
    ) -> tuple[Outcome, ir.Model | None]:
        """:meth:`evaluate`, and the compressed model (None when the pipeline failed)."""
        started = time.perf_counter()
        outcome = Outcome(pipeline)
        model = None
        try:
            model, outcome.applied = self.compress(pipeline)
            self.score_into(outcome, model, latency=latency)
        except OnnxcompError as e:
            outcome.error = " ".join(str(e).split())
            model = None
        outcome.seconds = time.perf_counter() - started
        return outcome, model

    def score_into(self, outcome: Outcome, model: ir.Model, *, latency: bool) -> None:
        """Fill ``outcome``'s figures for ``model``."""
        outputs = self.outputs(model)
        outcome.score = self.metric.score(outputs, self.reference, self.held_out)
        outcome.drop = self.base_score - outcome.score
        outcome.cosine = min_cosine(output_diffs(outputs, self.reference))
        outcome.sqnr_db = sqnr_db(outputs, self.reference)
        outcome.bytes = model_bytes(model)
        outcome.size_ratio = self.base_bytes / outcome.bytes if outcome.bytes else None
        if latency:
            outcome.latency_ms, outcome.speedup = self.latency(model)

    def latency(self, model: ir.Model) -> tuple[float, float]:
        """(p50 ms of ``model``, input p50 / ``model`` p50), timed interleaved with the input
        model by bench's loop at ``timing``'s batch and threads, ONNX Runtime level all."""
        return self.latencies([model])[0]

    def latencies(
        self, models: Sequence[ir.Model], seconds: float | None = None
    ) -> list[tuple[float, float]]:
        """:meth:`latency` of several models from one loop, all interleaved with the input
        model (``seconds``: the loop's budget, default ``timing.seconds``)."""
        t = self.timing
        if self._base_session is None:
            self._base_session = runtime.make_session(self.model, level="all", threads=t.threads)
            self._feeds = make_feeds(self.model, t.batch, self.held_out)
        feeds = self._feeds
        assert feeds is not None
        sessions = [self._base_session]
        sessions += [runtime.make_session(m, level="all", threads=t.threads) for m in models]
        samples = measure([_call(s, feeds) for s in sessions], runs=t.runs, warmup=t.warmup,
                          time_budget=seconds or t.seconds)  # fmt: skip
        base_ms = Latency.of(samples[0]).p50
        times = [Latency.of(s).p50 for s in samples[1:]]
        return [(ms, base_ms / ms if ms > 0 else float("inf")) for ms in times]


# Lossless passes a search appends or prepends; "changed nothing" ignores them.
LOSSLESS_TAIL = ("strip", "fold-bn", "simplify")


def _call(session: Any, feeds: dict[str, np.ndarray]) -> Callable[[], object]:
    def call() -> object:
        return session.run(None, feeds)

    return call
