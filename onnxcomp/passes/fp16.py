"""Half precision: float32 weights and activations become float16, with Casts where fp32 stays.

:class:`Float16Pass` converts every float32 initializer, ``Constant`` / ``ConstantOfShape``
value and float32 activation of the main graph to float16 and points float32 ``Cast`` targets
(``to=FLOAT``) inside the converted region at float16. It inserts ``Cast`` nodes where a
float16 value meets something that stays float32:

- graph inputs and outputs (``keep_io_types``, default true: callers still feed and get fp32);
- ops kept in fp32: ``keep_fp32`` (op types), ``exclude`` (node-name patterns), ops whose ONNX
  schema does not take float16 (``Range``; fixed float32 inputs such as ``Resize``'s scales
  stay fp32 without keeping the op), custom-domain ops (no schema), nodes with subgraphs
  (``If``/``Loop``/``Scan`` bodies are left in fp32 and listed), and nodes whose types shape
  inference could not work out;
- overflow: a value beyond float16's range (65504) stays fp32, and so do its producer and its
  consumers (keeping only the op that makes a large value would not help: its output is cast
  back to fp16). Initializers and Constant values are checked always; activations when the pass
  has data (``--data``): it runs the fp32 model in ONNX Runtime on ``probe_samples`` samples and
  keeps every op whose input or output comes within ``headroom`` of 65504. It then runs the
  converted model and keeps in fp32 each op where NaN/Inf appear that fp32 did not have (e.g.
  ``Log`` of a product with a weight that underflows to 0), tracing back to the fp16 op that
  feeds it, for a few rounds. Without data only the static checks run.

Default ``keep_fp32``: none. Measured on the demo models (ONNX Runtime 1.32 CPU, whole eval
splits): keeping Softmax, LayerNormalization, ReduceMean, ReduceSum, Exp, Pow, Log or Erf in
fp32, alone or all together, changed the worst output error by < 1% (0.0203 -> 0.0202 on the
encoder), the output cosine not at all (>= 0.9999998) and the accuracy not at all. Overflow
depends on the values, not the op type, so it is handled on the data as above.
``keep_fp32=Softmax+LayerNormalization`` etc. keeps ops by type where a runtime needs it.

ONNX Runtime's CPU provider has float16 kernels for few ops; for the rest it inserts its own
Casts and then merges the Cast pairs between neighbouring ops, so the demo encoder computes
every MatMul, Add, LayerNormalization, Softmax... in fp32 and only Reshape, Transpose, Gather
and Unsqueeze run in fp16 (63 Casts in the session graph at the basic level, 25 at 'all'). So on
CPU the file is half the size and loads and runs, but is not faster, and activation overflow
that float16 arithmetic (a GPU) would hit does not show in a CPU run: that is why the probe
judges fp32 magnitudes, which do not depend on the device. The pipeline's numeric check still
counts any new NaN/Inf the CPU run does show (stored weights that underflow, for example).

Outputs move by float16 rounding: on the demo models the output cosine stays >= 0.9999, the
worst error <= 2e-3 * max|output| and top-1 accuracy is unchanged.

Initializers are range-checked and converted one at a time, each source released once read and
each new tensor handed to the pipeline's scratch data when it streams a big model (see
:mod:`onnxcomp.passes._weights`). Both go over slices of a tensor on threads
(:mod:`onnxcomp.chunks`); the cast of a float32 tensor runs in ONNX Runtime's Cast, which gives
numpy's values ~10x faster (see :func:`_to_half`). The activation probe (``--data``) runs the
whole model in ONNX Runtime, so it is for models that fit in memory.

bfloat16 is not offered: ONNX Runtime 1.32's CPU provider has no bfloat16 kernels for Add,
Mul, MatMul, Gemm, Conv, Relu, Softmax, ... and, unlike float16, does not insert Casts for
them, so a bfloat16 model does not load on CPU.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import math
from collections import Counter, defaultdict
from collections.abc import Iterable

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx_ir.passes import common as common_passes

from onnxcomp import chunks, runtime
from onnxcomp.data import Dataset, static_batch
from onnxcomp.errors import OnnxcompError, UsageError
from onnxcomp.io import read_ahead
from onnxcomp.passes._base import (
    CompressionPass,
    CompressionResult,
    PassOptions,
    name_list,
    option,
)
from onnxcomp.passes._weights import release, set_weight, stored

FP16_MAX = float(np.finfo(np.float16).max)  # 65504
FLOAT, HALF = ir.DataType.FLOAT, ir.DataType.FLOAT16
HALF_TYPE = "tensor(float16)"
PROBE_BATCH = 8
PROBE_ROUNDS = 4
_INF_BITS = 0x7F800000  # |x| bits of +inf; above: NaN
# |x| bits of 2**-25: float16 rounds 0 < |x| <= 2**-25 to zero (2**-25 is half of its
# smallest subnormal, 2**-24, and ties go to the even 0), anything larger to nonzero.
_HALF_ZERO_BITS = 0x33000000
_SESSION_MIN_SIZE = 1 << 15  # smaller tensors: numpy's cast beats an ONNX Runtime run's ~40 us
REMAINING_NONFINITE = "new NaN/Inf may remain on the probe data; see the numeric check"
# Ops whose output type comes from an attribute, which the rewrite points at float16.
_DTYPE_DEFAULT_FLOAT = {"RandomNormal", "RandomUniform"}
_ATTRIBUTE_TYPED = {"Cast", "Constant", "ConstantOfShape", "EyeLike", "RandomNormalLike",
                    "RandomUniformLike", "Bernoulli", *_DTYPE_DEFAULT_FLOAT}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Float16Options(PassOptions):
    keep_io_types: bool = option(True, "keep graph inputs and outputs float32 (Casts at the edges)")
    keep_fp32: tuple[str, ...] = option((), "op types computed in float32 (Casts around them)")
    exclude: tuple[str, ...] = option((), "node name patterns (fnmatch) computed in float32")
    headroom: float = option(
        4.0, "with data: keep an op in fp32 when a value it reads or writes reaches 65504/headroom"
    )
    probe_samples: int = option(
        64, "with data: samples the overflow and NaN/Inf probe runs on (0: no probe)"
    )

    def validate(self) -> None:
        if not self.headroom >= 1.0:
            raise UsageError(f"fp16: headroom must be >= 1, not {self.headroom}")
        if self.probe_samples < 0:
            raise UsageError(f"fp16: probe_samples must be >= 0, not {self.probe_samples}")


@dataclasses.dataclass
class _Plan:
    """Which nodes compute in float16, and which of their inputs / outputs become float16."""

    half_inputs: dict[ir.Node, set[int]]
    half_outputs: dict[ir.Node, set[int]]
    kept: dict[ir.Node, str]  # float-touching nodes left in fp32, with why


@dataclasses.dataclass(frozen=True)
class _Weight16:
    """A float32 weight read once: its largest finite magnitude and, when the plan may convert
    it, its float16 copy (kept as the graph keeps new weights) and how many nonzero values
    became 0 in it."""

    peak: float
    half: ir.TensorProtocol | None
    flushed: int


@dataclasses.dataclass
class _Stat:
    """One value on the probe data: the largest magnitude and how many entries are NaN/Inf."""

    max_abs: float
    nonfinite: int


class Float16Pass(CompressionPass):
    """Convert float32 weights and activations to float16; keep fp32 where it is needed."""

    summary = "float16 weights and activations, fp32 graph I/O and fp32 islands where needed"
    options_class = Float16Options
    lossless = False

    @property
    def _options(self) -> Float16Options:
        return self.options  # type: ignore[return-value]

    def apply(self, model: ir.Model) -> CompressionResult:
        _prepare(model)
        notes: list[str] = []
        blocked: dict[str, str] = {}
        # Each weight is read once: its range (for the plan) and its float16 copy together.
        weights = _read_weights(model.graph)
        probed = False
        if self.data is not None and self._options.probe_samples:
            probed = True
            notes.extend(self._probe(model, blocked, weights))
        elif self._options.probe_samples:
            notes.append("no data: activations were not probed for overflow (pass --data); "
                         "a CPU run does not show it (ONNX Runtime's CPU provider computes "
                         "most float16 ops in float32)")  # fmt: skip
        plan = self._plan(model, blocked, weights)
        stats = _rewrite(model, plan, weights, keep_io_types=self._options.keep_io_types)
        inserted = stats.pop("inserted")
        stats["casts_inserted"] = len(inserted)
        stats["activation_probe"] = probed
        notes.extend(_kept_notes(plan.kept))
        notes.extend(_subgraph_notes(model))
        if stats["tiny_flushed"]:
            notes.append(f"{stats['tiny_flushed']} non-zero weight values are below float16's "
                         "smallest subnormal and became 0")  # fmt: skip
        modified = bool(plan.half_outputs or stats["tensors_converted"] or inserted)
        if not modified:
            notes.append("no float32 tensors to convert")
        return CompressionResult(model, modified, stats=stats, notes=notes)

    def _plan(
        self, model: ir.Model, blocked: dict[str, str], weights: dict[str, _Weight16]
    ) -> _Plan:
        options = self._options
        keep = set(options.keep_fp32)
        opsets = dict(model.opset_imports)
        plan = _Plan({}, {}, {})
        too_big = _out_of_range_constants(model.graph, weights)
        for node in model.graph:
            if not _touches_float(node):
                continue
            if node.op_type in keep:
                reason: str | None = "in keep_fp32"
            elif any(fnmatch.fnmatchcase(node.name or "", p) for p in options.exclude):
                reason = "excluded by name"
            elif node.name in blocked:
                reason = blocked[node.name]
            elif node in too_big:
                reason = too_big[node]
            else:
                reason = _schema_reason(node, opsets)
            if reason is not None:
                plan.kept[node] = reason
                continue
            half_in, half_out = _half_slots(node, opsets)
            if half_in or half_out:
                plan.half_inputs[node], plan.half_outputs[node] = half_in, half_out
        return plan

    def _probe(
        self, model: ir.Model, blocked: dict[str, str], weights: dict[str, _Weight16]
    ) -> list[str]:
        """Fill ``blocked`` from runs on the data: values near fp16's limit in fp32, then ops
        where the converted model has NaN/Inf that fp32 had not. Returns notes."""
        options = self._options
        assert self.data is not None
        try:
            reference = _value_stats(model, self.data, options.probe_samples)
        except OnnxcompError as e:
            return [f"the overflow probe could not run the model ({e}); only static checks ran"]
        limit = FP16_MAX / options.headroom
        for name, stat in reference.items():
            if stat.max_abs > limit:
                _block_around(model.graph, name, blocked,
                              f"a value it reads or writes reaches {stat.max_abs:.3g} on the data "
                              f"(limit 65504/headroom = {limit:.3g})")  # fmt: skip
        for _ in range(PROBE_ROUNDS):
            trial = model.clone()
            plan = self._plan(trial, blocked, weights)
            inserted = _rewrite(trial, plan, weights, keep_io_types=True)["inserted"]
            kept = {node.name for node in plan.kept if node.name}
            try:
                got = _value_stats(trial, self.data, options.probe_samples)
            except OnnxcompError as e:
                return [f"the converted model did not run in the probe ({e})"]
            origins = _new_nonfinite_origins(trial, reference, got, inserted, kept)
            fresh = [name for name in origins if name not in blocked]
            if not fresh:
                return [REMAINING_NONFINITE] if origins else []
            for name in fresh:
                blocked[name] = "NaN/Inf in fp16 on the data, none in fp32"
        return [f"after {PROBE_ROUNDS} probe rounds: {REMAINING_NONFINITE}"]


def _prepare(model: ir.Model) -> None:
    """Types for every value (shape inference, which leaves what it cannot type untyped) and a
    name for every node and value."""
    common_passes.ShapeInferencePass(strict_mode=False)(model)
    common_passes.NameFixPass()(model)


def _touches_float(node: ir.Node) -> bool:
    values = [v for v in (*node.inputs, *node.outputs) if v is not None]
    if any(v.dtype == FLOAT for v in values):
        return True
    return node.op_type in _ATTRIBUTE_TYPED and _attribute_is_float(node)


def _schema(node: ir.Node, opsets: dict[str, int]) -> onnx.defs.OpSchema | None:
    domain = "" if node.domain == "ai.onnx" else node.domain
    version = opsets.get(domain, opsets.get("ai.onnx" if domain == "" else domain))
    if version is None:
        return None
    try:
        return onnx.defs.get_schema(node.op_type, version, domain)
    except onnx.defs.SchemaError:
        return None


def _formal(params: list, index: int):
    if index < len(params):
        return params[index]
    if params and params[-1].option == onnx.defs.OpSchema.FormalParameterOption.Variadic:
        return params[-1]
    return None


def _schema_reason(node: ir.Node, opsets: dict[str, int]) -> str | None:
    """Why ``node`` cannot compute in float16 as it is, or None when it can."""
    if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
           for a in node.attributes.values()):  # fmt: skip
        return "has subgraphs"
    schema = _schema(node, opsets)
    if schema is None:
        return f"no ONNX schema for {node.domain or 'ai.onnx'}::{node.op_type} (custom op)"
    allowed = {t.type_param_str: set(t.allowed_type_strs) for t in schema.type_constraints}
    input_params = {p.type_str for p in schema.inputs}
    slots = [(schema.inputs, i, v) for i, v in enumerate(node.inputs)]
    slots += [(schema.outputs, i, v) for i, v in enumerate(node.outputs)]
    for params, index, value in slots:
        if value is None or (params is schema.outputs and not value.uses()
                             and not value.is_graph_output()):  # fmt: skip
            continue
        if value.type is None:
            return "shape inference could not type its values"
        if value.dtype != FLOAT:
            continue
        if not isinstance(value.type, ir.TensorType):
            return "reads or writes a sequence or optional of float"
        param = _formal(params, index)
        if param is None:
            return "has more inputs or outputs than its schema"
        if param.type_str not in allowed:
            continue  # a fixed tensor(float) slot (e.g. Resize's scales) stays fp32
        if HALF_TYPE not in allowed[param.type_str]:
            return f"its schema does not take float16 for '{param.name}'"
        if (params is schema.outputs and param.type_str not in input_params
                and node.op_type not in _ATTRIBUTE_TYPED):  # fmt: skip
            return "its output type is set by an attribute onnxcomp does not rewrite"
    return None


def _half_slots(node: ir.Node, opsets: dict[str, int]) -> tuple[set[int], set[int]]:
    """Inputs and outputs of a convertible node that become float16."""
    schema = _schema(node, opsets)
    assert schema is not None
    allowed = {t.type_param_str: set(t.allowed_type_strs) for t in schema.type_constraints}

    def half(params: list, values: Iterable[ir.Value | None]) -> set[int]:
        chosen = set()
        for index, value in enumerate(values):
            param = _formal(params, index)
            if value is None or param is None or param.type_str not in allowed:
                continue
            if value.dtype == FLOAT or (value.dtype is None and node.op_type in _ATTRIBUTE_TYPED):
                chosen.add(index)
        return chosen

    outputs = half(schema.outputs, node.outputs)
    if node.op_type in _ATTRIBUTE_TYPED and not _attribute_is_float(node):
        outputs = set()
    return half(schema.inputs, node.inputs), outputs


def _attribute_is_float(node: ir.Node) -> bool:
    """Whether an attribute-typed node's output is float32 (what the rewrite retypes)."""
    attrs = node.attributes
    if node.op_type == "Cast":
        return attrs.get_int("to", 0) == FLOAT
    if node.op_type == "Constant":
        value = attrs.get("value")
        if value is not None:
            return value.as_tensor().dtype == FLOAT
        return "value_float" in attrs or "value_floats" in attrs
    if node.op_type == "ConstantOfShape":
        value = attrs.get("value")
        return value is None or value.as_tensor().dtype == FLOAT
    if "dtype" in attrs:
        return attrs.get_int("dtype", 0) == FLOAT
    return node.op_type in _DTYPE_DEFAULT_FLOAT or any(v.dtype == FLOAT for v in node.outputs)


