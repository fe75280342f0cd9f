"""Weight-only quantisation (int8, int4, ternary, binary): graph rewrites, numerics, reports.

Numeric checks run ONNX Runtime at the basic optimisation level (tests.conftest.run_onnx), where
DequantizeLinear+MatMul is not fused into MatMulNBits. Tolerances: a quantised model matches
the float model whose weights are replaced by numpy's dequantized codes to 1e-5 (the rewrite is
exact); against the original float model, int8 stays within 2% of max|output| and int4 keeps
cosine >= 0.99 on the small test models.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxcomp
from onnxcomp import io, quant, registry
from onnxcomp.errors import UnsupportedModelError, UsageError
from onnxcomp.instrument import min_cosine
from onnxcomp.passes import WeightQuantizeOptions, WeightQuantizePass
from tests.conftest import LOSS_ALLOWED, MODELS, conv_bn_residual_model, run_onnx
from tests.matrix_cases import zoo_layout

RNG = np.random.default_rng(0)


def _quantize(model: onnx.ModelProto, **options):
    ir_model = ir.serde.deserialize_model(model)
    result = WeightQuantizePass(WeightQuantizeOptions(**options))(ir_model)
    proto = ir.serde.serialize_model(ir_model)
    onnx.checker.check_model(proto, full_check=True)
    return proto, result


def _make(nodes, inputs, outputs, inits, opset=17, dtype=TensorProto.FLOAT) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "m",
        [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
        [helper.make_tensor_value_info(n, dtype, None) for n in outputs],
        [numpy_helper.from_array(a, n) for n, a in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return onnx.shape_inference.infer_shapes(model)


def _linear_model(opset: int = 17) -> onnx.ModelProto:
    """x[N,64] -> MatMul(W1[64,48]) -> Relu -> Gemm(W2[32,48], transB=1) -> y[N,32]."""
    return _make(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm"),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], name="fc", transB=1),
        ],
        [("x", TensorProto.FLOAT, ["N", 64])],
        ["y"],
        {
            "w1": RNG.standard_normal((64, 48)).astype(np.float32) / 8,
            "w2": RNG.standard_normal((32, 48)).astype(np.float32) / 7,
            "b2": RNG.standard_normal(32).astype(np.float32),
        },
        opset,
    )


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in model.graph.node for out in node.output}


def _initializers(model: onnx.ModelProto) -> dict[str, TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def _weight_dq(model: onnx.ModelProto, node_name: str, index: int = 1) -> onnx.NodeProto:
    """The DequantizeLinear node feeding input ``index`` of node ``node_name``."""
    node = next(n for n in model.graph.node if n.name == node_name)
    producer = _producers(model)[node.input[index]]
    assert producer.op_type == "DequantizeLinear"
    return producer


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_int8_replaces_each_weight_by_per_channel_int8_dequantize():
    original = conv_bn_residual_model()
    quantized, result = _quantize(original)
    inits = _initializers(quantized)
    for name in ("w1", "w2", "fc_w", "mm_w"):
        assert name not in inits  # no float copy left
    expected_axis = {"conv1": 0, "conv2": 0, "fc": 1, "mm": 1}  # Gemm transB=0, MatMul [K, N]
    for node_name, axis in expected_axis.items():
        dq = _weight_dq(quantized, node_name)
        assert _attrs(dq) == {"axis": axis}
        q, scale = inits[dq.input[0]], inits[dq.input[1]]
        assert q.data_type == TensorProto.INT8 and scale.data_type == TensorProto.FLOAT
        assert list(scale.dims) == [q.dims[axis]] and len(dq.input) == 2  # symmetric
    assert result.stats["weights_quantized"] == 4 and result.stats["bits"] == 8
    before, after = result.stats["weight_bytes_before"], result.stats["weight_bytes_after"]
    assert after < 0.3 * before  # opset 17: no upgrade needed; the BatchNorms fold first
    assert result.notes == ["folded 4 BatchNormalization into the layers before them"]
    assert "BatchNormalization" not in {n.op_type for n in quantized.graph.node}
    x = RNG.standard_normal((5, 1, 4, 4)).astype(np.float32)
    (want,), (got,) = run_onnx(original, {"x": x}), run_onnx(quantized, {"x": x})
    assert np.abs(got - want).max() <= 0.02 * np.abs(want).max()


def test_int4_blocks_run_along_the_input_axis_and_pack_two_per_byte():
    original = _linear_model()
    quantized, result = _quantize(original, bits=4, block_size=16)
    inits = _initializers(quantized)
    for node_name, axis, scale_shape in [("mm", 0, [4, 48]), ("fc", 1, [32, 3])]:
        dq = _weight_dq(quantized, node_name)
        assert _attrs(dq) == {"axis": axis, "block_size": 16}
        q, scale = inits[dq.input[0]], inits[dq.input[1]]
        assert q.data_type == TensorProto.INT4 and list(scale.dims) == scale_shape
        assert len(q.raw_data) == int(np.prod(q.dims)) // 2
    assert quantized.opset_import[0].version == 21
    assert result.stats["layouts"] == {"per-block": 2}
    x = RNG.standard_normal((6, 64)).astype(np.float32)
    (want,), (got,) = run_onnx(original, {"x": x}), run_onnx(quantized, {"x": x})
    assert _cosine(got, want) >= 0.99


def test_quantised_model_computes_exactly_with_the_dequantized_weights():
    original = _linear_model()
    quantized, _ = _quantize(original, bits=4, block_size=16, symmetric=False)
    simulated = onnx.ModelProto()
    simulated.CopyFrom(original)
    for tensor, axis in [(simulated.graph.initializer[0], 0), (simulated.graph.initializer[1], 1)]:
        w = numpy_helper.to_array(tensor)
        scale, zp = quant.linear_params(w, 4, axis=axis, block_size=16, symmetric=False)
        codes = quant.quantize(w, scale, zp, 4, axis=axis, block_size=16)
        restored = quant.dequantize(codes, scale, zp, axis=axis, block_size=16)
        tensor.CopyFrom(numpy_helper.from_array(restored, tensor.name))
    x = RNG.standard_normal((6, 64)).astype(np.float32)
    np.testing.assert_allclose(
        run_onnx(quantized, {"x": x})[0], run_onnx(simulated, {"x": x})[0], rtol=1e-5, atol=1e-5
    )


def test_conv_with_too_few_input_channels_for_a_block_falls_back_to_per_channel():
    quantized, result = _quantize(conv_bn_residual_model(), bits=4, block_size=32)
    assert _attrs(_weight_dq(quantized, "conv1")) == {"axis": 0}  # w1 is [4, 1, 3, 3]
    assert _attrs(_weight_dq(quantized, "fc")) == {"axis": 0, "block_size": 32}  # fc_w [64, 8]
    note = next(n for n in result.notes if "per-channel scales instead of blocks" in n)
    assert "w1" in note and "w2" in note and "mm_w" in note


@pytest.mark.parametrize(("scheme", "values"), [("ternary", {-1, 0, 1}), ("binary", {-1, 1})])
def test_ternary_and_binary_store_int2_codes_with_a_channel_scale(scheme, values):
    original = _linear_model()
    quantized, result = _quantize(original, bits=2, scheme=scheme)
    assert quantized.opset_import[0].version == 25
    inits = _initializers(quantized)
    dq = _weight_dq(quantized, "mm")
    q = inits[dq.input[0]]
    assert q.data_type == TensorProto.INT2 and len(q.raw_data) == 64 * 48 // 4
    assert set(np.unique(numpy_helper.to_array(q).astype(np.int8))) == values
    assert list(inits[dq.input[1]].dims) == [48] and _attrs(dq) == {"axis": 1}
    assert any("lose accuracy without fine-tuning" in n for n in result.notes)
    assert any("opset 17 to 25" in n for n in result.notes)
    x = RNG.standard_normal((6, 64)).astype(np.float32)
    (want,), (got,) = run_onnx(original, {"x": x}), run_onnx(quantized, {"x": x})
    assert _cosine(got, want) > 0.5  # runs in stock ONNX Runtime; accuracy needs fine-tuning


def test_shared_weight_is_quantised_once_and_both_consumers_read_it():
    w = RNG.standard_normal((8, 8)).astype(np.float32)
    original = _make(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"], name="first"),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("MatMul", ["r", "w"], ["y"], name="second"),
        ],
        [("x", TensorProto.FLOAT, ["N", 8])],
        ["y"],
        {"w": w},
    )
    quantized, result = _quantize(original)
    assert result.stats["weights_quantized"] == 1
    first, second = (
        next(n for n in quantized.graph.node if n.name == k) for k in ("first", "second")
    )
    assert first.input[1] == second.input[1]
    assert [n.op_type for n in quantized.graph.node].count("DequantizeLinear") == 1
    x = RNG.standard_normal((3, 8)).astype(np.float32)
    (want,), (got,) = run_onnx(original, {"x": x}), run_onnx(quantized, {"x": x})
    assert np.abs(got - want).max() <= 0.02 * np.abs(want).max()


def _tied_embedding_model() -> onnx.ModelProto:
    """ids -> Gather(E) -> mean over tokens -> Gemm(., E, transB=1): E is read twice."""
    return _make(
        [
            helper.make_node("Gather", ["emb", "ids"], ["e"], name="embed"),
            helper.make_node("ReduceMean", ["e", "axes"], ["m"], keepdims=0),
            helper.make_node("Gemm", ["m", "emb"], ["y"], name="logits", transB=1),
        ],
        [("ids", TensorProto.INT64, ["N", 5])],
        ["y"],
        {"emb": RNG.standard_normal((16, 8)).astype(np.float32), "axes": np.array([1])},
        opset=18,
    )


def test_tied_embedding_gets_per_row_scales_shared_by_gather_and_gemm():
    original = _tied_embedding_model()
    quantized, result = _quantize(original)
    gather, gemm = (
        next(n for n in quantized.graph.node if n.name == k) for k in ("embed", "logits")
    )
    assert gather.input[0] == gemm.input[1]  # one DequantizeLinear output read by both
    assert _attrs(_weight_dq(quantized, "embed", index=0)) == {"axis": 0}  # one scale per row
    assert result.stats["weights_quantized"] == 1
    ids = RNG.integers(0, 16, (4, 5)).astype(np.int64)
    (want,), (got,) = run_onnx(original, {"ids": ids}), run_onnx(quantized, {"ids": ids})
    assert np.abs(got - want).max() <= 0.02 * np.abs(want).max()


def test_skipped_weights_are_listed_with_the_reason():
    quantized, result = _quantize(_tied_embedding_model(), include_embeddings=False)
    assert result.stats["weights_quantized"] == 0 and "emb" in _initializers(quantized)
    assert any("include_embeddings=false" in n and "emb" in n for n in result.notes)
    _, result = _quantize(conv_bn_residual_model(), exclude=("conv*",), min_size=50)
    notes = " | ".join(result.notes)
    assert "excluded by pattern): w1, w2" in notes
    assert "below min_size 50): mm_w" in notes  # mm_w is [8, 6]
    assert result.stats == {**result.stats, "weights_quantized": 1, "weights_skipped": 3}


def test_weight_in_a_constant_node_is_quantised():
    w = RNG.standard_normal((8, 4)).astype(np.float32)
    original = _make(
        [
            helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w)),
            helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
        ],
        [("x", TensorProto.FLOAT, ["N", 8])],
        ["y"],
        {},
    )
    quantized, result = _quantize(original)
    assert result.stats["weights_quantized"] == 1
    assert "Constant" not in [n.op_type for n in quantized.graph.node]
    assert _weight_dq(quantized, "mm")


def test_weights_inside_an_if_branch_are_reported_as_skipped():
    def branch(name: str) -> onnx.GraphProto:
        return helper.make_graph(
            [helper.make_node("MatMul", ["x", f"{name}_w"], [f"{name}_y"])],
            name,
            [],
            [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, None)],
            [numpy_helper.from_array(np.ones((8, 8), np.float32), f"{name}_w")],
        )

    original = _make(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
            helper.make_node(
                "If", ["c"], ["y"], then_branch=branch("then"), else_branch=branch("else")
            ),
        ],
        [("x", TensorProto.FLOAT, ["N", 8]), ("c", TensorProto.BOOL, [])],
        ["y", "h"],
        {"w": RNG.standard_normal((8, 8)).astype(np.float32)},
    )
    quantized, result = _quantize(original)
    assert result.stats["weights_quantized"] == 1 and result.stats["weights_skipped"] == 2
    assert any("inside an If/Loop/Scan body" in n and "then_w" in n for n in result.notes)
    x = RNG.standard_normal((2, 8)).astype(np.float32)
    run_onnx(quantized, {"x": x, "c": np.array(True)})


def test_already_quantised_model_is_left_alone_with_a_note():
    once, _ = _quantize(conv_bn_residual_model())
    twice, result = _quantize(once, bits=4, block_size=32)
    assert not result.modified and result.stats["weights_quantized"] == 0
    assert any("already has 4 quantised weights" in n for n in result.notes)
    assert twice.opset_import[0].version == once.opset_import[0].version  # not upgraded
    assert [n.op_type for n in twice.graph.node] == [n.op_type for n in once.graph.node]


@pytest.mark.parametrize(("bits", "opset"), [(8, 13), (4, 21), (2, 25)])
def test_opset_13_model_is_upgraded_as_far_as_the_format_needs(bits, opset):
    original = conv_bn_residual_model(opset=13)
    quantized, result = _quantize(original, bits=bits, block_size=32 if bits == 4 else 0)
    assert quantized.opset_import[0].version == opset
    upgrades = [n for n in result.notes if "upgraded the model" in n]
    assert upgrades == ([] if opset == 13 else [upgrades[0]])
    if upgrades:
        assert f"from opset 13 to {opset}" in upgrades[0]
    x = RNG.standard_normal((2, 1, 4, 4)).astype(np.float32)
    assert np.isfinite(run_onnx(quantized, {"x": x})[0]).all()


def test_opset_below_13_is_upgraded_for_per_channel_int8():
    quantized, result = _quantize(conv_bn_residual_model(opset=11))
    assert quantized.opset_import[0].version == 13
    assert any("from opset 11 to 13" in n for n in result.notes)
    run_onnx(quantized, {"x": RNG.standard_normal((2, 1, 4, 4)).astype(np.float32)})


def _unconvertible_model() -> onnx.ModelProto:
    """Opset 1 with LpPool, for which onnx's version converter has no adapter."""
    nodes = [
        helper.make_node("LpPool", ["x"], ["p"], kernel_shape=[2, 2]),
        helper.make_node("MatMul", ["x2", "w"], ["z"]),
    ]
    graph = helper.make_graph(
        nodes,
        "old",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4]),
         helper.make_tensor_value_info("x2", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("p", TensorProto.FLOAT, [1, 2, 3, 3]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 4])],
        [numpy_helper.from_array(np.ones((8, 4), np.float32), "w")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 1)], ir_version=4)
    onnx.checker.check_model(model)
    return model


