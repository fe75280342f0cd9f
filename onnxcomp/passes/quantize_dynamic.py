"""Dynamic int8 quantisation (``int8-dynamic``): int8 weights, activations quantised at run time.

For each MatMul (2-D constant weight) and Gemm (``transA = 0``), and Conv when asked, the pass
writes the standard-ONNX form ONNX Runtime fuses into its integer kernels on CPU::

    DynamicQuantizeLinear(x) -> MatMulInteger(x_q, W_q, x_zp, 0) -> Cast(float)
        -> Mul(x_scale * w_scale) [-> Add(bias)]

(``ConvInteger`` for Conv). ONNX Runtime turns it into ``DynamicQuantizeMatMul`` /
``MatMulIntegerToFloat`` (one DynamicQuantizeLinear per activation, shared by every consumer,
e.g. the Q/K/V projections of a layer). Weights are symmetric, one scale per output column (per
tensor with ``per_channel=false``); activations are uint8 with a zero point, which is what
``DynamicQuantizeLinear`` produces. No calibration data is needed.

The weights' integer layout follows the target (:mod:`onnxcomp.target`): 8-bit int8 weights
(``u8s8``) where ONNX Runtime's u8·s8 kernels are exact (VNNI, AMX, ARM64); 7-bit ones
(``u8s8-7bit``, codes in [-63, 63]) where they may add u8·s8 pairs in 16 bits and saturate
(AVX2 without VNNI, and ``portable``, which must be right there): with full 8-bit weights the
demo transformer's output cosine fell to 0.75 on such a CPU. ``layout=u8u8`` (uint8 weights,
zero point 128) is the other exact form, on ONNX Runtime's slower 16-bit path.

Weights in Constant nodes are lifted first; a weight shared by several consumers is stored
once; Gather tables (embeddings), weights read by other ops and weights inside If/Loop/Scan
bodies stay float and are listed in the notes. Conv is off by default: ONNX Runtime's
ConvInteger is slower than its float Conv on CPU. On the demo encoder the output cosine to the
float model is >= 0.99.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Literal

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common as common_passes

from onnxcomp import quant
from onnxcomp.errors import UsageError
from onnxcomp.passes._base import CompressionPass, CompressionResult, PassOptions, option
from onnxcomp.passes._opset import upgrade_opset
from onnxcomp.passes._qdq import integer_tensor, leave_quantized_alone, unfused_qdq
from onnxcomp.passes._weights import (
    Skipped,
    Weight,
    add_initializer,
    describe_skips,
    find_weights,
    lift_constant_weights,
    lifted_note,
)
from onnxcomp.target import LAYOUTS, IntegerLayout, stamp

OPSET_DYNAMIC = 11  # DynamicQuantizeLinear
DYNAMIC_OPS = ("MatMul", "Gemm", "Conv")
# DynamicQuantizeLinear makes uint8 activations, so only these layouts exist here.
DYNAMIC_LAYOUTS = ("auto", "u8s8", "u8s8-7bit", "u8u8")
U8U8_ZERO_POINT = 128


@dataclasses.dataclass(frozen=True)
class DynamicQuantizeOptions(PassOptions):
    op_types: tuple[str, ...] = option(
        ("MatMul", "Gemm"), "ops quantised: MatMul, Gemm, Conv (ConvInteger; slow on CPU)"
    )
    per_channel: bool = option(True, "one weight scale per output column (false: per tensor)")
    layout: Literal["auto", "u8s8", "u8s8-7bit", "u8u8"] = option(
        "auto",
        "weight layout: auto (the target's: 7-bit weights where u8*s8 kernels can saturate, "
        "8-bit elsewhere), u8s8, u8s8-7bit or u8u8",
    )
    exclude: tuple[str, ...] = option((), "node or weight name patterns (fnmatch) to keep float")
    min_size: int = option(0, "keep weights with fewer elements than this in float")
    report_kernels: bool = option(
        True, "ask ONNX Runtime which integer kernels it made (one extra session)"
    )

    def validate(self) -> None:
        unknown = sorted(set(self.op_types) - set(DYNAMIC_OPS))
        if unknown:
            raise UsageError(
                f"int8-dynamic: op_types {', '.join(unknown)} not supported "
                f"(valid: {', '.join(DYNAMIC_OPS)})"
            )
        if self.min_size < 0:
            raise UsageError("int8-dynamic: min_size must be >= 0")
        if self.layout not in DYNAMIC_LAYOUTS:
            raise UsageError(
                f"int8-dynamic: layout must be one of {', '.join(DYNAMIC_LAYOUTS)}, "
                f"not '{self.layout}'"
            )


class DynamicQuantizePass(CompressionPass):
    """int8 weights with run-time activation quantisation (MatMulInteger / ConvInteger)."""

    summary = "dynamic int8: int8 weights, activations quantised at run time (MatMul/Gemm)"
    options_class = DynamicQuantizeOptions
    options: DynamicQuantizeOptions
    lossless = False

    def apply(self, model: ir.Model) -> CompressionResult:
        left_alone = leave_quantized_alone(model)
        if left_alone is not None:
            return left_alone
        return self.quantize_float_weights(model)

    def quantize_float_weights(self, model: ir.Model) -> CompressionResult:
        """The pass without its already-quantised guard: quantises the MatMul/Gemm that still
        read a float weight and leaves QDQ or integer nodes already there alone (int8-static's
        measured placement uses this on the layers it keeps float)."""
        options = self.options
        notes: list[str] = []
        lifted = lift_constant_weights(model)
        notes.extend(lifted_note(lifted))
        # Activation dtypes decide what can run as MatMulInteger; models without value_info
        # (hand-built, older exporters) need them inferred.
        common_passes.ShapeInferencePass()(model)
        weights, skipped = self._find(model)
        if weights:
            upgraded = upgrade_opset(model, OPSET_DYNAMIC, why="DynamicQuantizeLinear")
            if upgraded:
                notes.extend(upgraded)
                weights, skipped = self._find(model)
        graph = model.graph
        target = self.resolved_target()
        layout = self.layout()
        activations: dict[ir.Value, tuple[ir.Value, ir.Value, ir.Value]] = {}
        before = after = 0
        nodes: Counter = Counter()
        for weight in weights:
            before += weight.nbytes
            after += self._rewrite(graph, weight, layout, activations, nodes)
            if not weight.value.uses():
                graph.initializers.pop(weight.name)
        if weights:
            common_passes.TopologicalSortPass()(model)
            stamp(model, target, layout)
            notes.append(f"target {target.describe()}: {layout.name} ({layout.summary})")
        else:
            notes.append("no MatMul/Gemm weights to quantise")
        notes.extend(describe_skips(skipped))
        stats = {
            "weights_quantized": len(weights),
            "weights_skipped": len(skipped),
            "weight_bytes_before": before,
            "weight_bytes_after": after,
            "activations_quantized": len(activations),
            "nodes_quantized": dict(nodes),
            "int8_layout": layout.name,
            "target": target.kind,
        }
        if weights and options.report_kernels:
            found = unfused_qdq(model)
            stats["ort_int8_kernels"] = found["ort_int8_kernels"]
        return CompressionResult(model, bool(weights) or lifted > 0, stats=stats, notes=notes)

    def layout(self) -> IntegerLayout:
        """The weight layout: the option's, or the target's for run-time quantisation."""
        if self.options.layout != "auto":
            return LAYOUTS[self.options.layout]
        return self.resolved_target().dynamic_layout

    def _find(self, model: ir.Model) -> tuple[list[Weight], list[Skipped]]:
        options = self.options
        found, skipped = find_weights(
            model, ("Conv", "Gemm", "MatMul", "Gather"), exclude=options.exclude,
            min_size=options.min_size,
        )  # fmt: skip
        weights = []
        for weight in found:
            reason = self._why_not(weight)
            if reason:
                skipped.append(Skipped(weight.name, reason))
            else:
                weights.append(weight)
        return weights, skipped

    def _why_not(self, weight: Weight) -> str | None:
        ops = weight.op_types
        if ops == {"Gather"}:
            return "embedding table (a run-time DequantizeLinear of the whole table is slower)"
        unwanted = sorted(ops - set(self.options.op_types))
        if unwanted:
            return f"read by {'/'.join(unwanted)}, not in op_types"
        if weight.value.const_value.dtype != ir.DataType.FLOAT:
            return "not float32"
        if weight.value.is_graph_output():
            return "also a graph output"
        for use in weight.uses:
            node, rank = use.node, len(weight.shape)
            x = node.inputs[0]
            if x is None or x.dtype is None:
                return f"{node.op_type} input has no known dtype (shape inference could not tell)"
            if x.dtype != ir.DataType.FLOAT:
                return f"{node.op_type} input is not float32"
            if node.op_type == "MatMul" and rank != 2:
                return f"MatMul weight of rank {rank} (MatMulInteger needs 2-D)"
            if node.op_type == "Gemm":
                if node.attributes.get_int("transA", 0):
                    return "Gemm with transA=1"
                c = node.inputs[2] if len(node.inputs) > 2 else None
                beta = node.attributes.get_float("beta", 1.0)
                if c is not None and c.const_value is None and beta != 1.0:
                    return "Gemm with a non-constant C and beta != 1"
        layouts = {self._layout(use.node) for use in weight.uses}
        if len(layouts) > 1:
            return "consumers read it in different layouts (MatMul and Gemm transB)"
        return None

    @staticmethod
    def _layout(node: ir.Node) -> str:
        if node.op_type == "Gemm" and node.attributes.get_int("transB", 0):
            return "transposed"
        return "conv" if node.op_type == "Conv" else "plain"

    def _rewrite(
        self,
        graph: ir.Graph,
        weight: Weight,
        integer_layout: IntegerLayout,
        activations: dict[ir.Value, tuple[ir.Value, ir.Value, ir.Value]],
        nodes: Counter,
    ) -> int:
        """Quantise ``weight`` once and rewrite each consumer; returns the new bytes."""
        layout = self._layout(weight.uses[0].node)
        array = weight.array.T if layout == "transposed" else weight.array
        axis = (0 if layout == "conv" else 1) if self.options.per_channel else None
        limit = integer_layout.weight_max
        scale, _ = quant.linear_params(
            array, 8, axis=axis, symmetric=True, dtype=np.float32, limit=limit
        )
        codes = quant.quantize(array, scale, None, 8, axis=axis, limit=limit)
        name = weight.name
        channels = array.shape[axis] if axis is not None else 1
        # Symmetric weights: zero points are 0 (int8) or 128 (uint8, the same codes shifted).
        # ConvInteger takes only a scalar one.
        zero_shape = (channels,) if axis is not None and layout != "conv" else ()
        if integer_layout.weight == "uint8":
            stored = (codes.astype(np.int16) + U8U8_ZERO_POINT).astype(np.uint8)
            q = add_initializer(graph, f"{name}_quantized", ir.tensor(stored))
            zero = np.full(zero_shape, U8U8_ZERO_POINT, np.uint8)
        else:
            q = add_initializer(graph, f"{name}_quantized", integer_tensor(codes, 8, ""))
            zero = np.zeros(zero_shape, np.int8)
        w_zero = add_initializer(graph, f"{name}_zero_point", ir.tensor(zero))
        w_scale = np.asarray(scale, dtype=np.float32)
        nbytes = q.const_value.nbytes + w_zero.const_value.nbytes + w_scale.nbytes  # type: ignore[union-attr]
        for number, use in enumerate(weight.uses):
            node = use.node
            # Names from the weight (unique) and the consumer's number: node names may be empty.
            tag = f"{name}_{number}"
            x = node.inputs[0]
            assert x is not None
            if x not in activations:
                activations[x] = _dynamic_quantize(graph, x)
            x_q, x_scale, x_zero = activations[x]
            column_scale = w_scale
            if node.op_type == "Gemm":
                column_scale = column_scale * np.float32(node.attributes.get_float("alpha", 1.0))
            if layout == "conv":
                shape = (1, -1) + (1,) * (len(weight.shape) - 2)
                column_scale = column_scale.reshape(shape) if axis is not None else column_scale
            scale_value = add_initializer(graph, f"{tag}_scale", ir.tensor(column_scale))
            integer_op = "ConvInteger" if layout == "conv" else "MatMulInteger"
            attributes = {k: v for k, v in node.attributes.items()} if layout == "conv" else {}
            integer = ir.node(
                integer_op, [x_q, q, x_zero, w_zero], attributes, name=f"{tag}_integer"
            )
            cast = ir.node("Cast", integer.outputs, {"to": ir.DataType.FLOAT}, name=f"{tag}_cast")
            scales = ir.node("Mul", [x_scale, scale_value], name=f"{tag}_scales")
            result = ir.node("Mul", [cast.outputs[0], scales.outputs[0]], name=f"{tag}_rescale")
            new_nodes = [integer, cast, scales, result]
            out = result.outputs[0]
            bias = self._bias(graph, node, tag)
            if bias is not None:
                add = ir.node("Add", [out, bias], name=f"{tag}_bias")
                new_nodes.append(add)
                out = add.outputs[0]
            old = node.outputs[0]
            graph.insert_before(node, new_nodes)
            out.dtype, out.shape = old.dtype or ir.DataType.FLOAT, old.shape
            was_output = old.is_graph_output()
            old.replace_all_uses_with(out, replace_graph_outputs=True)
            if was_output:
                out.name, old.name = old.name, f"{old.name}_float"
            graph.remove(node, safe=True)
            nodes[node.op_type] += 1
            for value in node.inputs[2:]:
                if value is not None and not value.uses() and value.name in graph.initializers:
                    graph.initializers.pop(value.name)
        return nbytes

    def _bias(self, graph: ir.Graph, node: ir.Node, tag: str) -> ir.Value | None:
        """Gemm's ``beta * C``, or Conv's bias reshaped to [1, C, 1, ...]; None without one."""
        if len(node.inputs) < 3 or node.inputs[2] is None:
            return None
        bias = node.inputs[2]
        if node.op_type == "Gemm":
            beta = node.attributes.get_float("beta", 1.0)
            if beta == 1.0 or bias.const_value is None:
                return bias
            scaled = (bias.const_value.numpy() * np.float32(beta)).astype(np.float32)
            return add_initializer(graph, f"{tag}_bias", ir.tensor(scaled))
        if bias.const_value is None:
            return None
        rank = len(node.inputs[1].shape or ()) if node.inputs[1] is not None else 4
        array = bias.const_value.numpy().reshape((1, -1) + (1,) * (rank - 2))
        return add_initializer(graph, f"{tag}_bias", ir.tensor(array))


def _dynamic_quantize(graph: ir.Graph, x: ir.Value) -> tuple[ir.Value, ir.Value, ir.Value]:
    node = ir.node("DynamicQuantizeLinear", [x], num_outputs=3, name=f"{x.name}_dynamic_quantize")
    q, scale, zero = node.outputs
    q.name, scale.name, zero.name = (f"{x.name}_quantized", f"{x.name}_scale",
                                     f"{x.name}_zero_point")  # fmt: skip
    q.dtype, scale.dtype, zero.dtype = ir.DataType.UINT8, ir.DataType.FLOAT, ir.DataType.UINT8
    q.shape = x.shape
    producer = x.producer()
    if producer is not None:
        graph.insert_after(producer, node)
    else:
        graph.insert_before(graph[0], node)
    return q, scale, zero
