"""Finding the weights a pass may rewrite, and rewiring their consumers: shared by all passes.

A *weight* is a constant float initializer consumed as the weight input of a Conv,
ConvTranspose, Gemm, MatMul or Gather (embedding table), or, when a pass asks for ``Slice``,
a float table of rank >= 2 read through Slice (a position table ``pos_emb[:seq]``). One
:class:`Weight` is returned per tensor, with every consumer, so a tensor shared by two nodes
(tied embeddings, a reused projection) is rewritten once and both consumers are rewired.
Anything that looks like a weight but is not returned comes back as a :class:`Skipped` with
the reason, so passes can report it instead of skipping it silently. Run ``simplify`` (or
lift Constant nodes) first for weights held in Constant nodes; :func:`lift_constant_weights`
does that.

Big models stream: passes rewrite one weight at a time, :func:`release` the source once read
(a weight in external data is memory-mapped; unmapped, its pages leave the process) and hand
each new tensor to :func:`add_initializer` or :func:`set_weight`, which write it to the
pipeline's scratch data (:class:`onnxcomp.io.ScratchData`) when it streams the model, so new
weights do not pile up in memory either.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Collection, Sequence

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common as common_passes

from onnxcomp import chunks
from onnxcomp.io import SCRATCH_KEY, release
from onnxcomp.passes._base import name_list

# op type -> input indices that carry weights
WEIGHT_INPUTS: dict[str, tuple[int, ...]] = {
    "Conv": (1,),
    "ConvTranspose": (1,),
    "Gemm": (1,),
    "MatMul": (1,),
    "Gather": (0,),
    "Slice": (0,),
}
# What find_weights looks at unless told otherwise: Slice tables only on request (the
# quantisation passes), so pruning and low-rank passes never see them.
DEFAULT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Gather")


@dataclasses.dataclass(frozen=True)
class WeightUse:
    """One consumer of a weight: the node, the input slot, and the weight's output-channel axis
    as that node sees it (None when it has none, e.g. a 1-D MatMul weight)."""

    node: ir.Node
    index: int
    channel_axis: int | None


@dataclasses.dataclass
class Weight:
    """A constant float tensor and every node that reads it as a weight."""

    value: ir.Value
    uses: list[WeightUse]

    @property
    def name(self) -> str:
        return self.value.name or ""

    @property
    def array(self) -> np.ndarray:
        return self.value.const_value.numpy()

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.value.const_value.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1

    @property
    def nbytes(self) -> int:
        return self.value.const_value.nbytes

    @property
    def op_types(self) -> set[str]:
        return {use.node.op_type for use in self.uses}

    @property
    def channel_axis(self) -> int | None:
        """The output-channel axis all consumers agree on, or None if they do not."""
        axes = {use.channel_axis for use in self.uses}
        return axes.pop() if len(axes) == 1 else None

    def replace(self, new_value: ir.Value) -> None:
        """Make every consumer read ``new_value`` instead of this weight."""
        for use in self.uses:
            use.node.replace_input_with(use.index, new_value)


@dataclasses.dataclass(frozen=True)
class Skipped:
    """A weight-like tensor a pass was not given, and why."""

    name: str
    reason: str

    def __str__(self) -> str:
        return f"skipped {self.name}: {self.reason}"


def find_weights(
    model: ir.Model,
    op_types: Collection[str] = DEFAULT_OPS,
    *,
    exclude: Sequence[str] = (),
    min_size: int = 0,
) -> tuple[list[Weight], list[Skipped]]:
    """Weights of ``op_types`` consumers in the main graph, and what was skipped and why.

    ``exclude`` holds fnmatch patterns matched against node names and weight names.
    Weights inside If/Loop/Scan bodies are reported as skipped.
    """
    unknown = set(op_types) - set(WEIGHT_INPUTS)
    if unknown:
        raise ValueError(f"no weight inputs known for {sorted(unknown)}")
    found: dict[ir.Value, list[WeightUse]] = {}
    quantized: dict[ir.Value, None] = {}
    skipped: list[Skipped] = []
    for node in model.graph:
        for index in WEIGHT_INPUTS.get(node.op_type, ()):
            if node.op_type not in op_types or index >= len(node.inputs):
                continue
            value = node.inputs[index]
            if value is not None and _dequantized_constant(value):
                quantized[value] = None
                continue
            if value is None or value.const_value is None or not value.is_initializer():
                continue  # an activation, not a weight
            if node.op_type == "Slice" and not _is_table(value.const_value):
                continue  # shapes, index lists: not weight-like
            found.setdefault(value, []).append(
                WeightUse(node, index, _channel_axis(node, value.const_value))
            )
    weights = []
    for value, uses in found.items():
        reason = _skip_reason(value, uses, exclude, min_size)
        if reason:
            skipped.append(Skipped(value.name or "?", reason))
        else:
            weights.append(Weight(value, uses))
    already = "already quantised (read through DequantizeLinear); compress before quantising"
    skipped.extend(Skipped(value.name or "?", already) for value in quantized)
    skipped.extend(_subgraph_weights(model, op_types))
    return weights, skipped


def _dequantized_constant(value: ir.Value) -> bool:
    """Whether ``value`` is a DequantizeLinear of a constant: a weight quantised already."""
    producer = value.producer()
    return (
        producer is not None
        and producer.op_type == "DequantizeLinear"
        and producer.inputs[0] is not None
        and producer.inputs[0].const_value is not None
    )


def lift_constant_weights(model: ir.Model) -> int:
    """Turn tensors held in Constant nodes of the main graph into initializers, and fold
    reshaped, transposed or unsqueezed float initializers into initializers of their own (see
    :func:`fold_weight_views`), so :func:`find_weights` sees them as weights; returns how
    many tensors were lifted or folded."""
    lifted = 0
    before = sum(1 for n in model.graph if n.op_type == "Constant")
    if before:
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(
            model
        )
        lifted = before - sum(1 for n in model.graph if n.op_type == "Constant")
    return lifted + fold_weight_views(model)


def lifted_note(count: int) -> list[str]:
    """The report note for :func:`lift_constant_weights` having lifted ``count`` tensors."""
    if not count:
        return []
    return [f"lifted {count} Constant nodes or reshaped/transposed weights to initializers "
            "(weights may sit there)"]  # fmt: skip


# Ops that only rearrange their input: applied to a weight, the result is a weight.
VIEW_OPS = ("Reshape", "Unsqueeze", "Squeeze", "Transpose", "Flatten")


def fold_weight_views(model: ir.Model) -> int:
    """Replace each view op (:data:`VIEW_OPS`) of a float initializer in the main graph, with
    constant parameters, by an initializer holding the result; returns how many.

    Caffe2-era zoo models reshape a classifier weight before its Gemm and Unsqueeze per-channel
    scales before a Mul; onnxscript's folding leaves such nodes alone above its size limit,
    and a pass looking for initializers would not find the weight behind them."""
    folded = 0
    for node in list(model.graph):
        if node.op_type not in VIEW_OPS or node.domain not in ("", "ai.onnx"):
            continue
        source, out = node.inputs[0], node.outputs[0]
        if (source is None or source.const_value is None or not source.is_initializer()
                or source.is_graph_input() or out.is_graph_output()
                or not source.const_value.dtype.is_floating_point()
                or any(v is not None and v.const_value is None for v in node.inputs[1:])):
            continue  # fmt: skip
        array = _view(node, source.const_value.numpy())
        if array is None:
            continue
        tensor = ir.Tensor(np.ascontiguousarray(array), dtype=source.const_value.dtype)
        value = add_initializer(model.graph, f"{source.name}_{node.op_type.lower()}", tensor)
        ir.convenience.replace_all_uses_with(out, value)
        model.graph.remove(node, safe=True)
        folded += 1
    return folded


def _view(node: ir.Node, array: np.ndarray) -> np.ndarray | None:
    """``node`` applied to ``array`` (None when its parameters are not understood)."""
    params = [v.const_value.numpy() if v is not None else None for v in node.inputs[1:]]
    op = node.op_type
    try:
        if op == "Reshape":
            shape = [int(d) for d in params[0]]
            if not node.attributes.get_int("allowzero", 0):
                shape = [array.shape[i] if d == 0 else d for i, d in enumerate(shape)]
            return array.reshape(shape)
        if op == "Transpose":
            perm = node.attributes.get_ints("perm", None)
            return np.transpose(array, perm)
        if op == "Flatten":
            axis = node.attributes.get_int("axis", 1) % (array.ndim + 1) if array.ndim else 0
            return array.reshape(int(np.prod(array.shape[:axis])), -1)
        axes_input = params[0] if params and params[0] is not None else None
        axes = [int(a) for a in axes_input] if axes_input is not None else (
            node.attributes.get_ints("axes", None))  # fmt: skip
        if op == "Unsqueeze":
            rank = array.ndim + len(axes)
            for axis in sorted(a % rank for a in axes):
                array = np.expand_dims(array, axis)
            return array
        if op == "Squeeze":
            if axes is None:
                return np.squeeze(array)
            return np.squeeze(array, axis=tuple(a % array.ndim for a in axes))
    except (ValueError, TypeError, IndexError):
        return None
    return None


# New tensors smaller than this stay in memory even when the model streams (scales, biases).
SCRATCH_MIN_BYTES = 1 << 20


def weight_tensor(weight: Weight) -> ir.TensorProtocol | None:
    """``weight``'s tensor as the graph holds it (what :func:`onnxcomp.io.read_ahead` reads)."""
    return weight.value.const_value