def test_model_whose_opset_cannot_be_upgraded_is_refused_with_a_clear_error(tmp_path: Path):
    model = ir.serde.deserialize_model(_unconvertible_model())
    with pytest.raises(UnsupportedModelError, match="cannot upgrade the model from opset 1 to 21"):
        WeightQuantizePass(WeightQuantizeOptions(bits=4, block_size=32))(model)
    path = tmp_path / "old.onnx"
    onnx.save(_unconvertible_model(), path)
    with pytest.raises(UnsupportedModelError, match=r"pass 'int4'.*No Adapter.*LpPool"):
        onnxcomp.optimize(path, "int4", check="none")


def test_float16_weights_get_float16_scales_and_opset_19():
    w = RNG.standard_normal((16, 8)).astype(np.float16)
    original = _make(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        [("x", TensorProto.FLOAT16, ["N", 16])],
        ["y"],
        {"w": w},
        dtype=TensorProto.FLOAT16,
    )
    quantized, _ = _quantize(original)
    assert quantized.opset_import[0].version == 19
    assert _initializers(quantized)[_weight_dq(quantized, "mm").input[1]].data_type == (
        TensorProto.FLOAT16
    )
    x = RNG.standard_normal((3, 16)).astype(np.float16)
    (want,), (got,) = run_onnx(original, {"x": x}), run_onnx(quantized, {"x": x})
    assert got.dtype == np.float16 and _cosine(got, want) > 0.999


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"block_size": "48"}, "power of two"),
        ({"block_size": "8"}, "power of two"),
        ({"bits": "3"}, "bits must be 8, 4 or 2"),
        ({"op_types": "Conv+Add"}, "no weights known for op_types Add"),
    ],
)
def test_bad_options_are_usage_errors(values, message):
    with pytest.raises(UsageError, match=message):
        registry.get("int4").build(values)