def _constant_array(node: ir.Node) -> np.ndarray | None:
    attrs = node.attributes
    if node.op_type in ("Constant", "ConstantOfShape") and "value" in attrs:
        return attrs["value"].as_tensor().numpy()
    if node.op_type == "Constant" and "value_float" in attrs:
        return np.asarray(attrs.get_float("value_float"), np.float32)
    if node.op_type == "Constant" and "value_floats" in attrs:
        return np.asarray(attrs.get_floats("value_floats"), np.float32)
    return None


def _read_weights(graph: ir.Graph) -> dict[str, _Weight16]:
    """Each float32 initializer, by name, read once (the next one from disk while this one
    is cast): its peak, and the float16 copy of those :func:`_rewrite` may convert. A copy
    the plan does not use is dropped (a streamed model's scratch file then holds its bytes,
    which saving leaves out when they are more than a tenth of it)."""
    found: dict[str, _Weight16] = {}
    for value in read_ahead(graph.initializers.values(), _float_weight):
        tensor = value.const_value
        if tensor is None or tensor.dtype != FLOAT:
            continue
        if _convertible(value):
            new, flushed, peak = _to_half(tensor)
            found[value.name or ""] = _Weight16(peak, stored(graph, ir.tensor(new)), flushed)
            del new
        else:
            found[value.name or ""] = _Weight16(_max_abs(tensor.numpy()), None, 0)
        release(tensor)  # a big model's weights are read one at a time, not all kept mapped
    return found


