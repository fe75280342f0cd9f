"""Parse a pipeline string, run its passes on one in-memory model, and keep a ledger.

``"prune:sparsity=0.8,int4:block_size=32"``: passes are separated by commas, options follow
the pass name after colons, list values are joined with ``+``. The pipeline (not the passes)
times each pass, runs a cleanup tail (dead code, topological sort, unique names), the ONNX
checker and a numeric comparison with the input model in ONNX Runtime. A pass that raises,
breaks the checker, stops ONNX Runtime loading the model, or (if lossless) moves outputs past
the tolerance fails the whole run with a :class:`PassFailedError`: nothing is written.
Lossy passes are reported, not failed; the final model is then held to a :class:`LossBound`
against the input model (top-1 drop, output cosine): a result below it raises
:class:`LossBoundError` naming the pass where the metric fell most, unless ``allow_loss``.

A model whose weights pass ``stream_above`` (default :data:`STREAM_ABOVE_BYTES`) is handled in
bounded memory: weight passes rewrite it one tensor at a time and write each new weight to a
scratch file (:class:`~onnxcomp.io.ScratchData`) instead of keeping it, and the numeric check
runs a sample of its layers alone (:class:`~onnxcomp.instrument.LayerSample`) instead of the
whole model, which ONNX Runtime would hold in memory (with every folded DequantizeLinear).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common as common_passes

from onnxcomp import registry
from onnxcomp.analysis.summary import ModelSummary, summarize
from onnxcomp.data import Dataset, random_inputs, run_batch_size
from onnxcomp.errors import LossBoundError, OnnxcompError, PassFailedError, UsageError
from onnxcomp.instrument import (
    LayerSample,
    LossBound,
    OutputDiff,
    Reference,
    Tolerance,
    check_model,
    min_cosine,
)
from onnxcomp.io import SCRATCH_KEY, ScratchData, weight_bytes
from onnxcomp.layout import normalize_layout
from onnxcomp.passes._base import CompressionPass, CompressionResult
from onnxcomp.target import Target, resolve_target

CheckMode = Literal["each", "final", "none"]
DEFAULT_CHECK_SAMPLES = 512
MAX_CHECK_BATCH = 16
# Weights past this make the pipeline stream (see the module docstring): ONNX Runtime holds a
# model's weights at least once more when it runs it whole.
STREAM_ABOVE_BYTES = 1_000_000_000


def parse_pipeline(text: str) -> list[tuple[str, dict[str, str]]]:
    """``"a:k=v:k2=v2,b"`` -> ``[("a", {"k": "v", "k2": "v2"}), ("b", {})]``."""
    steps = []
    for chunk in text.split(","):
        name, *assignments = chunk.strip().split(":")
        if not name:
            raise UsageError(f"empty pass name in pipeline '{text}'")
        values: dict[str, str] = {}
        for assignment in assignments:
            key, sep, value = assignment.partition("=")
            if not sep or not key:
                raise UsageError(f"bad option '{assignment}' for pass '{name}': expected key=value")
            values[key.strip()] = value.strip()
        steps.append((name, values))
    return steps


def build_passes(
    passes: str | Sequence[str | CompressionPass],
    *,
    data: Dataset | None = None,
    target: Target | None = None,
) -> list[tuple[str, CompressionPass]]:
    """Resolve a pipeline string or a list of names / pass objects into (label, pass) pairs;
    ``data`` and ``target`` go to every pass that was not given its own."""
    items: list[str | CompressionPass] = [passes] if isinstance(passes, str) else list(passes)
    built: list[tuple[str, CompressionPass]] = []
    for item in items:
        if isinstance(item, CompressionPass):
            if item.data is None:
                item.data = data
            if item.target is None:
                item.target = target
            built.append((_label(item), item))
            continue
        if not isinstance(item, str):
            raise UsageError(f"not a pass: {item!r}")
        for name, values in parse_pipeline(item):
            built.append((name, registry.get(name).build(values, data=data, target=target)))
    if not built:
        raise UsageError("no passes given")
    return built


@dataclasses.dataclass
class Snapshot:
    """Size and structure of the model at one point of the pipeline."""

    params: int
    weight_bytes: int
    nodes: int
    op_counts: dict[str, int]

    @classmethod
    def of(cls, summary: ModelSummary) -> Snapshot:
        return cls(summary.params, summary.weight_bytes, summary.nodes, dict(summary.op_counts))


@dataclasses.dataclass
class PassRecord:
    """One pass's line in the ledger."""

    name: str
    options: dict[str, Any]
    seconds: float
    modified: bool
    stats: dict[str, Any]
    notes: list[str]
    after: Snapshot
    check: list[OutputDiff] | None
    accuracy: float | None = None  # top-1 on the check data's labels, when it has them