def all_finite(array: np.ndarray) -> bool:
    """Whether ``array`` holds no NaN or inf: min and max propagate NaN and meet any inf, so
    two reductions per cache-sized piece (:mod:`onnxcomp.chunks`) decide it without a boolean
    copy, reading the weight from memory once, on a thread per core."""
    flat = np.asarray(array).reshape(-1)
    if flat.dtype.kind != "f":
        return True

    def finite(start: int, stop: int) -> bool:
        for begin, end in chunks.pieces(start, stop):
            piece = flat[begin:end]
            if not (np.isfinite(piece.min()) and np.isfinite(piece.max())):
                return False
        return True

    return all(chunks.map_slices(finite, flat.size))


def stored(graph: ir.Graph | None, tensor: ir.TensorProtocol) -> ir.TensorProtocol:
    """``tensor`` as ``graph`` keeps it: written to the pipeline's scratch data (and read back
    memory-mapped) when the pipeline streams a big model and the tensor is not small."""
    scratch = graph.meta.get(SCRATCH_KEY) if graph is not None else None
    if scratch is None or tensor.nbytes < SCRATCH_MIN_BYTES or scratch.holds(tensor):
        return tensor
    return scratch.store(tensor)


def set_weight(value: ir.Value, tensor: ir.TensorProtocol) -> None:
    """Give initializer ``value`` the new tensor ``tensor`` (:func:`stored`) and release the
    one it had: never a write into the old one, a read-only view of the file."""
    old = value.const_value
    tensor.name = value.name
    value.const_value = stored(value.graph, tensor)
    release(old)