def _convertible(value: ir.Value) -> bool:
    """A float32 initializer :func:`_rewrite` converts when all its readers compute in fp16."""
    return not (value.is_graph_input() or value.is_graph_output() or not value.uses())


def _out_of_range_constants(
    graph: ir.Graph, weights: dict[str, _Weight16]
) -> dict[ir.Node, str]:
    """Nodes that read a float32 initializer, or are a Constant, beyond float16's range."""
    found: dict[ir.Node, str] = {}
    for value in graph.initializers.values():
        weight = weights.get(value.name or "")
        if weight is not None and weight.peak > FP16_MAX:
            for use in value.uses():
                found[use.node] = (
                    f"reads '{value.name}', beyond float16's range ({weight.peak:.3g})"
                )
    for node in graph:
        array = _constant_array(node)
        if array is not None and array.dtype == np.float32 and _max_abs(array) > FP16_MAX:
            found[node] = f"its value is beyond float16's range ({_max_abs(array):.3g})"
            for use in node.outputs[0].uses():
                found[use.node] = f"reads '{node.outputs[0].name}', beyond float16's range"
    return found


def _float_weight(value: ir.Value) -> ir.TensorProtocol | None:
    """``value``'s tensor when it is float32 (what the loops over weights here read)."""
    tensor = value.const_value
    return tensor if tensor is not None and tensor.dtype == FLOAT else None