@dataclasses.dataclass
class PipelineReport:
    """What the pipeline did, pass by pass, and how the result compares with the input."""

    pipeline: str
    before: Snapshot
    records: list[PassRecord]
    check_inputs: str
    tolerance: Tolerance
    accuracy_before: float | None = None
    target: str = ""
    # The loss bound and how the final model stands against it (None: not checked).
    guard: dict[str, Any] | None = None
    input_path: str | None = None
    output_path: str | None = None
    file_bytes_before: int | None = None
    file_bytes_after: int | None = None
    # What was done to the model before the first pass (legacy layouts, see onnxcomp.layout).
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def after(self) -> Snapshot:
        return self.records[-1].after if self.records else self.before

    @property
    def final_check(self) -> list[OutputDiff] | None:
        return self.records[-1].check if self.records else None

    def op_changes(self) -> dict[str, tuple[int, int]]:
        before, after = Counter(self.before.op_counts), Counter(self.after.op_counts)
        return {
            op: (before[op], after[op])
            for op in sorted(set(before) | set(after))
            if before[op] != after[op]
        }

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def run_pipeline(
    model: ir.Model,
    passes: str | Sequence[str | CompressionPass],
    *,
    data: Dataset | None = None,
    shapes: dict[str, tuple[int, ...]] | None = None,
    tolerance: Tolerance = Tolerance(),
    check: CheckMode = "each",
    check_samples: int = DEFAULT_CHECK_SAMPLES,
    level: str = "basic",
    target: Target | str | None = None,
    bound: LossBound = LossBound(),
    keep_initializer_inputs: bool = False,
    stream_above: int = STREAM_ABOVE_BYTES,
    scratch_dir: str | os.PathLike | None = None,
) -> PipelineReport:
    """Run ``passes`` on ``model`` in place and return the ledger; raises on any failed pass
    and on a result below ``bound`` (unless ``bound.allow_loss``). Initializers listed as graph
    inputs become plain weights first unless ``keep_initializer_inputs``
    (:func:`~onnxcomp.layout.normalize_layout`; the report's ``notes`` say so). A model with
    more than ``stream_above`` bytes of weights streams, its new weights kept in a scratch
    folder made in ``scratch_dir`` (default: the system's temporary folder) for as long as
    the model lives."""
    if check_samples < 1:
        raise UsageError(f"check_samples must be >= 1, not {check_samples}")
    if not stream_above >= 0:
        raise UsageError(f"stream_above must be >= 0 bytes, not {stream_above}")
    layout_notes = normalize_layout(model, keep_initializer_inputs=keep_initializer_inputs)
    streaming = weight_bytes(model) > stream_above
    if streaming and SCRATCH_KEY not in model.graph.meta:
        model.graph.meta[SCRATCH_KEY] = ScratchData(scratch_dir)
    resolved = resolve_target(target)
    steps = build_passes(passes, data=data, target=resolved)
    if any(p.needs_teacher and p.teacher is None for _, p in steps):
        # A snapshot of the input for passes that train against it; clone() shares tensors,
        # which passes never write into, so this costs no weight copies.
        teacher = model.clone()
        for _, p in steps:
            if p.needs_teacher and p.teacher is None:
                p.teacher = teacher
    for label, compression_pass in steps:
        try:
            compression_pass.preflight()
        except OnnxcompError as e:
            e.with_context(f"pass '{label}'")
            raise
    before = Snapshot.of(summarize(model, count_zeros=False))  # sparsity is not in the ledger
    # Results are held to the strict checker only if the input passes it.
    strict = check_model(model, full=True) is None
    reference = None
    description = "none (--check none)"
    if check != "none" and streaming:
        try:
            # The input's layers run while the first pass does (its weights are read anyway).
            reference = LayerSample(model, level=level, background=True)
        except OnnxcompError as e:
            raise OnnxcompError(f"{e}; --check none skips the check") from None
        description = (
            f"{reference.description} (the model's weights pass {stream_above / 1e9:g} GB, "
            "so it is not run whole)"
        )
    elif check != "none":
        inputs = data if data is not None else random_inputs(model, shapes)
        description = inputs.description
        if data is not None:
            description += f" (first {min(check_samples, data.num_samples)} samples)"
        try:
            reference = Reference(
                model,
                inputs,
                batch_size=run_batch_size(model, inputs.num_samples, MAX_CHECK_BATCH),
                level=level,
                limit=check_samples,
            )
        except OnnxcompError as e:
            raise OnnxcompError(
                f"cannot run the input model for the numeric check ({e}); "
                "--check none skips the check"
            ) from None

    records = []
    # Outputs of the model as it was before the current pass, when known: a lossless pass is
    # held to them, not to the input model's (a lossy pass before it moved those).
    # The reference's own outputs (``_REFERENCE``) are read when first compared: a sampled
    # check's may still be computed in the background meanwhile.
    before_pass: Any = _REFERENCE if reference is not None else None
    for index, (label, compression_pass) in enumerate(steps):
        is_last = index == len(steps) - 1
        if reference is not None and compression_pass.lossless and before_pass is None:
            before_pass = _run_outputs(label, reference, model)
        started = time.perf_counter()
        result = _run_one(label, compression_pass, model)
        _cleanup(model)
        seconds = time.perf_counter() - started
        problem = check_model(model, full=strict)
        if problem:
            raise PassFailedError(label, f"the result fails onnx.checker: {problem}")
        diffs = accuracy = outputs = None
        wanted = check == "each" or is_last
        if reference is not None and (wanted or compression_pass.lossless):
            _ = reference.outputs  # first: an input that fails to run is reported as such
            outputs = _run_outputs(label, reference, model)
            if compression_pass.lossless:
                baseline = reference.outputs if before_pass is _REFERENCE else before_pass
                for diff in reference.compare(outputs, baseline):
                    if not diff.within(tolerance):
                        raise PassFailedError(
                            label,
                            f"lossless pass moved output '{diff.name}' beyond {tolerance} "
                            f"(max abs err {diff.max_abs:.3g}, scale {diff.ref_scale:.3g})",
                        )
            if wanted:
                diffs, accuracy = reference.compare(outputs), reference.accuracy_of(outputs)
        before_pass = outputs
        records.append(
            PassRecord(
                name=label,
                options=compression_pass.options.as_dict(),
                seconds=seconds,
                modified=result.modified,
                stats=dict(result.stats),
                notes=list(result.notes),
                after=Snapshot.of(summarize(model, count_zeros=False)),
                check=diffs,
                accuracy=accuracy,
            )
        )
    if isinstance(reference, LayerSample) and reference.missing:
        layout_notes.append(
            f"sampled check: {', '.join(reference.missing)} could not be cut out of the result "
            "(renamed or fused by a pass), so it was left out of the comparison"
        )
    pipeline = ",".join(label for label, _ in steps)
    report = PipelineReport(
        pipeline,
        before,
        records,
        description,
        tolerance,
        accuracy_before=reference.accuracy if reference is not None else None,
        target=resolved.describe(),
        notes=layout_notes,
    )
    if reference is not None:
        report.guard = judge(report, bound)
        if not report.guard["passed"] and not bound.allow_loss:
            raise LossBoundError(report.guard["message"], report.guard["worst_pass"])
    return report


