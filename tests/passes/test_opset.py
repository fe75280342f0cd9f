"""upgrade_opset: onnx's version converter run in place, with a model ONNX Runtime loads."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from onnxcomp.passes._opset import onnx_opset, upgrade_opset
from tests.conftest import run_onnx


def test_values_the_converter_retypes_load_in_onnx_runtime():
    """Regression (zoo Inception v1 under int8-dynamic): Dropout's mask is float before
    opset 10 and bool from it; the converter kept the old type in value_info."""
    w = np.arange(12, dtype=np.float32).reshape(4, 3)
    graph = helper.make_graph(
        [helper.make_node("Dropout", ["x"], ["d", "mask"], ratio=0.5),
         helper.make_node("MatMul", ["d", "w"], ["y"])],
        "dropout",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(w, "w")],
        value_info=[helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["N", 4])],
    )  # fmt: skip
    model = ir.serde.deserialize_model(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    )
    notes = upgrade_opset(model, 11, why="a test")
    assert onnx_opset(model) == 11 and "from opset 9 to 11" in notes[-1]
    x = np.ones((2, 4), np.float32)
    np.testing.assert_allclose(run_onnx(ir.serde.serialize_model(model), {"x": x})[0], x @ w)
