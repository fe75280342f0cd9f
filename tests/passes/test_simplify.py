"""simplify: lossless clean-up, Constant-node weights lifted to initializers."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

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
