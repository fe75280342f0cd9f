"""fold-bn: BatchNormalization folded into Conv / Gemm / MatMul(+Add), outputs unchanged."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcomp.errors import UnsupportedModelError
from onnxcomp.passes import FoldBatchNormPass
from tests.conftest import conv_bn_residual_model, run_onnx


def _fold(model: onnx.ModelProto):
    ir_model = ir.serde.deserialize_model(model)
    result = FoldBatchNormPass()(ir_model)
    return ir.serde.serialize_model(ir_model), result


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def test_every_batchnorm_of_conv_gemm_and_matmul_is_folded():
    original = conv_bn_residual_model()
    folded, result = _fold(original)
    assert "BatchNormalization" not in _ops(folded)
    assert result.stats == {"batchnorms_folded": 4, "batchnorms_left": 0}
    assert result.modified and not result.notes
    # the first Conv had no bias: folding gives it one
    conv1 = next(n for n in folded.graph.node if n.op_type == "Conv" and "x" in n.input)
    assert len(conv1.input) == 3
    x = np.random.default_rng(3).standard_normal((7, 1, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(
        run_onnx(folded, {"x": x})[0], run_onnx(original, {"x": x})[0], rtol=1e-5, atol=1e-5
    )


def _matmul_bn_model(rank3: bool, shared: bool) -> onnx.ModelProto:
    """x -> MatMul(W) -> BN; rank-3 activations put BN's channel axis on the sequence axis."""
    rng = np.random.default_rng(0)
    channels = 5 if rank3 else 6
    bn_inputs = [
        numpy_helper.from_array(rng.uniform(0.5, 1.5, channels).astype(np.float32), f"bn.{k}")
        for k in ("scale", "bias", "mean", "var")
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["m"]),
        helper.make_node("BatchNormalization", ["m", *(t.name for t in bn_inputs)], ["y"]),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if shared:
        nodes.append(helper.make_node("MatMul", ["x", "w"], ["y2"]))
        outputs.append(helper.make_tensor_value_info("y2", TensorProto.FLOAT, None))
    shape = ["N", 5, 4] if rank3 else ["N", 4]
    graph = helper.make_graph(
        nodes,
        "matmul_bn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        outputs,
        [numpy_helper.from_array(rng.standard_normal((4, 6)).astype(np.float32), "w"), *bn_inputs],
    )
    return onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[
        helper.make_opsetid("", 17)]))  # fmt: skip


@pytest.mark.parametrize(
    ("rank3", "shared", "why"),
    [
        (True, False, "the activation is not rank 2"),
        (False, True, "the MatMul weights are shared with another node"),
    ],
)
def test_batchnorm_that_cannot_be_folded_is_kept_and_reported(rank3, shared, why):
    original = _matmul_bn_model(rank3, shared)
    folded, result = _fold(original)
    assert "BatchNormalization" in _ops(folded)
    assert result.stats["batchnorms_left"] == 1 and not result.modified
    assert len(result.notes) == 1 and "kept BatchNormalization" in result.notes[0]
    assert why in result.notes[0]
    x = (
        np.random.default_rng(1)
        .standard_normal((3, *([5, 4] if rank3 else [4])))
        .astype(np.float32)
    )
    for got, want in zip(run_onnx(folded, {"x": x}), run_onnx(original, {"x": x}), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6)


def test_matmul_batchnorm_on_matrices_is_folded():
    original = _matmul_bn_model(rank3=False, shared=False)
    folded, result = _fold(original)
    assert result.stats["batchnorms_folded"] == 1
    assert _ops(folded) == ["MatMul", "Add"]
    x = np.random.default_rng(1).standard_normal((9, 4)).astype(np.float32)
    np.testing.assert_allclose(
        run_onnx(folded, {"x": x})[0], run_onnx(original, {"x": x})[0], rtol=1e-5, atol=1e-5
    )


def test_opset_before_batchnorm_9_is_upgraded_then_folded():
    original = conv_bn_residual_model(opset=8)
    folded, result = _fold(original)
    assert folded.opset_import[0].version == 9
    assert "BatchNormalization" not in _ops(folded)
    assert any("from opset 8 to 9" in note for note in result.notes)
    x = np.random.default_rng(1).standard_normal((3, 1, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(
        run_onnx(folded, {"x": x})[0], run_onnx(original, {"x": x})[0], rtol=1e-5, atol=1e-5
    )


def test_batchnorm_with_spatial_0_is_refused():
    """BatchNormalization-8 with spatial=0 (statistics per element) has no opset-9 form."""
    proto = conv_bn_residual_model(opset=8)
    for node in proto.graph.node:
        if node.op_type == "BatchNormalization":
            node.attribute.append(helper.make_attribute("spatial", 0))
    with pytest.raises(UnsupportedModelError, match="Attribute spatial must have value 1"):
        FoldBatchNormPass()(ir.serde.deserialize_model(proto))


def test_old_opset_model_without_batchnorm_passes_through():
    """Regression: fold-bn refused every opset < 9 model, even those with nothing to fold."""
    graph = helper.make_graph(
        [helper.make_node("And", ["a", "b"], ["y"])],
        "and",
        [helper.make_tensor_value_info(n, TensorProto.BOOL, [2]) for n in ("a", "b")],
        [helper.make_tensor_value_info("y", TensorProto.BOOL, [2])],
    )
    model = ir.serde.deserialize_model(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 7)])
    )
    result = FoldBatchNormPass()(model)
    assert not result.modified and result.stats["batchnorms_folded"] == 0
