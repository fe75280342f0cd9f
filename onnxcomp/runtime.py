"""ONNX Runtime sessions over in-memory onnx_ir models: build once, run batches.

Numeric checks pin the graph optimisation level (basic by default): above it ONNX Runtime
fuses DequantizeLinear+MatMul into kernels whose rounding differs, which would blur what a
pass changed with what the runtime changed.
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
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
    prepack: bool = True,
) -> ort.InferenceSession:
    """An InferenceSession for ``model``; a one-line OnnxcompError if ONNX Runtime rejects it.

    Weights the model reads from external data files (memory-mapped) are handed to ONNX
    Runtime as they are, not copied (:func:`_shared_weights`). ``prepack=False`` skips ONNX
    Runtime's repacking of MatMul weights: a session run once or twice (a sampled check) then
    does not copy each weight again.
    """
    return session_factory(
        model, providers=providers, level=level, threads=threads, prepack=prepack
    )()


def session_factory(
    model: ir.Model,
    *,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    level: str = "basic",
    threads: int | None = None,
    prepack: bool = True,
    spin: bool = True,
) -> Callable[[], ort.InferenceSession]:
    """:func:`make_session` in two steps: everything that reads ``model`` now, on the caller's
    thread (onnx_ir objects are not thread-safe), and the returned function (called once),
    which only calls ONNX Runtime and may run on another thread while the model changes.
    ``spin=False``: idle
    worker threads sleep instead of spinning (a session that runs beside other work)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = LEVELS[level]
    options.log_severity_level = LOG_SEVERITY
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        shared = _shared_weights(model)
        if shared is not None:
            names, values = shared
            if names:
                options.add_external_initializers(names, values)
            source = _inline_proto(model, set(names))

            def build() -> ort.InferenceSession:
                session = _created(source, options, providers)
                session._onnxcomp_weights = values  # ONNX Runtime reads them: they outlive it
                return session

            return build
        folder = tempfile.TemporaryDirectory(prefix="onnxcomp-ort-")
        path = Path(folder.name) / "model.onnx"
        ir.save(model, path, external_data="model.onnx.data")
    except OnnxcompError:
        raise
    except Exception as e:
        raise _rejected(e) from None

    def build_from_file() -> ort.InferenceSession:
        with folder:
            return _created(str(path), options, providers)

    return build_from_file


def _created(
    source: bytes | str, options: ort.SessionOptions, providers: Sequence[str]
) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(source, options, providers=list(providers))
    except Exception as e:
        raise _rejected(e) from None


def _rejected(e: Exception) -> OnnxcompError:
    message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return OnnxcompError(f"ONNX Runtime cannot load the model: {message[:400]}")


def _shared_weights(model: ir.Model) -> tuple[list[str], list[ort.OrtValue]] | None:
    """The main graph's external weights as OrtValues over their memory-mapped bytes (no
    copy), by name, when everything else fits in one serialised model: the other weights
    (in memory, sub-byte external ones, subgraphs') under protobuf's 2 GB. None otherwise."""
    names: list[str] = []
    values: list[ort.OrtValue] = []
    shared_bytes = 0
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if not isinstance(tensor, ir.ExternalTensor) or tensor.dtype.bitwidth < 8:
            continue
        array = tensor.numpy()
        if array.dtype.kind not in "fiub":
            continue  # ml_dtypes (bfloat16, float8, kind "V"): inlined by _inline_proto
        names.append(value.name or "")
        values.append(ort.OrtValue.ortvalue_from_numpy(array))
        shared_bytes += tensor.nbytes
    if weight_bytes(model) - shared_bytes >= _INLINE_LIMIT_BYTES:
        return None
    return names, values


def _in_memory(tensor: ir.ExternalTensor) -> ir.TensorProtocol:
    """``tensor``'s bytes read into memory; sub-byte codes stay packed (unpacking INT4 to
    numpy and packing it again cost more than the session)."""
    if tensor.dtype.bitwidth < 8:
        stored = io.BytesIO()
        tensor.tofile(stored)  # the bytes as stored: tobytes() would unpack them first
        packed = np.frombuffer(stored.getbuffer(), dtype=np.uint8)
        return ir.PackedTensor(packed, tensor.dtype, shape=tensor.shape, name=tensor.name)
    return ir.Tensor(tensor.numpy(), dtype=tensor.dtype, name=tensor.name)


def _inline_proto(model: ir.Model, shared: set[str]) -> bytes:
    """``model`` serialised with every weight inline except the main graph's ``shared`` ones
    (left as external references, which ONNX Runtime takes from the session options)."""
    swapped = {}
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor) and not (
                graph is model.graph and value.name in shared
            ):
                swapped[value] = tensor
                value.const_value = _in_memory(tensor)
    try:
        return ir.to_proto(model).SerializeToString()
    finally:
        for value, tensor in swapped.items():
            value.const_value = tensor


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