def test_ternary_needs_two_bits_and_no_zero_point():
    with pytest.raises(UsageError, match="needs bits=2"):
        WeightQuantizeOptions(bits=4, scheme="ternary")
    with pytest.raises(UsageError, match="no zero point"):
        registry.get("binary").build({"symmetric": "false"})


# Demo models end to end: (pipeline, data, quantised-weight bytes ratio bound, check)
DEMOS = {
    "digits": ("digits_cnn.onnx", "digits_eval.npz"),
    "encoder": ("tiny_encoder.onnx", "encoder_eval.npz"),
}


@pytest.mark.parametrize(
    ("demo", "passes", "max_ratio"),
    [
        ("digits", "int8", 0.26),
        ("encoder", "int8", 0.27),
        ("digits", "int4", 0.16),
        ("encoder", "int4", 0.16),
        ("encoder", "ternary", 0.09),
        ("digits", "binary", 0.09),
    ],
)
def test_demo_models_quantise_and_run_in_plain_onnxruntime(tmp_path, demo, passes, max_ratio):
    model_file, data_file = DEMOS[demo]
    out = tmp_path / "q.onnx"
    _, report = onnxcomp.optimize(
        MODELS / model_file, passes, data=MODELS / data_file, output=out, check_samples=256,
        bound=LOSS_ALLOWED,  # 2-bit weights lose most of the accuracy before fine-tuning
    )
    (record,) = report.records
    stats = record.stats
    assert stats["weight_bytes_after"] <= max_ratio * stats["weight_bytes_before"]
    assert stats["weights_skipped"] == 0 and report.file_bytes_after < report.file_bytes_before
    saved = onnx.load(out)
    onnx.checker.check_model(saved, full_check=True)
    dq_inputs = {i for n in saved.graph.node if n.op_type == "DequantizeLinear" for i in n.input}
    assert (
        sum(n.op_type == "DequantizeLinear" for n in saved.graph.node) == stats["weights_quantized"]
    )
    float_2d = [t.name for t in saved.graph.initializer if t.name not in dq_inputs
                and t.data_type == TensorProto.FLOAT and len(t.dims) >= 2]  # fmt: skip
    assert float_2d == []  # the encoder's pos_emb.weight, read by Slice, included
    (diff,) = record.check
    if passes == "int8":
        assert abs(record.accuracy - report.accuracy_before) <= 0.001 and diff.cosine > 0.9999
    elif passes == "int4":
        assert diff.cosine >= 0.98 and record.accuracy >= report.accuracy_before - 0.02
    else:
        assert record.accuracy is not None  # reported; recovering it is distillation's job


