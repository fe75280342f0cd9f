"""ONNX Runtime sessions over in-memory onnx_ir models: build once, run batches.

Numeric checks pin the graph optimisation level (basic by default): above it ONNX Runtime
fuses DequantizeLinear+MatMul into kernels whose rounding differs, which would blur what a
pass changed with what the runtime changed.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from onnxcomp.errors import OnnxcompError
from onnxcomp.io import has_external_tensors, weight_bytes

# Serialising past this needs external data (protobuf's 2 GB limit, with headroom).
_INLINE_LIMIT_BYTES = 1_800_000_000

# ONNX Runtime logs a failing kernel on stderr at ERROR level, beside the exception that says
# the same; the exception becomes onnxcomp's one-line error, so only FATAL is logged.
LOG_SEVERITY = 4

LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def make_session(
    model: ir.Model,
    *,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    level: str = "basic",
    threads: int | None = None,
) -> ort.InferenceSession:
    """An InferenceSession for ``model``; a one-line OnnxcompError if ONNX Runtime rejects it."""
    options = ort.SessionOptions()
    options.graph_optimization_level = LEVELS[level]
    options.log_severity_level = LOG_SEVERITY
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    try:
        if weight_bytes(model) < _INLINE_LIMIT_BYTES and not has_external_tensors(model):
            data = ir.to_proto(model).SerializeToString()
            return ort.InferenceSession(data, options, providers=list(providers))
        with tempfile.TemporaryDirectory(prefix="onnxcomp-ort-") as tmp:
            path = Path(tmp) / "model.onnx"
            ir.save(model, path, external_data="model.onnx.data")
            return ort.InferenceSession(str(path), options, providers=list(providers))
    except OnnxcompError:
        raise
    except Exception as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OnnxcompError(f"ONNX Runtime cannot load the model: {message[:400]}") from None


def run_batches(
    session: ort.InferenceSession, batches: Iterable[dict[str, np.ndarray]]
) -> list[list[np.ndarray]]:
    """Run each feed; returns one list of outputs (in graph order) per batch."""
    results = []
    for feeds in batches:
        try:
            results.append(session.run(None, feeds))
        except Exception as e:
            message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise OnnxcompError(f"ONNX Runtime failed to run the model: {message[:400]}") from None
    return results


def output_names(session: ort.InferenceSession) -> list[str]:
    return [o.name for o in session.get_outputs()]



def collect_activations(
    model: ir.Model,
    names: Sequence[str],
    batches: Iterable[dict[str, np.ndarray]],
    *,
    level: str = "basic",
    threads: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Run ``model`` on each feed and yield the values ``names`` (intermediate values or graph
    outputs) by name, one dict per batch. The values are added as graph outputs of a copy: the
    model is not changed. Names the model lacks are left out of the dicts."""
    probe = model.clone()
    produced = {v.name: v for node in probe.graph for v in node.outputs if v.name}
    produced.update((v.name, v) for v in probe.graph.inputs if v.name)
    wanted = [name for name in dict.fromkeys(names) if name in produced]
    present = {v.name for v in probe.graph.outputs}
    probe.graph.outputs.extend(
        produced[n] for n in wanted if n not in present and not produced[n].is_graph_input()
    )
    if not wanted:
        return
    session = make_session(probe, level=level, threads=threads)
    fetch = [n for n in wanted if not produced[n].is_graph_input()]
    for feeds in batches:
        try:
            values = session.run(fetch, feeds) if fetch else []
        except Exception as e:
            message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise OnnxcompError(f"ONNX Runtime failed to run the model: {message[:400]}") from None
        found = dict(zip(fetch, values, strict=True))
        found.update((n, feeds[n]) for n in wanted if n in feeds)
        yield found


def optimized_model(model: ir.Model, *, level: str = "extended") -> ir.Model:
    """The graph ONNX Runtime (CPU) actually runs at ``level``: what its fusions made of
    ``model`` (e.g. which QuantizeLinear/DequantizeLinear it turned into integer kernels)."""
    with tempfile.TemporaryDirectory(prefix="onnxcomp-ort-") as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = LEVELS[level]
        options.log_severity_level = LOG_SEVERITY
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        try:
            if weight_bytes(model) < _INLINE_LIMIT_BYTES and not has_external_tensors(model):
                source: str | bytes = ir.to_proto(model).SerializeToString()
            else:
                ir.save(model, Path(tmp) / "model.onnx", external_data="model.onnx.data")
                source = str(Path(tmp) / "model.onnx")
            ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        except Exception as e:
            message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise OnnxcompError(f"ONNX Runtime cannot load the model: {message[:400]}") from None
        return ir.load(options.optimized_model_filepath)