def judge(report: PipelineReport, bound: LossBound) -> dict[str, Any]:
    """How the final model stands against ``bound``: the figures, whether it passed, and (when
    it did not) the pass where the failing metric fell most and a one-line message."""
    accuracy_after = report.records[-1].accuracy if report.records else report.accuracy_before
    final = report.final_check or []
    cosine = min_cosine(final)
    drop = None
    if report.accuracy_before is not None and accuracy_after is not None:
        drop = (report.accuracy_before - accuracy_after) * 100
    failures = []
    if bound.max_drop is not None and drop is not None and drop > bound.max_drop:
        failures.append(("accuracy", f"top-1 fell {drop:.2f} pt (--max-drop {bound.max_drop:g})"))
    cosine_limit = bound.cosine_limit(has_labels=report.accuracy_before is not None)
    if cosine_limit is not None and cosine is not None and cosine < cosine_limit:
        failures.append(("cosine", f"output cosine {cosine:.4f} (--min-cosine {cosine_limit:g})"))
    broken = [d.name for d in final if d.shape_mismatch or d.new_nonfinite]
    if broken:
        failures.append(("cosine", f"output {broken[0]} has new NaN/Inf or a new shape"))
    verdict: dict[str, Any] = {
        "bound": str(bound),
        "max_drop": bound.max_drop,
        "min_cosine": cosine_limit,
        "accuracy_drop_pt": drop,
        "cosine": cosine,
        "passed": not failures,
        "allowed": bool(failures) and bound.allow_loss,
        "worst_pass": None,
        "message": "",
    }
    if not failures:
        return verdict
    metric = failures[0][0]
    worst, where = _worst_step(report, metric)
    verdict["worst_pass"] = worst
    verdict["message"] = (
        f"the result is below the loss bound: {'; '.join(text for _, text in failures)}; "
        f"{where}; nothing written (--allow-loss writes it anyway)"
    )
    return verdict


