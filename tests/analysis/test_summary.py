"""Model summaries: parameter counts, bytes by dtype, sparsity, constants, QDQ."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from onnxcomp.analysis.summary import summarize
from tests.conftest import mlp_model


def test_counts_initializers_and_constant_node_weights():
    summary = summarize(ir.serde.deserialize_model(mlp_model()))
    # w1 (8x16) and the scalar 2.0 live in Constant nodes; b1 (16) and w2 (16x4) are initializers
    assert summary.params == 8 * 16 + 1 + 16 + 16 * 4
    assert summary.weight_bytes == 4 * summary.params
    assert sum(t.in_constant_node for t in summary.tensors) == 2
    assert summary.op_counts["MatMul"] == 3 and summary.nodes == 9


def test_sparsity_and_quantized_weights():
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    w[:, :2] = 0  # 6 of 12 zeros (one of them was already 0)
    q = numpy_helper.from_array(np.ones((4, 2), np.int8), "q")
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["q", "s"], ["wq"]),
         helper.make_node("MatMul", ["x", "w"], ["h"]),
         helper.make_node("MatMul", ["h", "wq"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        [numpy_helper.from_array(w, "w"), q, numpy_helper.from_array(np.float32(0.5), "s")],
    )  # fmt: skip
    summary = summarize(ir.serde.deserialize_model(helper.make_model(graph)))
    assert summary.sparsity() == 6 / 12
    assert summary.quantized_weights == 1 and summary.qdq_nodes == 1
    assert summary.bytes_by_dtype() == {"float": (13, 52), "int8": (8, 8)}
