"""BatchNormalization surgery shared by passes: folding into the linear op before it, and the
compact per-channel form of the ones that cannot fold.

:func:`fold_batchnorms` is what ``fold-bn`` does and what the weight quantisation pass runs
first: ``BN(Conv(x))``, ``BN(ConvTranspose(x))`` and ``BN(Gemm(x))`` use onnxscript's fusion
rules; ``BN(MatMul(x, W))`` and ``BN(MatMul(x, W) + b)`` for rank-2 activations are added here.
Folding is exact up to fp32 rounding; :func:`fold_channel_affines` does the same for a Mul / Add
by a per-channel constant right after a Conv (what is left of a Caffe BatchNorm + Scale pair).
:func:`batchnorms_to_affine` rewrites the BatchNorms left (after a Concat, a graph input, a
pooling: nothing to fold into) as ``x * s + b``: two per-channel vectors instead of four,
stored in float16 (relative error <= 2**-11 per entry) when they fit its range, read through a
Cast.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common as common_passes

from onnxcomp.passes._opset import onnx_opset, upgrade_opset
from onnxcomp.passes._weights import add_initializer, lift_constant_weights

BN_EPSILON_DEFAULT = 1e-5
# BatchNormalization-9 dropped the `spatial` attribute whose `0` value changes the math.
BN_MIN_OPSET = 9
FLOAT16_MAX = float(np.finfo(np.float16).max)


def batchnorms(model: ir.Model) -> list[ir.Node]:
    """Every BatchNormalization node, subgraphs included."""
    return [n for g in model.graphs() for n in g if n.op_type == "BatchNormalization"]


def fold_batchnorms(model: ir.Model) -> tuple[int, list[str]]:
    """Fold every BatchNormalization that follows a Conv / ConvTranspose / Gemm / MatMul(+Add)
    into that op's weights, in place; returns how many folded and the notes of an opset
    upgrade (:func:`why_kept` says why a BatchNormalization left was not folded)."""
    notes: list[str] = []
    if not batchnorms(model):
        return 0, notes
    # onnxscript (~0.15 s to import) only when there is something to fold: every weight
    # quantisation pass comes through here.
    import onnxscript.optimizer

    from onnxcomp.passes._batchnorm_rules import FOLD_RULES
    from onnxcomp.passes.simplify import folding_hazard

    if onnx_opset(model) < BN_MIN_OPSET:
        notes += upgrade_opset(model, BN_MIN_OPSET, why="folding BatchNormalization")
    # The fusion rules need constant initializers: exporters hold weights in Constant nodes,
    # or build a bias-less Conv's zero bias from Shape/Expand; fold those first (unless
    # folding is known to break this model, see simplify.folding_hazard).
    if folding_hazard(model) is None:
        onnxscript.optimizer.fold_constants(model)
    lift_constant_weights(model)
    names = _linear_names(model.graph)
    folded = FOLD_RULES.apply_to_model(model)
    common_passes.RemoveUnusedNodesPass()(model)
    _restore_names(model.graph, names)
    return folded, notes


_Names = list[tuple[str, str | None, dict[int, str]]]  # op type, node name, weight names


def _linear_names(graph: ir.Graph) -> dict[str, _Names]:
    """For each BatchNormalization's output: the names of the linear ops before it (MatMul+Add:
    both) and of their weights, which the rewrite rules do not keep (exclude patterns and
    reports refer to them)."""
    found: dict[str, _Names] = {}
    for bn in graph:
        if bn.op_type != "BatchNormalization" or bn.inputs[0] is None:
            continue
        chain: _Names = []
        node = bn.inputs[0].producer()
        while node is not None and node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul",
                                                     "Add") and len(chain) < 2:  # fmt: skip
            weights = {i: v.name for i, v in enumerate(node.inputs)
                       if i and v is not None and v.name and v.is_initializer()}  # fmt: skip
            chain.append((node.op_type, node.name, weights))
            if node.op_type != "Add" or node.inputs[0] is None:
                break
            node = node.inputs[0].producer()
        if chain and bn.outputs[0].name:
            found[bn.outputs[0].name] = chain
    return found


def _restore_names(graph: ir.Graph, names: dict[str, _Names]) -> None:
    """Give the folded linear ops (and their rewritten weights) their old names back."""
    if not names:
        return
    taken = {v.name for node in graph for v in node.outputs} | set(graph.initializers)
    for node in list(graph):
        chain = names.get(node.outputs[0].name or "") if node.outputs else None
        current: ir.Node | None = node
        for op_type, name, weights in chain or []:
            if current is None or current.op_type != op_type:
                break
            if name:
                current.name = name
            for index, old in weights.items():
                value = current.inputs[index] if index < len(current.inputs) else None
                if value is not None and value.name != old and old not in taken and \
                        value.is_initializer():  # fmt: skip
                    taken.discard(value.name)
                    value.name = old
                    taken.add(old)
            first = current.inputs[0]
            current = first.producer() if first is not None else None


def why_kept(node: ir.Node) -> str:
    """Why the fusion rules left this BatchNormalization."""
    if len([o for o in node.outputs if o.uses() or o.is_graph_output()]) > 1:
        return "training-mode outputs (running mean/var) are used"
    if any(v is None or v.const_value is None for v in node.inputs[1:5]):
        return "scale/bias/mean/var are not constants"
    if any(v.is_graph_input() for v in node.inputs[1:5]):
        return "scale/bias/mean/var are graph inputs, which a caller may override"
    producer = node.inputs[0].producer() if node.inputs[0] is not None else None
    if producer is None:
        return "its input is a graph input, not a linear op"
    if producer.op_type not in {"Conv", "ConvTranspose", "Gemm", "MatMul", "Add"}:
        return f"it follows {producer.op_type}, which has no weights to fold into"
    if len(producer.outputs[0].uses()) > 1:
        return f"the {producer.op_type} output is also used elsewhere"
    weights = [v for v in producer.inputs[1:] if v is not None]
    if any(v.const_value is None for v in weights):
        return f"the {producer.op_type} weights are not constant"
    if any(v.is_graph_input() for v in weights):
        return f"the {producer.op_type} weights are graph inputs, which a caller may override"
    if any(len(v.uses()) > 1 for v in weights):
        return f"the {producer.op_type} weights are shared with another node"
    if producer.op_type in {"MatMul", "Add"}:
        return "the activation is not rank 2, so BN's channel axis is not MatMul's output axis"
    return f"the {producer.op_type} node does not match a folding rule"


def bn_scale_shift(bn_node: ir.Node) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (scale, shift) so that BN(y) = y * scale + shift (float64)."""
    gamma, beta, mean, var = (v.const_value.numpy().astype(np.float64) for v in bn_node.inputs[1:5])
    eps = bn_node.attributes.get_float("epsilon", BN_EPSILON_DEFAULT)
    scale = gamma / np.sqrt(var + eps)
    return scale, beta - mean * scale


