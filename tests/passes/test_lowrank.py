"""lowrank: Gemm / MatMul / Conv weights replaced by truncated-SVD factor pairs.

On weights that are exactly low-rank the factored model matches the original in ONNX Runtime
to 1e-4 (error ~0); parameters always shrink; what is not factored is listed with its reason.
On the demo models at energy 0.9 the logits keep cosine >= 0.99 to the input model.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxcomp
from onnxcomp import registry
from onnxcomp.errors import UsageError
from onnxcomp.passes import LowRankOptions, LowRankPass
from tests.conftest import MODELS, run_onnx

RNG = np.random.default_rng(0)


def _low_rank(m: int, n: int, rank: int) -> np.ndarray:
    return (RNG.standard_normal((m, rank)) @ RNG.standard_normal((rank, n)) / m).astype(np.float32)


def _model(nodes, inputs, inits, outputs=("y",), opset=18) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "m",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
        [numpy_helper.from_array(a, n) for n, a in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return onnx.shape_inference.infer_shapes(model)


def _mlp() -> onnx.ModelProto:
    """MatMul -> Relu -> Gemm(transB=1, alpha, beta, bias) -> Gemm(transA=1) with rank-8 weights."""
    return _model(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h1"], name="mm"),
            helper.make_node("Relu", ["h1"], ["r1"], name="relu"),
            helper.make_node(
                "Gemm", ["r1", "w2", "b2"], ["h2"], name="fc", transB=1, alpha=0.5, beta=2.0
            ),
            helper.make_node("Transpose", ["h2"], ["t2"], name="t"),
            helper.make_node("Gemm", ["t2", "w3"], ["y"], name="fc_t", transA=1),
        ],
        {"x": ["N", 64]},
        {
            "w1": _low_rank(64, 96, 8),
            "w2": _low_rank(80, 96, 8),
            "b2": RNG.standard_normal(80).astype(np.float32),
            "w3": _low_rank(80, 48, 8),
        },
    )


def _apply(model: onnx.ModelProto, **options) -> tuple[onnx.ModelProto, object]:
    ir_model = ir.serde.deserialize_model(model)
    result = LowRankPass(LowRankOptions(**options))(ir_model)
    proto = ir.serde.serialize_model(ir_model)
    onnx.checker.check_model(proto, full_check=True)
    return proto, result


def _params(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer)


def test_exactly_low_rank_mlp_is_factored_without_error():
    model = _mlp()
    factored, result = _apply(model, energy=1.0)
    x = RNG.standard_normal((5, 64)).astype(np.float32)
    expected, got = run_onnx(model, {"x": x})[0], run_onnx(factored, {"x": x})[0]
    np.testing.assert_allclose(got, expected, atol=1e-4 * np.abs(expected).max())
    assert result.stats["layers_factored"] == 3
    assert {v["rank"] for v in result.stats["per_layer"].values()} == {8}
    assert result.stats["max_rel_error"] < 1e-5
    assert _params(factored) < _params(model)
    before, after = result.stats["weight_params_before"], result.stats["weight_params_after"]
    assert (before, after) == (64 * 96 + 80 * 96 + 80 * 48, 8 * (160 + 176 + 128))
    ops = [n.op_type for n in factored.graph.node]
    assert ops.count("MatMul") == 2 and ops.count("Gemm") == 4


def test_gemm_with_trans_b_keeps_the_linear_layout_and_bias():
    factored, _ = _apply(_mlp(), energy=1.0)
    inits = {t.name: t for t in factored.graph.initializer}
    assert list(inits["w2.lowrank_left"].dims) == [80, 8]  # [out, rank]
    assert list(inits["w2.lowrank_right"].dims) == [8, 96]  # [rank, in]
    outer = next(n for n in factored.graph.node if n.name == "fc_lowrank_b")
    assert list(outer.input) == ["fc_lowrank", "w2.lowrank_left", "b2"]
    attrs = {a.name: helper.get_attribute_value(a) for a in outer.attribute}
    assert attrs["transB"] == 1 and attrs["alpha"] == 0.5 and attrs["beta"] == 2.0


def test_energy_picks_fewer_ranks_and_error_follows():
    w = _low_rank(64, 64, 64)
    model = _model([helper.make_node("MatMul", ["x", "w"], ["y"])], {"x": ["N", 64]}, {"w": w})
    _, result = _apply(model, energy=0.5)
    layer = result.stats["per_layer"]["w"]
    s = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    assert layer["rank"] == int(np.searchsorted(np.cumsum(s**2) / np.sum(s**2), 0.5) + 1)
    assert layer["rel_error"] == pytest.approx(
        np.sqrt(np.sum(s[layer["rank"] :] ** 2) / np.sum(s**2)), abs=1e-5
    )


def test_ratio_rule_and_min_saving():
    model = _model(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        {"x": ["N", 64]},
        {"w": _low_rank(64, 64, 64)},
    )
    _, result = _apply(model, ratio=0.25)
    assert result.stats["per_layer"]["w"]["rank"] == 16
    _, result = _apply(model, ratio=0.25, min_saving=0.6)  # saves exactly 50%
    assert result.stats["layers_factored"] == 0
    assert any("no saving" in n and "w (rank 16 of 64)" in n for n in result.notes)


def test_layers_that_would_grow_are_kept_with_reason():
    model = _model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        {"x": ["N", 64]},
        {"w": RNG.standard_normal((64, 64)).astype(np.float32)},
    )
    factored, result = _apply(model, energy=0.99)
    assert not result.modified and result.stats["layers_factored"] == 0
    assert any("break-even rank 31" in n for n in result.notes)
    assert [n.op_type for n in factored.graph.node] == ["MatMul"]


def test_shared_weight_is_factored_once_and_both_consumers_rewired():
    w = _low_rank(32, 48, 4)
    model = _model(
        [
            helper.make_node("MatMul", ["x", "w"], ["a"], name="mm1"),
            helper.make_node("Relu", ["a"], ["r"], name="relu"),
            helper.make_node("MatMul", ["r", "w2"], ["b"], name="mm_mid"),
            helper.make_node("MatMul", ["b", "w"], ["y"], name="mm2"),
        ],
        {"x": ["N", 32]},
        {"w": w, "w2": _low_rank(48, 32, 4)},
    )
    factored, result = _apply(model, energy=1.0, min_size=0)
    names = [t.name for t in factored.graph.initializer]
    assert names.count("w.lowrank_left") == 1 and "w" not in names
    users = [n.name for n in factored.graph.node if "w.lowrank_left" in n.input]
    assert sorted(users) == ["mm1_lowrank_a", "mm2_lowrank_a"]
    x = RNG.standard_normal((3, 32)).astype(np.float32)
    expected = run_onnx(model, {"x": x})[0]
    np.testing.assert_allclose(
        run_onnx(factored, {"x": x})[0], expected, atol=1e-4 * np.abs(expected).max()
    )
    assert result.stats["layers_factored"] == 2  # w and w2


def test_weight_also_read_by_gather_is_skipped_with_reason():
    table = _low_rank(50, 64, 4)
    model = _model(
        [
            helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
            helper.make_node("Gemm", ["e", "table"], ["y"], name="tied_head", transB=1),
        ],
        {},
        {"table": table},
    )
    model.graph.input.append(helper.make_tensor_value_info("ids", TensorProto.INT64, ["N"]))
    model = onnx.shape_inference.infer_shapes(model)
    _, result = _apply(model, energy=1.0, min_size=0)
    assert not result.modified
    assert any("table" in n and "Gather" in n for n in result.notes)


def test_conv_factored_into_spatial_and_pointwise_convs():
    rank, out_c, in_c = 3, 16, 8
    w = (
        (RNG.standard_normal((out_c, rank)) @ RNG.standard_normal((rank, in_c * 9)))
        .reshape(out_c, in_c, 3, 3)
        .astype(np.float32)
    )
    model = _model(
        [
            helper.make_node(
                "Conv",
                ["x", "w", "b"],
                ["y"],
                name="conv",
                pads=[1, 0, 1, 2],
                strides=[2, 1],
                dilations=[1, 2],
            )
        ],
        {"x": ["N", in_c, 9, 10]},
        {"w": w, "b": RNG.standard_normal(out_c).astype(np.float32)},
    )
    factored, result = _apply(model, energy=1.0, op_types=("Conv",), min_size=0)
    convs = [n for n in factored.graph.node if n.op_type == "Conv"]
    assert len(convs) == 2
    inits = {t.name: list(t.dims) for t in factored.graph.initializer}
    assert inits["w.lowrank_right"] == [rank, in_c, 3, 3]
    assert inits["w.lowrank_left"] == [out_c, rank, 1, 1]
    x = RNG.standard_normal((2, in_c, 9, 10)).astype(np.float32)
    expected = run_onnx(model, {"x": x})[0]
    np.testing.assert_allclose(
        run_onnx(factored, {"x": x})[0], expected, atol=1e-4 * np.abs(expected).max()
    )
    assert result.stats["per_layer"]["w"]["shape"] == [out_c, in_c, 3, 3]


def test_grouped_conv_is_skipped():
    model = _model(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="dw", group=4)],
        {"x": ["N", 8, 6, 6]},
        {"w": RNG.standard_normal((8, 2, 3, 3)).astype(np.float32)},
    )
    _, result = _apply(model, op_types=("Conv",), min_size=0)
    assert any("grouped Conv" in n for n in result.notes)


def test_quantised_weights_are_left_with_a_note():
    model, _ = onnxcomp.optimize(MODELS / "tiny_encoder.onnx", "int8", check="none")
    result = LowRankPass(LowRankOptions())(model)
    assert not result.modified
    assert any("already quantised" in n and "compress before quantising" in n
               for n in result.notes)  # fmt: skip


@pytest.mark.parametrize(
    ("name", "data"),
    [("digits_cnn.onnx", "digits_eval.npz"), ("tiny_encoder.onnx", "encoder_eval.npz")],
)
def test_demo_models_shrink_and_stay_close(name, data):
    _, report = onnxcomp.optimize(
        MODELS / name, "lowrank:op_types=Gemm+MatMul+Conv", data=MODELS / data, check="final"
    )
    record = report.records[-1]
    assert record.stats["layers_factored"] >= 1
    assert report.after.params < report.before.params
    assert record.check[0].cosine > 0.99
    assert record.accuracy >= report.accuracy_before - 0.02


def test_options_are_validated():
    with pytest.raises(UsageError, match="energy"):
        LowRankOptions(energy=1.5)
    with pytest.raises(UsageError, match="cannot factor Gather"):
        LowRankOptions(op_types=("Gather",))
    built = registry.get("lowrank").build({"ratio": "0.25", "op_types": "Gemm+Conv"})
    assert built.options.ratio == 0.25 and built.options.op_types == ("Gemm", "Conv")


def test_gemm_before_opset_11_gets_the_bias_it_requires():
    """Regression (zoo ResNet-50, opset 9): the inner Gemm had no C, which Gemm-9 requires."""
    model = _model(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1)],
        {"x": ["N", 64]},
        {"w": _low_rank(80, 64, 8), "b": RNG.standard_normal(80).astype(np.float32)},
        opset=9,
    )
    factored, result = _apply(model, energy=1.0)
    assert result.stats["layers_factored"] == 1
    x = RNG.standard_normal((5, 64)).astype(np.float32)
    expected, got = run_onnx(model, {"x": x})[0], run_onnx(factored, {"x": x})[0]
    np.testing.assert_allclose(got, expected, atol=1e-4 * np.abs(expected).max())