def _max_abs(array: np.ndarray) -> float:
    """Largest finite |value|, over pieces on threads: no copy of a big tensor."""
    flat = array.reshape(-1)
    return max(chunks.map_slices(functools.partial(_slice_max_abs, flat), flat.size), default=0.0)


def _slice_max_abs(flat: np.ndarray, start: int, stop: int) -> float:
    peak = 0.0
    for begin, end in chunks.pieces(start, stop):
        part = flat[begin:end]
        high, low = float(part.max()), float(part.min())  # NaN and +-inf show here
        if math.isfinite(high) and math.isfinite(low):
            peak = max(peak, high, -low)
        else:
            finite = part[np.isfinite(part)]
            if finite.size:
                peak = max(peak, float(np.abs(finite).max()))
    return peak


def _to_half(tensor: ir.TensorProtocol) -> tuple[np.ndarray, int, float]:
    """``tensor`` in float16, how many nonzero values became zero, and the largest finite
    magnitude of the source (:func:`_max_abs`), from one read of it (the source array is a
    local here, so the caller can release the tensor after).

    float32 is cast by ONNX Runtime's Cast, on threads, straight into the result (numpy's cast
    is scalar, ~10x slower); the values are numpy's ``astype(np.float16)`` bit for bit: both
    round to nearest even, and pieces holding a NaN are cast again by numpy, which keeps the
    payload bits that ONNX Runtime may not."""
    array = tensor.numpy()
    if array.dtype != np.float32 or array.size < _SESSION_MIN_SIZE:
        new = array.astype(np.float16)
        return new, int(np.count_nonzero((new == 0) & (array != 0))), _max_abs(array)
    flat = np.ascontiguousarray(array).reshape(-1)
    new = np.empty(array.shape, np.float16)
    session = _cast_session()  # made here, once: not by two threads at once
    slices = chunks.map_slices(
        functools.partial(_slice_to_half, session, flat, new.reshape(-1)), flat.size
    )
    return new, sum(f for f, _ in slices), max((peak for _, peak in slices), default=0.0)