def _position_table_model() -> onnx.ModelProto:
    """ids[N, L] -> Gather(tok) + Slice(pos)[:L] -> MatMul(w) -> y: a position table read
    through Slice (``pos_emb.weight[:seq]``), as exported transformers have it."""
    return _make(
        [
            helper.make_node("Gather", ["tok", "ids"], ["e"], name="embed"),
            helper.make_node("Shape", ["ids"], ["seq"], start=1, end=2),
            helper.make_node("Slice", ["pos", "zero", "seq", "zero"], ["p"], name="positions"),
            helper.make_node("Add", ["e", "p"], ["h"]),
            helper.make_node("MatMul", ["h", "w"], ["y"], name="proj"),
        ],
        [("ids", TensorProto.INT64, ["N", "L"])],
        ["y"],
        {
            "tok": RNG.standard_normal((16, 32)).astype(np.float32),
            "pos": RNG.standard_normal((24, 32)).astype(np.float32),
            "w": RNG.standard_normal((32, 8)).astype(np.float32) / 6,
            "zero": np.zeros(1, np.int64),
        },
    )


@pytest.mark.parametrize(("bits", "axis", "block_size"), [(8, 0, 0), (4, 1, 32)])
def test_position_table_read_by_slice_is_quantised_per_row(bits, axis, block_size):
    original = _position_table_model()
    quantized, result = _quantize(original, bits=bits, block_size=block_size)
    assert result.stats["weights_quantized"] == 3 and result.stats["weights_skipped"] == 0
    dq = _weight_dq(quantized, "positions", 0)
    codes = _initializers(quantized)[dq.input[0]]
    assert codes.dims == [24, 32] and {a.name: a.i for a in dq.attribute}["axis"] == axis
    assert "pos" not in _initializers(quantized)
    ids = RNG.integers(0, 16, (4, 10))
    (want,), (got,) = run_onnx(original, {"ids": ids}), run_onnx(quantized, {"ids": ids})
    limit = 0.02 if bits == 8 else 0.2
    assert np.abs(got - want).max() <= limit * np.abs(want).max()