def add_initializer(graph: ir.Graph, name: str, tensor: ir.TensorProtocol) -> ir.Value:
    """Register ``tensor`` as an initializer of ``graph`` under ``name`` (made unique); a big
    model's pipeline keeps it in its scratch data (:func:`stored`)."""
    name = _unique_name(graph, name)
    tensor.name = name
    tensor = stored(graph, tensor)
    value = ir.Value(
        name=name,
        shape=ir.Shape(tensor.shape),
        type=ir.TensorType(tensor.dtype),
        const_value=tensor,
    )
    graph.register_initializer(value)
    return value


def _unique_name(graph: ir.Graph, name: str) -> str:
    taken = graph.initializers
    candidate, index = name, 1
    while candidate in taken:
        candidate, index = f"{name}_{index}", index + 1
    return candidate


def describe_skips(skipped: Sequence[Skipped], kept: str = "as they were") -> list[str]:
    """One report note per reason: ``3 weights left as they were (reason): a, b, c``."""
    by_reason: dict[str, list[str]] = {}
    for skip in skipped:
        by_reason.setdefault(skip.reason, []).append(skip.name)
    return [
        f"{len(names)} weights left {kept} ({reason}): {name_list(names)}"
        for reason, names in by_reason.items()
    ]


def matches(patterns: Sequence[str], *names: str | None) -> bool:
    """Whether any name matches any fnmatch pattern."""
    return any(name and fnmatch.fnmatchcase(name, p) for p in patterns for name in names)


def _channel_axis(node: ir.Node, tensor: ir.TensorProtocol) -> int | None:
    rank = len(tensor.shape)
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1 if rank > 1 else None
    if node.op_type == "Gemm":
        return 0 if node.attributes.get_int("transB", 0) else 1
    if node.op_type == "MatMul":
        return rank - 1 if rank >= 2 else None
    if node.op_type == "Gather":
        return 0 if node.attributes.get_int("axis", 0) == 0 and rank == 2 else None
    if node.op_type == "Slice":
        # DequantizeLinear runs before the Slice, so any axis is valid; rows (positions) of
        # the table, like an embedding's, each get their own scale.
        return rank - 2
    return None


def _is_table(tensor: ir.TensorProtocol) -> bool:
    """A float tensor of rank >= 2: what a Slice reads as a weight table."""
    return tensor.dtype.is_floating_point() and len(tensor.shape) >= 2


def _skip_reason(
    value: ir.Value, uses: list[WeightUse], exclude: Sequence[str], min_size: int
) -> str | None:
    tensor = value.const_value
    if not tensor.dtype.is_floating_point():
        return f"{tensor.dtype.name.lower()} tensor, not floating point"
    if value.is_graph_input():
        return "also a graph input, so a caller may override it"
    if exclude and matches(exclude, value.name, *(u.node.name for u in uses)):
        return "excluded by pattern"
    size = int(np.prod(tensor.shape)) if tensor.shape else 1
    if size < min_size:
        return f"{size} elements, below min_size {min_size}"
    other = [n for n, _ in value.uses() if all(n is not u.node for u in uses)]
    if other:
        ops = ", ".join(sorted({n.op_type for n in other}))
        return f"also read by non-weight inputs ({ops})"
    return None


def _subgraph_weights(model: ir.Model, op_types: Collection[str]) -> list[Skipped]:
    skipped = []
    for graph in model.graphs():
        if graph is model.graph:
            continue
        for node in graph:
            for index in WEIGHT_INPUTS.get(node.op_type, ()):
                if node.op_type in op_types and index < len(node.inputs):
                    value = node.inputs[index]
                    if value is None or value.const_value is None:
                        continue
                    if node.op_type != "Slice" or _is_table(value.const_value):
                        skipped.append(Skipped(value.name or "?", "inside an If/Loop/Scan body"))
    return skipped