def _slice_to_half(
    session: ort.InferenceSession, source: np.ndarray, target: np.ndarray, start: int, stop: int
) -> tuple[int, float]:
    """Cast ``source[start:stop]`` into ``target``; how many nonzero values became zero, and
    the slice's largest finite magnitude."""
    binding = session.io_binding()
    binding.bind_input("x", "cpu", 0, np.float32, [stop - start], source[start:].ctypes.data)
    binding.bind_output("y", "cpu", 0, np.float16, [stop - start], target[start:].ctypes.data)
    session.run_with_iobinding(binding)
    bits = source.view(np.uint32)
    buffer = np.empty(chunks.PIECE, np.uint32)
    flushed = 0
    peak = 0.0
    for begin, end in chunks.pieces(start, stop):
        peak = max(peak, _slice_max_abs(source, begin, end))  # the piece is in the cache
        magnitude = buffer[: end - begin]
        np.bitwise_and(bits[begin:end], 0x7FFFFFFF, out=magnitude)
        if magnitude.max() > _INF_BITS:  # a NaN
            with np.errstate(over="ignore"):  # as astype: beyond 65504 -> inf
                target[begin:end] = source[begin:end]
        magnitude -= np.uint32(1)  # 0 < |x| <= 2**-25 is now < 2**-25; zero wraps to the top
        if magnitude.min() < _HALF_ZERO_BITS:
            flushed += int(np.count_nonzero(magnitude < _HALF_ZERO_BITS))
    return flushed, peak


