"""Dynamic int8 quantisation: the fusable MatMulInteger form, numerics, shared weights, skips.

Numeric checks run ONNX Runtime at the basic optimisation level (tests.conftest.run_onnx).
Tolerances: the demo encoder keeps output cosine >= 0.99; small Gemm/MatMul models >= 0.999.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxcomp
from onnxcomp.passes import DynamicQuantizeOptions, DynamicQuantizePass
from onnxcomp.target import METADATA_LAYOUT, METADATA_TARGET, resolve_target
from tests.conftest import MODELS, conv_bn_residual_model, run_onnx

RNG = np.random.default_rng(0)


def _quantize(model: onnx.ModelProto | ir.Model, target: str | None = None, **options):
    ir_model = model if isinstance(model, ir.Model) else ir.serde.deserialize_model(model)
    quantize = DynamicQuantizePass(
        DynamicQuantizeOptions(**options), target=resolve_target(target) if target else None
    )
    result = quantize(ir_model)
    proto = ir.serde.serialize_model(ir_model)
    onnx.checker.check_model(proto, full_check=True)
    return proto, result


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_demo_encoder_keeps_cosine_and_onnxruntime_fuses_every_matmul():
    quantized, result = _quantize(onnxcomp.load(MODELS / "tiny_encoder.onnx"))
    stats = result.stats
    assert stats["weights_quantized"] == 13 and stats["ort_int8_kernels"] == 13
    assert stats["weight_bytes_after"] < 0.28 * stats["weight_bytes_before"]
    assert any("tok_emb.weight" in n and "embedding table" in n for n in result.notes)
    ops = {n.op_type for n in quantized.graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops and "Gemm" not in ops
    # Q, K and V projections of a layer share one DynamicQuantizeLinear
    assert stats["activations_quantized"] == 9
    data = np.load(MODELS / "encoder_eval.npz")
    feeds = {k: data[k][:256] for k in ("input_ids", "attention_mask")}
    (want,) = run_onnx(MODELS / "tiny_encoder.onnx", feeds)
    (got,) = run_onnx(quantized, feeds)
    assert _cosine(got, want) >= 0.99
    assert np.mean(got.argmax(1) == want.argmax(1)) >= 0.98


def _gemm_model() -> onnx.ModelProto:
    """x[N,16] -> Gemm(W[12,16], transB, alpha 0.5, beta 2) -> Relu -> MatMul(V) -> y,
    and the same V read by a second MatMul."""
    nodes = [
        helper.make_node("Gemm", ["x", "w", "c"], ["g"], name="fc", transB=1, alpha=0.5, beta=2.0),
        helper.make_node("Relu", ["g"], ["r"]),
        helper.make_node("MatMul", ["r", "v"], ["y"], name="first"),
        helper.make_node("MatMul", ["g", "v"], ["z"], name="second"),
    ]
    graph = helper.make_graph(
        nodes, "gemm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 6]) for n in ("y", "z")],
        [numpy_helper.from_array(RNG.standard_normal((12, 16)).astype(np.float32), "w"),
         numpy_helper.from_array(RNG.standard_normal(12).astype(np.float32), "c"),
         numpy_helper.from_array(RNG.standard_normal((12, 6)).astype(np.float32), "v")],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 10)])


def test_gemm_alpha_beta_and_shared_weight_stay_exact_up_to_quantisation():
    original = _gemm_model()
    quantized, result = _quantize(original)
    assert result.stats["weights_quantized"] == 2
    assert any("from opset 10 to 11" in n for n in result.notes)
    integer = [n for n in quantized.graph.node if n.op_type == "MatMulInteger"]
    assert len(integer) == 3 and integer[1].input[1] == integer[2].input[1]  # v stored once
    inits = {t.name: numpy_helper.to_array(t) for t in quantized.graph.initializer}
    assert inits[integer[0].input[1]].shape == (16, 12)  # transB weight stored as [K, N]
    assert "v" not in inits and "w" not in inits
    x = RNG.standard_normal((5, 16)).astype(np.float32)
    want, got = run_onnx(original, {"x": x}), run_onnx(quantized, {"x": x})
    for a, b in zip(want, got, strict=True):
        assert _cosine(a, b) > 0.999


def test_conv_is_quantised_only_when_asked():
    original = conv_bn_residual_model()
    _, result = _quantize(original)
    assert any("read by Conv, not in op_types" in n for n in result.notes)
    quantized, result = _quantize(original, op_types=("Conv", "MatMul", "Gemm"))
    assert result.stats["nodes_quantized"] == {"Conv": 2, "Gemm": 1, "MatMul": 1}
    assert "ConvInteger" in {n.op_type for n in quantized.graph.node}
    x = RNG.standard_normal((4, 1, 4, 4)).astype(np.float32)
    (want,), (got,) = run_onnx(original, {"x": x}), run_onnx(quantized, {"x": x})
    assert _cosine(got, want) > 0.99


def test_model_already_quantised_is_left_alone_with_a_note():
    once, _ = _quantize(_gemm_model())
    twice, result = _quantize(once)
    assert not result.modified and any("already quantised" in n for n in result.notes)
    assert len(twice.graph.node) == len(once.graph.node)


def test_model_without_value_info_or_node_names_is_quantised():
    """Regression: unnamed nodes gave duplicate node names, and outputs of unknown dtype made
    the pass's own ORT check fail to serialise the model (found in review)."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]),
         helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"])],
        "bare",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])],
        [numpy_helper.from_array(RNG.standard_normal((16, 12)).astype(np.float32), "w1"),
         numpy_helper.from_array(RNG.standard_normal((12, 6)).astype(np.float32), "w2")],
    )  # fmt: skip
    original = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model, report = onnxcomp.optimize(ir.serde.deserialize_model(original), "int8-dynamic")
    assert report.records[0].stats["weights_quantized"] == 2
    assert report.final_check[0].cosine > 0.999
    ops = [n.op_type for n in model.graph]
    assert ops.count("MatMulInteger") == 2 and "MatMul" not in ops


