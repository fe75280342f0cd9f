"""simplify: lossless clean-up, Constant-node weights lifted to initializers."""

from __future__ import annotations

import tempfile

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
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


def _erf_gelu_model(half: float = 0.5) -> onnx.ModelProto:
    """y = h * (half * (1 + erf(h / sqrt 2))), h = x @ w + b: erf-GELU as PyTorch exports it."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(a, n) for n, a in (
        ("w", rng.standard_normal((8, 16)).astype(np.float32)),
        ("b", rng.standard_normal(16).astype(np.float32)),
        ("root2", np.array(np.sqrt(2.0), np.float32)), ("one", np.array(1.0, np.float32)),
        ("half", np.array(half, np.float32)))]  # fmt: skip
    nodes = [helper.make_node("MatMul", ["x", "w"], ["xw"]),
             helper.make_node("Add", ["xw", "b"], ["h"]),
             helper.make_node("Div", ["h", "root2"], ["d"]),
             helper.make_node("Erf", ["d"], ["e"]),
             helper.make_node("Add", ["e", "one"], ["a"]),
             helper.make_node("Mul", ["half", "a"], ["m"]),
             helper.make_node("Mul", ["h", "m"], ["y"])]  # fmt: skip
    graph = helper.make_graph(
        nodes, "gelu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 16])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _runtime_ops(model) -> list[str]:
    """The ops ONNX Runtime runs after its own fusions (level all)."""
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.optimized_model_filepath = f"{tmp}/opt.onnx"
        options.log_severity_level = 3
        ort.InferenceSession(model.SerializeToString(), options,
                             providers=["CPUExecutionProvider"])  # fmt: skip
        return [n.op_type for n in onnx.load(f"{tmp}/opt.onnx").graph.node]


def test_erf_gelu_is_reordered_so_onnx_runtime_fuses_it_bit_identically():
    original = _erf_gelu_model()
    assert "Erf" in _runtime_ops(original)  # ONNX Runtime misses the exported order
    model = ir.serde.deserialize_model(original)
    result = SimplifyPass()(model)
    simplified = ir.serde.serialize_model(model)
    assert result.modified and result.stats["gelus_reordered"] == 1
    ops = _runtime_ops(simplified)  # (onnxscript makes the 2-D MatMul + Add a Gemm)
    assert "Erf" not in ops and ops[-1] in ("Gelu", "BiasGelu") and len(ops) == 2, ops
    x = np.random.default_rng(1).standard_normal((64, 8)).astype(np.float32) * 3
    # multiplying by 0.5 is exact, so the reordered product is the same float
    np.testing.assert_array_equal(run_onnx(simplified, {"x": x})[0],
                                  run_onnx(original, {"x": x})[0])  # fmt: skip


def test_a_product_that_is_not_gelu_keeps_its_order():
    model = ir.serde.deserialize_model(_erf_gelu_model(half=0.7))
    assert SimplifyPass()(model).stats["gelus_reordered"] == 0
    assert [n.op_type for n in model.graph][-2:] == ["Mul", "Mul"]
    assert "Erf" in _runtime_ops(ir.serde.serialize_model(model))