@functools.cache
def _cast_session() -> ort.InferenceSession:
    """A one-thread ONNX Runtime session of ``y = Cast(x, to=float16)`` over a 1-D float32
    ``x`` (one per process; sessions take concurrent runs)."""
    x = ir.Value(name="x", shape=ir.Shape(["n"]), type=ir.TensorType(FLOAT))
    node = ir.Node("", "Cast", [x], [ir.AttrInt64("to", HALF)], num_outputs=1)
    y = node.outputs[0]
    y.name, y.shape, y.type = "y", ir.Shape(["n"]), ir.TensorType(HALF)
    graph = ir.Graph([x], [y], nodes=[node], opset_imports={"": 21}, name="to_half")
    return runtime.make_session(ir.Model(graph, ir_version=10), threads=1)


def _rewrite(
    model: ir.Model, plan: _Plan, weights: dict[str, _Weight16], *, keep_io_types: bool
) -> dict:
    """Apply ``plan`` to ``model``: retype values, give weights their float16 copies from
    ``weights`` (:func:`_read_weights`), insert Casts. Stats."""
    graph = model.graph
    half: set[ir.Value] = set()
    for node, slots in plan.half_outputs.items():
        half.update(node.outputs[i] for i in slots)
    if not keep_io_types:
        half.update(v for v in graph.inputs if v.dtype == FLOAT and not v.is_initializer())
    bytes_before = bytes_after = converted = flushed = 0
    for value in graph.initializers.values():
        tensor = value.const_value
        if tensor is None or tensor.dtype != FLOAT or not _convertible(value):
            continue
        if all(use.idx in plan.half_inputs.get(use.node, ()) for use in value.uses()):
            weight = weights[value.name or ""]
            assert weight.half is not None
            flushed += weight.flushed
            set_weight(value, weight.half)  # releases the float32 source
            bytes_before += tensor.nbytes
            bytes_after += weight.half.nbytes
            converted += 1
            half.add(value)
    for node in plan.half_outputs:
        if node.op_type in _ATTRIBUTE_TYPED and plan.half_outputs[node]:
            before, after = _retype_attributes(node)
            bytes_before, bytes_after = bytes_before + before, bytes_after + after
            converted += 1 if before else 0

    casts: dict[tuple[ir.Value, ir.DataType], ir.Value] = {}
    inserted: dict[str, str] = {}

    def cast(value: ir.Value, to: ir.DataType) -> ir.Value:
        if (value, to) not in casts:
            suffix = "fp16" if to == HALF else "fp32"
            node = ir.Node("", "Cast", [value], [ir.AttrInt64("to", to)],
                           name=f"{value.name}.to_{suffix}", num_outputs=1)  # fmt: skip
            out = node.outputs[0]
            out.name, out.shape, out.type = f"{value.name}.{suffix}", value.shape, ir.TensorType(to)
            graph.append(node)
            inserted[node.name] = value.name or ""
            casts[value, to] = out
        return casts[value, to]

    float_values = [v for v in (*graph.inputs, *graph.initializers.values()) if v.dtype == FLOAT]
    float_values += [v for n in list(graph) for v in n.outputs if v.dtype == FLOAT]
    for value in float_values:
        for use in value.uses():
            wants_half = use.idx in plan.half_inputs.get(use.node, ())
            if wants_half != (value in half):
                use.node.replace_input_with(use.idx, cast(value, HALF if wants_half else FLOAT))
    for value in half:
        value.type = ir.TensorType(HALF)
    if keep_io_types:
        renamed: set[ir.Value] = set()  # a value may be listed twice as an output
        for index, value in enumerate(list(graph.outputs)):
            if value in half:
                fp32 = cast(value, FLOAT)
                if value not in renamed:
                    value.name, fp32.name = f"{value.name}.fp16", value.name
                    renamed.add(value)
                graph.outputs[index] = fp32
    if plan.half_outputs or inserted:
        common_passes.TopologicalSortPass()(model)
    kept_ops = Counter(node.op_type for node in plan.kept)
    return {
        "nodes_fp16": sum(1 for slots in plan.half_outputs.values() if slots),
        "nodes_kept_fp32": len(plan.kept),
        "ops_kept_fp32": dict(sorted(kept_ops.items())),
        "tensors_converted": converted,
        "tensor_bytes_before": bytes_before,
        "tensor_bytes_after": bytes_after,
        "tiny_flushed": flushed,
        "inserted": inserted,
    }