def _weight_codes(model: onnx.ModelProto) -> list[np.ndarray]:
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return [inits[n.input[1]] for n in model.graph.node if n.op_type == "MatMulInteger"]


@pytest.mark.parametrize(
    ("target", "layout", "largest"),
    [("portable", "u8s8-7bit", 63), ("x86-avx2", "u8s8-7bit", 63), ("x86-vnni", "u8s8", 127),
     ("x86-amx", "u8s8", 127), ("arm64", "u8s8", 127)],
)  # fmt: skip
def test_weight_layout_follows_the_target_and_is_recorded(target, layout, largest):
    """7-bit weights where u8*s8 pairs could overflow 16 bits (AVX2 without VNNI, portable)."""
    quantized, result = _quantize(_gemm_model(), target)
    for codes in _weight_codes(quantized):
        assert codes.dtype == np.int8 and np.abs(codes.astype(int)).max() == largest
    assert result.stats["int8_layout"] == layout and result.stats["target"] == target
    metadata = {p.key: p.value for p in quantized.metadata_props}
    assert metadata[METADATA_TARGET] == target and metadata[METADATA_LAYOUT] == layout


def test_u8u8_layout_stores_uint8_weights_around_zero_point_128():
    original = _gemm_model()
    quantized, result = _quantize(original, layout="u8u8")
    assert result.stats["int8_layout"] == "u8u8" and result.stats["ort_int8_kernels"] == 3
    inits = {t.name: numpy_helper.to_array(t) for t in quantized.graph.initializer}
    for node in (n for n in quantized.graph.node if n.op_type == "MatMulInteger"):
        codes, zero = inits[node.input[1]], inits[node.input[3]]
        assert codes.dtype == np.uint8 and np.all(zero == 128)
        assert np.abs(codes.astype(int) - 128).max() == 127
    # u8u8 is exact on every CPU (no 16-bit pair sums), so this holds wherever it runs.
    x = RNG.standard_normal((5, 16)).astype(np.float32)
    for a, b in zip(run_onnx(original, {"x": x}), run_onnx(quantized, {"x": x}), strict=True):
        assert _cosine(a, b) > 0.9995


def test_demo_encoder_keeps_cosine_0999_with_the_layout_this_cpu_gets():
    """The issue's bound on an AVX2-only CPU (where 8-bit weights gave 0.98): the host target
    picks 7-bit weights there and 8-bit ones where the kernels are exact."""
    quantized, result = _quantize(onnxcomp.load(MODELS / "tiny_encoder.onnx"), "host")
    assert result.stats["int8_layout"] == resolve_target("host").dynamic_layout.name
    data = np.load(MODELS / "encoder_eval.npz")
    feeds = {k: data[k][:256] for k in ("input_ids", "attention_mask")}
    (want,) = run_onnx(MODELS / "tiny_encoder.onnx", feeds)
    (got,) = run_onnx(quantized, feeds)
    assert _cosine(got, want) >= 0.999


def test_unknown_layout_is_refused():
    with pytest.raises(onnxcomp.UsageError, match="layout must be one of"):
        DynamicQuantizeOptions(layout="s8s8")