def affine_reason(node: ir.Node) -> str | None:
    """Why ``node`` (a BatchNormalization) cannot become ``x * s + b``; None when it can."""
    if len([o for o in node.outputs if o.uses() or o.is_graph_output()]) > 1:
        return "training-mode outputs (running mean/var) are used"
    params = node.inputs[1:5]
    if len(params) < 4 or any(v is None or v.const_value is None for v in params):
        return "scale/bias/mean/var are not constants"
    if any(v.is_graph_input() for v in params):  # type: ignore[union-attr]
        return "scale/bias/mean/var are graph inputs, which a caller may override"
    sizes = {tuple(v.const_value.shape) for v in params}  # type: ignore[union-attr]
    if len(sizes) != 1 or len(next(iter(sizes))) != 1:
        return "scale/bias/mean/var are not vectors of one size"
    x = node.inputs[0]
    if x is None or x.shape is None or len(x.shape) < 2:
        return "the rank of its input is not known"
    if isinstance(x.shape[1], int) and (x.shape[1],) not in sizes:
        return "its input's channels differ from its parameters'"
    if x.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE):
        return "its input is not float"
    if node.attributes.get_int("training_mode", 0):
        return "training mode"
    return None


def batchnorms_to_affine(graph: ir.Graph, nodes: list[ir.Node]) -> tuple[int, int]:
    """Replace each BatchNormalization in ``nodes`` (each passed :func:`affine_reason`), with
    the Mul / Add by per-channel constants right after it (a Caffe ``Scale`` layer), by
    ``Add(Mul(x, s), b)`` with ``s``, ``b`` shaped ``[C, 1, ...]`` to broadcast over axis 1.

    The vectors are float16 (read through a Cast to the input's dtype) when every entry fits
    float16's range, else the input's dtype. Returns (BatchNorms rewritten, bytes of the new
    vectors)."""
    nbytes = 0
    taken = {v.name for n in graph for v in n.outputs} | {v.name for v in graph.inputs}

    def fresh(name: str) -> str:
        candidate, k = name, 0
        while candidate in taken:
            k += 1
            candidate = f"{name}_{k}"
        taken.add(candidate)
        return candidate

    for node in nodes:
        x = node.inputs[0]
        assert x is not None and x.shape is not None and x.dtype is not None
        rank = len(x.shape)
        scale, shift = bn_scale_shift(node)
        chain = [node]
        while (step := _next_affine(chain[-1].outputs[0], rank, len(scale))) is not None:
            after, op_type, vector = step
            if op_type == "Mul":
                scale, shift = scale * vector, shift * vector
            else:
                shift = shift + vector
            chain.append(after)
        dtype = x.dtype.numpy()
        shape = (-1,) + (1,) * (rank - 2)
        half = all(np.abs(v).max(initial=0.0) <= FLOAT16_MAX for v in (scale, shift))
        stored = np.float16 if half else dtype
        name = node.name or (node.outputs[0].name or "batchnorm")
        new_nodes: list[ir.Node] = []
        operands = []
        for label, vector in (("scale", scale), ("shift", shift)):
            tensor = ir.tensor(vector.astype(stored).reshape(shape))
            value = add_initializer(graph, f"{name}_{label}", tensor)
            nbytes += tensor.nbytes
            if stored != dtype:
                cast = ir.node("Cast", [value], {"to": x.dtype}, name=f"{name}_{label}_cast")
                cast.outputs[0].name = fresh(f"{value.name}_cast")
                cast.outputs[0].dtype = x.dtype
                cast.outputs[0].shape = ir.Shape(tensor.shape)
                new_nodes.append(cast)
                value = cast.outputs[0]
            operands.append(value)
        mul = ir.node("Mul", [x, operands[0]], name=f"{name}_mul")
        add = ir.node("Add", [mul.outputs[0], operands[1]], name=f"{name}_add")
        mul.outputs[0].name = fresh(f"{name}_scaled")
        out = chain[-1].outputs[0]
        for value in (mul.outputs[0], add.outputs[0]):
            value.dtype, value.shape = x.dtype, out.shape or x.shape
        graph.insert_before(node, [*new_nodes, mul, add])
        out.replace_all_uses_with(add.outputs[0], replace_graph_outputs=True)
        for old in reversed(chain):
            graph.remove(old, safe=True)
        add.outputs[0].name = out.name
    return len(nodes), nbytes