def _worst_step(report: PipelineReport, metric: str) -> tuple[str | None, str]:
    """The pass (or run of passes, where --check final left no figures between them) across
    which ``metric`` fell most, and a phrase saying so."""

    def value(record: PassRecord | None) -> float | None:
        if record is None:
            return report.accuracy_before if metric == "accuracy" else 1.0
        if metric == "accuracy":
            return record.accuracy
        return min_cosine(record.check) if record.check is not None else None

    worst: tuple[float, list[str], float, float] | None = None
    previous, since = value(None), []
    for record in report.records:
        since.append(record.name)
        current = value(record)
        if current is None:
            continue
        if previous is not None and (worst is None or previous - current > worst[0]):
            worst = (previous - current, since, previous, current)
        previous, since = current, []
    if worst is None:
        return None, "no per-pass figures to say where"
    _, names, start, end = worst
    if metric == "accuracy":
        figures = f"top-1 {start:.2%} -> {end:.2%}"
    else:
        figures = f"cosine {start:.4f} -> {end:.4f}"
    if len(names) == 1:
        return names[0], f"it fell most in pass '{names[0]}' ({figures})"
    span = f"'{names[0]}' .. '{names[-1]}'"
    return names[-1], f"it fell most across passes {span} ({figures}; --check each names one)"


_REFERENCE = object()  # before the first pass: the outputs are the reference's own


def _run_one(label: str, compression_pass: CompressionPass, model: ir.Model) -> CompressionResult:
    try:
        result = compression_pass(model)
        scratch = model.graph.meta.get(SCRATCH_KEY)
        if scratch is not None:
            scratch.flush()  # the pass's last weights are written before anything reads them
    except ir.passes.PreconditionError as e:
        if isinstance(e.__cause__, OnnxcompError):
            raise e.__cause__.with_context(f"pass '{label}'") from None
        raise PassFailedError(label, _one_line(e.__cause__ or e)) from e
    except PassFailedError:
        raise
    except OnnxcompError as e:
        e.with_context(f"pass '{label}'")
        raise
    except Exception as e:
        raise PassFailedError(label, _one_line(e)) from e
    if not isinstance(result, CompressionResult):
        result = CompressionResult(result.model, result.modified)
    return result


def _run_outputs(label: str, reference: Reference, model: ir.Model) -> list[list[np.ndarray]]:
    try:
        return reference.run(model)
    except (OnnxcompError, ValueError) as e:
        raise PassFailedError(label, f"the result cannot be checked: {e}") from e


def _cleanup(model: ir.Model) -> None:
    common_passes.RemoveUnusedNodesPass()(model)
    common_passes.TopologicalSortPass()(model)
    common_passes.NameFixPass()(model)


def _label(compression_pass: CompressionPass) -> str:
    for name, spec in registry.PASSES.items():
        if spec.target.endswith(":" + type(compression_pass).__name__) and not spec.presets:
            return name
    return type(compression_pass).__name__


def _one_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return f"{type(error).__name__}: {text.splitlines()[0][:400]}"
