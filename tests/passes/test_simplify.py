"""simplify: lossless clean-up, Constant-node weights lifted to initializers."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from onnxcomp.passes import SimplifyOptions, SimplifyPass
from tests.conftest import conv_bn_residual_model, mlp_model, run_onnx


def test_removes_identity_dead_code_and_folds_constant_weights():
    original = mlp_model()
    model = ir.serde.deserialize_model(original)
    result = SimplifyPass()(model)
    simplified = ir.serde.serialize_model(model)
    assert [n.op_type for n in simplified.graph.node] == ["MatMul", "Add", "Relu", "MatMul"]
    # w1 * 2 was folded into one initializer that the first MatMul reads
    weights = {t.name for t in simplified.graph.initializer}
    first = simplified.graph.node[0]
    assert first.input[1] in weights
    assert result.modified and result.stats["constant_nodes_lifted_or_folded"] == 2
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    np.testing.assert_allclose(
        run_onnx(simplified, {"x": x})[0], run_onnx(original, {"x": x})[0], rtol=1e-6
    )


def test_a_simplified_model_is_left_unchanged():
    model = ir.serde.deserialize_model(mlp_model())
    SimplifyPass()(model)
    assert not SimplifyPass(SimplifyOptions(iterations=1))(model).modified


def test_reports_batchnorms_fused_by_onnxscript_rules():
    model = ir.serde.deserialize_model(conv_bn_residual_model())
    result = SimplifyPass()(model)
    # onnxscript's rules fuse BN after Conv and Gemm; the MatMul+Add+BN is fold-bn's job
    assert result.stats["batchnorms_fused"] == 3


def test_opset_12_concat_from_sequence_is_not_folded_into_opset_13_ops():
    """Regression: onnxscript folds sequence ops into opset-13 Split/Unsqueeze forms whatever
    the model's opset, which broke opset-12 models; simplify now skips folding and says so."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [
            helper.make_node("SequenceConstruct", ["a", "b"], ["seq"]),
            helper.make_node("ConcatFromSequence", ["seq"], ["y"], axis=0, new_axis=1),
        ],
        "seq",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [3]) for n in ("a", "b")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
    )
    original = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)])
    model = ir.serde.deserialize_model(original)
    result = SimplifyPass()(model)
    assert result.notes and "ConcatFromSequence in an opset-12 model" in result.notes[0]
    feeds = {"a": np.ones(3, np.float32), "b": np.zeros(3, np.float32)}
    np.testing.assert_array_equal(
        run_onnx(ir.serde.serialize_model(model), feeds)[0], run_onnx(original, feeds)[0]
    )


def test_folded_transpose_of_a_weight_is_deduplicated():
    """Regression (onnx's test_Linear_no_bias): folding Transpose(W) left a strided numpy view,
    which onnx_ir's initializer dedup refused ('ndarray is not C-contiguous')."""
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    graph = helper.make_graph(
        [helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
         helper.make_node("MatMul", ["x", "wt"], ["y"])],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(w, "w")],
    )  # fmt: skip
    model = ir.serde.deserialize_model(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    )
    SimplifyPass()(model)
    assert [n.op_type for n in model.graph] == ["MatMul"]
    folded = next(iter(model.graph.initializers.values())).const_value.numpy()
    np.testing.assert_array_equal(folded, w.T)