def fold_channel_affines(graph: ir.Graph) -> int:
    """Fold each Mul / Add by a per-channel constant that is the only reader of a Conv's output
    into that Conv's weights and bias (exact up to fp32 rounding); returns how many folded.

    Caffe exports BatchNorm as BatchNormalization without scale followed by a ``Scale`` layer
    (Mul, Add): once the BatchNormalization is folded, these are left after the Conv."""
    folded = 0
    for node in list(graph):
        if node.op_type not in ("Mul", "Add") or node.graph is not graph:
            continue
        conv = _foldable_conv(node)
        if conv is None:
            continue
        weight, bias = conv.inputs[1], conv.inputs[2] if len(conv.inputs) > 2 else None
        assert weight is not None and weight.const_value is not None
        w = weight.const_value.numpy()
        b = np.zeros(w.shape[0]) if bias is None else bias.const_value.numpy()  # type: ignore[union-attr]
        vector = _channel_operand(node, conv.outputs[0], len(w.shape), w.shape[0])
        assert vector is not None
        if node.op_type == "Mul":
            view = vector.reshape((-1,) + (1,) * (w.ndim - 1))
            weight.const_value = ir.tensor((w * view).astype(w.dtype), name=weight.name)
            b = b * vector
        else:
            b = b + vector
        new_bias = ir.tensor(np.asarray(b).astype(w.dtype))
        if bias is None:
            bias = add_initializer(graph, f"{weight.name}_bias", new_bias)
            conv.resize_inputs(3)
            conv.replace_input_with(2, bias)
        else:
            bias.const_value = ir.tensor(new_bias.numpy(), name=bias.name)
        out, conv_out = node.outputs[0], conv.outputs[0]
        out.replace_all_uses_with(conv_out, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        if conv_out.is_graph_output():
            conv_out.name = out.name
        folded += 1
    return folded


def _foldable_conv(node: ir.Node) -> ir.Node | None:
    """The Conv whose output ``node`` (Mul or Add) alone reads, when its weights may change."""
    for value in node.inputs:
        conv = value.producer() if value is not None else None
        if conv is None or conv.op_type != "Conv" or conv.domain not in ("", "ai.onnx"):
            continue
        out = conv.outputs[0]
        if len(out.uses()) != 1 or out.is_graph_output():
            return None
        params = [v for v in conv.inputs[1:3] if v is not None]
        if any(v.const_value is None or not v.is_initializer() or v.is_graph_input()
               or len(v.uses()) != 1 for v in params):  # fmt: skip
            return None
        weight = params[0].const_value
        if len(weight.shape) < 3 or (len(params) > 1 and tuple(params[1].const_value.shape) !=
                                     (weight.shape[0],)):  # fmt: skip
            return None
        if _channel_operand(node, out, len(weight.shape), weight.shape[0]) is None:
            return None
        return conv
    return None


def _next_affine(
    value: ir.Value, rank: int, channels: int
) -> tuple[ir.Node, str, np.ndarray] | None:
    """The Mul / Add by a per-channel constant that alone reads ``value``, with its vector."""
    uses = value.uses()
    if len(uses) != 1 or value.is_graph_output():
        return None
    node = uses[0][0]
    if node.op_type not in ("Mul", "Add") or node.domain not in ("", "ai.onnx"):
        return None
    vector = _channel_operand(node, value, rank, channels)
    return None if vector is None else (node, node.op_type, vector)


def _channel_operand(node: ir.Node, x: ir.Value, rank: int, channels: int) -> np.ndarray | None:
    """The other operand of the binary ``node`` as a float64 vector over ``x``'s axis 1, when it
    is a constant float initializer that broadcasts along every other axis and not beyond
    ``x``'s rank (a scalar counts); None otherwise."""
    if len(node.inputs) != 2 or [v is x for v in node.inputs].count(True) != 1:
        return None
    other = node.inputs[1] if node.inputs[0] is x else node.inputs[0]
    if other is None or other.const_value is None or not other.is_initializer() or \
            other.is_graph_input() or not other.const_value.dtype.is_floating_point():  # fmt: skip
        return None
    shape = tuple(int(d) for d in other.const_value.shape)
    if len(shape) > rank or rank < 2:
        return None
    full = (1,) * (rank - len(shape)) + shape
    if any(d != 1 for i, d in enumerate(full) if i != 1) or full[1] not in (1, channels):
        return None
    array = other.const_value.numpy().astype(np.float64).reshape(-1)
    return np.broadcast_to(array, (channels,)).copy()