def _retype_attributes(node: ir.Node) -> tuple[int, int]:
    """Point an attribute-typed node's float32 output at float16; bytes of a converted value."""
    attrs = node.attributes
    if node.op_type == "Cast":
        attrs["to"] = ir.AttrInt64("to", HALF)
        return 0, 0
    if node.op_type in ("Constant", "ConstantOfShape"):
        array = _constant_array(node)
        if array is None:  # ConstantOfShape's default value is float32 zero
            array = np.zeros(1, np.float32)
        for key in ("value", "value_float", "value_floats"):
            attrs.pop(key, None)
        new = array.astype(np.float16)
        attrs["value"] = ir.AttrTensor("value", ir.tensor(new))
        return (array.nbytes, new.nbytes) if node.op_type == "Constant" else (0, 0)
    attrs["dtype"] = ir.AttrInt64("dtype", HALF)
    return 0, 0


def _block_around(graph: ir.Graph, name: str, blocked: dict[str, str], reason: str) -> None:
    """Keep the producer and the consumers of value ``name`` in fp32."""
    value = _find_value(graph, name)
    if value is None:
        return
    nodes = [use.node for use in value.uses()]
    if value.producer() is not None:
        nodes.append(value.producer())
    for node in nodes:
        if node.graph is graph and node.name:
            blocked.setdefault(node.name, reason)