def test_include_embeddings_false_keeps_the_slice_table_float_too():
    quantized, result = _quantize(_position_table_model(), include_embeddings=False)
    assert {"tok", "pos"} <= _initializers(quantized).keys()
    assert any("include_embeddings=false" in n and "pos" in n for n in result.notes)


def _bn_inits(prefix: str, n: int, var: float | None = None) -> dict[str, np.ndarray]:
    return {
        f"{prefix}.scale": RNG.uniform(0.5, 1.5, n).astype(np.float32),
        f"{prefix}.bias": RNG.uniform(-0.5, 0.5, n).astype(np.float32),
        f"{prefix}.mean": RNG.uniform(-1, 1, n).astype(np.float32),
        f"{prefix}.var": (RNG.uniform(0.5, 2.0, n) if var is None else np.full(n, var)).astype(
            np.float32
        ),
    }


def _bn(prefix: str, x: str, y: str) -> onnx.NodeProto:
    inputs = [x] + [f"{prefix}.{k}" for k in ("scale", "bias", "mean", "var")]
    return helper.make_node("BatchNormalization", inputs, [y], name=prefix)


def _densenet_like_model(var: float | None = None, gamma: float = 1.0) -> onnx.ModelProto:
    """Both BatchNorm layouts of the zoo's DenseNet (Caffe): Conv -> BN -> Mul -> Add (a Scale
    layer) -> Relu, and the pre-activation BN after a Concat, with nothing to fold into:
    Concat -> BN -> Mul -> Add -> Relu -> Conv. ``var`` sets the second BN's variances,
    ``gamma`` multiplies its scales."""
    inits = {
        "w1": RNG.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3,
        "w2": RNG.standard_normal((4, 11, 1, 1)).astype(np.float32) * 0.3,
        "g1": RNG.uniform(0.5, 1.5, (8, 1, 1)).astype(np.float32),
        "b1": RNG.uniform(-0.5, 0.5, (8, 1, 1)).astype(np.float32),
        "g2": RNG.uniform(0.5, 1.5, (11, 1, 1)).astype(np.float32),
        "b2": RNG.uniform(-0.5, 0.5, (11, 1, 1)).astype(np.float32),
        **_bn_inits("bn1", 8),
        **_bn_inits("bn2", 11, var),
    }
    inits["bn2.scale"] *= np.float32(gamma)
    return _make(
        [
            helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
            _bn("bn1", "c1", "n1"),
            helper.make_node("Mul", ["n1", "g1"], ["m1"], name="scale1"),
            helper.make_node("Add", ["m1", "b1"], ["a1"], name="shift1"),
            helper.make_node("Relu", ["a1"], ["r1"], name="relu1"),
            helper.make_node("Concat", ["x", "r1"], ["cat"], name="concat", axis=1),
            _bn("bn2", "cat", "n2"),
            helper.make_node("Mul", ["g2", "n2"], ["m2"], name="scale2"),
            helper.make_node("Add", ["m2", "b2"], ["a2"], name="shift2"),
            helper.make_node("Relu", ["a2"], ["r2"], name="relu2"),
            helper.make_node("Conv", ["r2", "w2"], ["y"], name="conv2"),
        ],
        [("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
        ["y"],
        inits,
        opset=13,
    )


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def test_int8_folds_batchnorm_and_scale_after_conv_and_compacts_the_one_after_concat():
    original = _densenet_like_model()
    quantized, result = _quantize(original)
    ops = _ops(quantized)
    # bn1 + scale1/shift1 went into conv1; bn2 + scale2/shift2 became one x*s+b
    assert "BatchNormalization" not in ops and ops.count("Mul") == 1 and ops.count("Add") == 1
    assert result.stats["batchnorms_folded"] == 1 and result.stats["affines_folded"] == 2
    assert result.stats["batchnorms_compacted"] == 1
    inits = _initializers(quantized)
    vectors = [inits[n] for n in ("bn2_scale", "bn2_shift")]
    assert all(t.data_type == TensorProto.FLOAT16 and list(t.dims) == [11, 1, 1] for t in vectors)
    # 2 float16 vectors where the BN and its Scale layer held 6 float ones
    assert sum(len(t.raw_data) for t in vectors) == 2 * 11 * 2
    assert not {"bn2.scale", "bn2.var", "g2", "b2", "g1", "b1"} & set(inits)
    x = RNG.standard_normal((4, 3, 6, 6)).astype(np.float32)
    (want,), (got,) = run_onnx(original, {"x": x}), run_onnx(quantized, {"x": x})
    assert _cosine(got, want) >= 0.999 and np.abs(got - want).max() <= 0.02 * np.abs(want).max()


def test_batchnorm_compaction_alone_moves_outputs_by_float16_rounding_only():
    original = _densenet_like_model()
    kept, _ = _quantize(original, batchnorm="keep")
    compact, _ = _quantize(original, batchnorm="compact")
    assert _ops(kept).count("BatchNormalization") == 2
    x = RNG.standard_normal((4, 3, 6, 6)).astype(np.float32)
    (want,), (got,) = run_onnx(kept, {"x": x}), run_onnx(compact, {"x": x})
    # the same int8 codes (per-channel scales absorb the folded factors); the s, b vectors
    # carry float16's relative rounding (2**-11) into the last conv
    assert np.abs(got - want).max() <= 2e-3 * np.abs(want).max()


def test_batchnorm_vectors_beyond_float16_range_stay_float32():
    # s = gamma / sqrt(var + 1e-5) > 3e5, beyond float16's 65504
    quantized, result = _quantize(_densenet_like_model(var=0.0, gamma=1000.0))
    inits = _initializers(quantized)
    assert result.stats["batchnorms_compacted"] == 1 and "Cast" not in _ops(quantized)
    assert inits["bn2_scale"].data_type == TensorProto.FLOAT


def test_per_tensor_int8_leaves_batchnorm_unfolded_and_batchnorm_fold_keeps_the_rest():
    _, result = _quantize(_densenet_like_model(), per_channel=False)
    assert result.stats["batchnorms_folded"] == 0 and result.stats["batchnorms_compacted"] == 2
    assert any("per-tensor scales" in n for n in result.notes)
    quantized, result = _quantize(_densenet_like_model(), batchnorm="fold")
    assert _ops(quantized).count("BatchNormalization") == 1  # the one after the Concat


@pytest.mark.parametrize(
    ("name", "ratio"),
    [("shufflenet", 0.27), ("densenet121", 0.26)],  # measured 0.267x and 0.252x
)
def test_int8_zoo_models_shrink_to_about_a_quarter_batchnorms_included(
    name: str, ratio: float, tmp_path: Path
):
    """ShuffleNet's BatchNorms follow grouped Convs; 62 of DenseNet-121's follow a Concat or a
    pooling (nothing to fold into) and 59 more carry a Caffe Scale layer (Mul, Add)."""
    source, output = tmp_path / f"{name}.onnx", tmp_path / "int8.onnx"
    onnx.save(zoo_layout(name), source)
    _, report = onnxcomp.optimize(source, "int8", output=output)
    assert report.file_bytes_after <= ratio * source.stat().st_size
    assert min_cosine(report.records[0].check) >= 0.999  # measured 0.99999 and 0.99985
    ops = {n.op_type for n in onnx.load(output).graph.node}
    assert "BatchNormalization" not in ops


def test_ternary_keeps_batchnorms_for_distillation_to_fine_tune():
    quantized, result = _quantize(_densenet_like_model(), bits=2, scheme="ternary")
    assert _ops(quantized).count("BatchNormalization") == 2
    assert "batchnorms_folded" not in result.stats
    quantized, _ = _quantize(_densenet_like_model(), bits=2, scheme="ternary", batchnorm="compact")
    assert "BatchNormalization" not in _ops(quantized)


@pytest.mark.parametrize(
    ("value", "options"),
    [
        (-np.inf, {}),  # a mask value: no linear code for it
        (np.nan, {}),
        (np.inf, {"bits": 4, "block_size": 16}),
        (np.nan, {"bits": 4, "per_channel": True}),
        (np.nan, {"bits": 8, "symmetric": False}),
        (np.nan, {"bits": 2, "scheme": "binary"}),
        (-np.inf, {"bits": 2, "scheme": "ternary"}),
        (np.nan, {"bits": 2, "scheme": "ternary", "block_size": 16}),
        (np.inf, {"bits": 2, "scheme": "ternary", "ternary_rule": "twn"}),
    ],
)
def test_a_weight_holding_inf_or_nan_stays_float_and_is_said_so(value, options) -> None:
    model = _linear_model()
    w1 = numpy_helper.to_array(_initializers(model)["w1"]).copy()
    w1[3, 5] = value
    model.graph.initializer.remove(_initializers(model)["w1"])
    model.graph.initializer.append(numpy_helper.from_array(w1, "w1"))
    proto, result = _quantize(model, **options)
    assert result.stats["weights_quantized"] == 1 and result.stats["weights_skipped"] == 1
    assert any("holds inf or NaN" in note and "w1" in note for note in result.notes)
    assert _initializers(proto)["w1"].data_type == TensorProto.FLOAT
    np.testing.assert_array_equal(numpy_helper.to_array(_initializers(proto)["w1"]), w1)
    if not options:
        assert _weight_dq(proto, "fc").op_type == "DequantizeLinear"


def test_weights_in_external_data_are_read_ahead_one_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "m.onnx"
    onnx.save_model(_linear_model(), path, save_as_external_data=True, location="m.data",
                    size_threshold=1024)  # fmt: skip
    asked: list[tuple[int, int]] = []
    real_call = io.Prefetcher.__call__

    def prefetch(self: io.Prefetcher, *tensors: ir.TensorProtocol) -> None:
        asked.extend((t.offset, t.length) for t in tensors)
        real_call(self, *tensors)

    monkeypatch.setattr(io.Prefetcher, "__call__", prefetch)
    model = onnxcomp.load(path)
    external = {v.name: v.const_value for v in model.graph.initializers.values()
                if isinstance(v.const_value, ir.ExternalTensor)}  # fmt: skip
    assert sorted(external) == ["w1", "w2"]
    WeightQuantizePass(WeightQuantizeOptions())(model)
    # Each weight once, in the order they are coded (w1 and w2 ahead at the start).
    assert asked == [(t.offset, t.length) for t in (external["w1"], external["w2"])]
