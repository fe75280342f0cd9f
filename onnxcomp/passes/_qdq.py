"""Building quantised weights in the graph: integer initializers in ONNX's own dtypes (INT4 and
INT2 packed two and four to a byte), their scale and zero point, and the DequantizeLinear node
that turns them back into the float weight. Shared by the quantisation passes."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxcomp import runtime
from onnxcomp.passes._base import CompressionResult
from onnxcomp.passes._weights import add_initializer
from onnxcomp.quant import pack

INTEGER_TYPES = {
    32: ir.DataType.INT32,
    8: ir.DataType.INT8,
    4: ir.DataType.INT4,
    2: ir.DataType.INT2,
}
LOW_BIT_TYPES = frozenset(
    {
        ir.DataType.INT8, ir.DataType.UINT8, ir.DataType.INT4, ir.DataType.UINT4,
        ir.DataType.INT2, ir.DataType.UINT2, ir.DataType.INT16, ir.DataType.UINT16,
        ir.DataType.FLOAT8E4M3FN, ir.DataType.FLOAT8E4M3FNUZ, ir.DataType.FLOAT8E5M2,
        ir.DataType.FLOAT8E5M2FNUZ, ir.DataType.FLOAT4E2M1,
    }
)  # fmt: skip


QUANTIZED_OPS = frozenset(
    {
        "QuantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "QGemm",
        "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "MatMulNBits",
    }
)  # fmt: skip


def integer_tensor(codes: np.ndarray, bits: int, name: str) -> ir.TensorProtocol:
    """``codes`` (signed integers) as an INT32 (biases) or INT8, or packed INT4 / INT2, tensor;
    8-bit codes already held as uint8 (unsigned layouts, zero point 128) stay UINT8."""
    dtype = INTEGER_TYPES[bits]
    if bits == 8 and np.asarray(codes).dtype == np.uint8:
        dtype = ir.DataType.UINT8
    if bits in (8, 32):
        return ir.tensor(np.asarray(codes, dtype=dtype.numpy()), dtype=dtype, name=name)
    return ir.PackedTensor(pack(codes, bits), dtype, shape=ir.Shape(np.shape(codes)), name=name)


def add_dequantized_weight(
    graph: ir.Graph,
    name: str,
    codes: np.ndarray,
    bits: int,
    scale: np.ndarray,
    zero_point: np.ndarray | None,
    *,
    axis: int | None,
    block_size: int = 0,
) -> tuple[ir.Value, int]:
    """Add ``DequantizeLinear(codes, scale[, zero_point])`` for weight ``name`` to ``graph``.

    Returns the node's output (the weight's float value, in the scale's dtype) and the bytes
    the new initializers take. The node is appended: sort the graph afterwards.
    """
    inputs = [
        add_initializer(graph, f"{name}_quantized", integer_tensor(codes, bits, "")),
        add_initializer(graph, f"{name}_scale", ir.tensor(scale)),
    ]
    if zero_point is not None:
        inputs.append(
            add_initializer(graph, f"{name}_zero_point", integer_tensor(zero_point, bits, ""))
        )
    attributes: dict[str, int] = {}
    if axis is not None:
        attributes["axis"] = axis
    if block_size:
        attributes["block_size"] = block_size
    node = ir.node("DequantizeLinear", inputs, attributes, name=f"{name}_dequantize")
    output = node.outputs[0]
    output.name = f"{name}_dequantized"
    output.dtype = ir.DataType.from_numpy(np.asarray(scale).dtype)
    output.shape = ir.Shape(np.shape(codes))
    graph.append(node)
    return output, sum(v.const_value.nbytes for v in inputs)  # type: ignore[union-attr]


def add_quantize_dequantize(
    graph: ir.Graph,
    value: ir.Value,
    scale: float,
    zero_point: int,
    *,
    name: str,
    dtype: ir.DataType = ir.DataType.INT8,
) -> ir.Value:
    """Add ``DequantizeLinear(QuantizeLinear(value))`` with a per-tensor ``scale`` and
    ``zero_point`` (an activation's QDQ pair, codes of ``dtype``: INT8 or UINT8); returns the
    dequantized value. The caller rewires the consumers. The nodes are appended: sort the graph
    afterwards."""
    scale_value = add_initializer(graph, f"{name}_scale", ir.tensor(np.float32(scale)))
    zero_value = add_initializer(
        graph, f"{name}_zero_point", ir.tensor(np.array(zero_point, dtype=dtype.numpy()))
    )
    quantize = ir.node("QuantizeLinear", [value, scale_value, zero_value], name=f"{name}_quantize")
    quantized = quantize.outputs[0]
    quantized.name, quantized.dtype = f"{name}_quantized", dtype
    quantized.shape = value.shape
    dequantize = ir.node(
        "DequantizeLinear", [quantized, scale_value, zero_value], name=f"{name}_dequantize"
    )
    output = dequantize.outputs[0]
    output.name, output.dtype, output.shape = f"{name}_dequantized", ir.DataType.FLOAT, value.shape
    graph.append(quantize)
    graph.append(dequantize)
    return output


def add_rescaled_dequantize(
    graph: ir.Graph, dequantized: ir.Value, factor: float, *, name: str
) -> ir.Value:
    """A second DequantizeLinear of the codes behind ``dequantized`` (the output of an
    activation's QDQ pair from :func:`add_quantize_dequantize`), with its scale times
    ``factor``: ``x * factor`` at no cost, since integer kernels read the codes directly."""
    source = dequantized.producer()
    assert source is not None and source.op_type == "DequantizeLinear"
    quantized, scale, zero_point = source.inputs[:3]
    assert quantized is not None and scale is not None and scale.const_value is not None
    new_scale = np.asarray(scale.const_value.numpy() * np.float32(factor), dtype=np.float32)
    scale_value = add_initializer(graph, f"{name}_scale", ir.tensor(new_scale))
    node = ir.node(
        "DequantizeLinear", [quantized, scale_value, zero_point], name=f"{name}_dequantize"
    )
    output = node.outputs[0]
    output.name, output.dtype = f"{name}_dequantized", dequantized.dtype
    output.shape = dequantized.shape
    graph.append(node)
    return output


def leave_quantized_alone(model: ir.Model) -> CompressionResult | None:
    """A no-change result saying so, when the model is quantised already; else None."""
    already = is_quantized(model)
    if not already:
        return None
    note = f"the model is already quantised ({', '.join(already)}); left it alone"
    return CompressionResult(model, False, stats={"weights_quantized": 0}, notes=[note])


def is_quantized(model: ir.Model) -> list[str]:
    """Op types (any graph) that show the model is already quantised: QuantizeLinear,
    DequantizeLinear of a low-bit constant, integer and QLinear kernels."""
    found = set()
    for graph in model.graphs():
        for node in graph:
            op = node.op_type
            if op in QUANTIZED_OPS or op.startswith("QLinear"):
                found.add(op)
    if quantized_weight_count(model):
        found.add("DequantizeLinear")
    return sorted(found)


def quantized_weight_count(model: ir.Model) -> int:
    """DequantizeLinear nodes (any graph) reading a low-bit constant: weights already quantised."""
    count = 0
    for graph in model.graphs():
        for node in graph:
            if node.op_type == "DequantizeLinear" and node.inputs and node.inputs[0] is not None:
                tensor = node.inputs[0].const_value
                if tensor is not None and tensor.dtype in LOW_BIT_TYPES:
                    count += 1
    return count


INT8_KERNELS = frozenset(
    {"QLinearConv", "QLinearMatMul", "QGemm", "MatMulIntegerToFloat", "QLinearAdd",
     "QLinearMul", "QLinearConcat", "QLinearAveragePool", "QLinearGlobalAveragePool",
     "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax", "DynamicQuantizeMatMul",
     "MatMulInteger", "ConvInteger", "QLinearWhere", "QLinearReduceMean"}
)  # fmt: skip


def unfused_qdq(model: ir.Model) -> dict[str, int]:
    """What ONNX Runtime's CPU optimiser (extended level) made of the QDQ in ``model``.

    ``unfused_qdq_pairs``: QuantizeLinear nodes still feeding a DequantizeLinear (float
    fake-quantisation: pure overhead); ``ort_quantize`` / ``ort_dequantize``: standalone
    conversions left at float/int8 boundaries (DequantizeLinear of constants not counted);
    ``ort_weight_dequantize``: weights still dequantized at run time; ``ort_int8_kernels``:
    integer kernels (QLinearConv, QGemm, MatMulIntegerToFloat, ...).
    """
    optimized = runtime.optimized_model(model, level="extended")
    pairs = quantize = dequantize = weight_dq = kernels = 0
    for node in optimized.graph:
        op = node.op_type
        if op in INT8_KERNELS:
            kernels += 1
        elif op == "QuantizeLinear":
            quantize += 1
            pairs += sum(1 for n, _ in node.outputs[0].uses() if n.op_type == "DequantizeLinear")
        elif op == "DequantizeLinear":
            if node.inputs[0] is not None and node.inputs[0].const_value is not None:
                weight_dq += 1
            else:
                dequantize += 1
    return {
        "unfused_qdq_pairs": pairs,
        "ort_quantize": quantize,
        "ort_dequantize": dequantize,
        "ort_weight_dequantize": weight_dq,
        "ort_int8_kernels": kernels,
    }