def _find_value(graph: ir.Graph, name: str) -> ir.Value | None:
    for value in graph.inputs:
        if value.name == name:
            return value
    for node in graph:
        for value in node.outputs:
            if value.name == name:
                return value
    return None


def _probe_values(model: ir.Model) -> list[ir.Value]:
    """Float activations of the main graph (graph inputs and node outputs) with a known type."""
    values = [v for v in model.graph.inputs if not v.is_initializer()]
    values += [v for node in model.graph for v in node.outputs]
    return [v for v in values if v.name and isinstance(v.type, ir.TensorType)
            and v.dtype in (FLOAT, HALF) and v.const_value is None]  # fmt: skip


def _value_stats(model: ir.Model, data: Dataset, samples: int) -> dict[str, _Stat]:
    """Largest magnitude and NaN/Inf count of every float activation over ``samples`` of data."""
    probe = model.clone()
    wanted = [v for v in _probe_values(probe) if not v.is_graph_output()]
    names = [v.name for v in probe.graph.outputs] + [v.name for v in wanted]
    probe.graph.outputs.extend(wanted)
    session = runtime.make_session(probe, level="basic")
    stats: dict[str, _Stat] = {}
    floats = {v.name for v in _probe_values(probe)}
    for feeds in data.batches(_probe_batch(model), samples):
        for name, array in zip(names, runtime.run_batches(session, [feeds])[0], strict=True):
            if name not in floats or name is None:
                continue
            array = np.asarray(array, np.float32)
            stat = stats.setdefault(name, _Stat(0.0, 0))
            stat.max_abs = max(stat.max_abs, _max_abs(array))
            stat.nonfinite += int(array.size - np.count_nonzero(np.isfinite(array)))
    return stats


def _probe_batch(model: ir.Model) -> int:
    return static_batch(model) or PROBE_BATCH


def _new_nonfinite_origins(
    trial: ir.Model,
    reference: dict[str, _Stat],
    got: dict[str, _Stat],
    inserted: dict[str, str],
    kept: set[str],
) -> list[str]:
    """Names of the nodes to keep fp32 next: those whose outputs have more NaN/Inf than in fp32
    while their inputs have no more (where NaN/Inf start, not where they spread). Where such a
    node is fp32 already, the fp16 ops feeding it lost what it needed: they are named instead.
    """

    def extra(value: ir.Value | None) -> bool:
        if value is None or value.name not in got:
            return False
        base = reference.get(_source(value).name or "")
        return got[value.name].nonfinite > (base.nonfinite if base else 0)

    def _source(value: ir.Value) -> ir.Value:
        producer = value.producer()
        if producer is not None and producer.name in inserted:
            return producer.inputs[0]
        return value

    origins = []
    for node in trial.graph:
        if not any(extra(v) for v in node.outputs) or any(extra(v) for v in node.inputs):
            continue
        if node.name in inserted:  # a Cast onnxcomp inserted overflowed: its readers stay fp32
            origins.extend(use.node.name for v in node.outputs for use in v.uses()
                           if use.node.name)  # fmt: skip
        elif node.name in kept:
            feeding = (_source(v).producer() for v in node.inputs if v is not None)
            origins.extend(p.name for p in feeding if p is not None and p.name not in kept)
        elif node.name:
            origins.append(node.name)
    return [name for name in origins if name]


def _kept_notes(kept: dict[ir.Node, str]) -> list[str]:
    by_reason: dict[str, list[str]] = defaultdict(list)
    for node, reason in kept.items():
        by_reason[reason].append(f"{node.name} ({node.op_type})")
    return [f"kept {len(names)} ops in fp32 ({reason}): {name_list(names)}"
            for reason, names in by_reason.items()]  # fmt: skip


def _subgraph_notes(model: ir.Model) -> list[str]:
    count = sum(1 for node in model.graph for a in node.attributes.values()
                if a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS))  # fmt: skip
    if not count:
        return []
    return [f"{count} subgraph attributes (If/Loop/Scan bodies) were left in fp32"]
