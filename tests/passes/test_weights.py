"""Weight finding shared by the passes: one Weight per tensor, every skip explained."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcomp import chunks
from onnxcomp.passes import MagnitudePruneOptions, MagnitudePrunePass
from onnxcomp.passes._weights import all_finite, find_weights, fold_weight_views
from tests.conftest import run_onnx


def _model() -> ir.Model:
    f32 = np.float32
    inits = [
        numpy_helper.from_array(np.ones((4, 4), f32), "shared"),
        numpy_helper.from_array(np.ones((3, 4), f32), "gemm_t"),
        numpy_helper.from_array(np.ones((10, 4), f32), "table"),
        numpy_helper.from_array(np.ones((4, 4), f32), "bias_like"),
        numpy_helper.from_array(np.ones((4, 2), np.int32), "int_w"),
        numpy_helper.from_array(np.ones((4, 4), f32), "skip_me"),
        numpy_helper.from_array(np.ones((2,), f32), "tiny"),
    ]
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
        helper.make_node("MatMul", ["e", "shared"], ["a"], name="mm_a"),
        helper.make_node("MatMul", ["a", "shared"], ["b"], name="mm_b"),
        helper.make_node("Gemm", ["b", "gemm_t"], ["c"], name="gemm", transB=1),
        helper.make_node("MatMul", ["b", "bias_like"], ["d"], name="mm_d"),
        helper.make_node("Add", ["d", "bias_like"], ["d2"], name="add"),
        helper.make_node("MatMul", ["d2", "skip_me"], ["f"], name="head"),
        helper.make_node("MatMul", ["f", "tiny"], ["g"], name="vec"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("c", "g")],
        inits,
    )
    return ir.serde.deserialize_model(helper.make_model(graph))


def test_shared_weight_is_found_once_with_both_consumers():
    weights, _ = find_weights(_model(), exclude=("head",), min_size=3)
    by_name = {w.name: w for w in weights}
    assert [u.node.name for u in by_name["shared"].uses] == ["mm_a", "mm_b"]
    assert by_name["shared"].channel_axis == 1
    assert by_name["gemm_t"].channel_axis == 0  # transB=1: [N, K]
    assert by_name["table"].channel_axis == 0 and by_name["table"].op_types == {"Gather"}


def test_every_skip_has_a_reason():
    weights, skipped = find_weights(_model(), exclude=("head",), min_size=3)
    assert sorted(w.name for w in weights) == ["gemm_t", "shared", "table"]
    reasons = {s.name: s.reason for s in skipped}
    assert reasons == {
        "bias_like": "also read by non-weight inputs (Add)",
        "skip_me": "excluded by pattern",
        "tiny": "2 elements, below min_size 3",
    }  # int_w is not consumed as a weight at all, so it is not weight-like


def test_replace_rewires_every_consumer():
    model = _model()
    weights, _ = find_weights(model, op_types=("MatMul",))
    shared = next(w for w in weights if w.name == "shared")
    new = ir.Value(name="shared_q")
    shared.replace(new)
    assert [n.inputs[1].name for n in model.graph if n.name in ("mm_a", "mm_b")] == [
        "shared_q",
        "shared_q",
    ]


def _sliced_table_model() -> ir.Model:
    """A float position table and an int64 constant, both read through Slice, and a MatMul."""
    inits = [
        numpy_helper.from_array(np.arange(48, dtype=np.float32).reshape(12, 4), "pos"),
        numpy_helper.from_array(np.arange(6, dtype=np.int64), "shape_like"),
        numpy_helper.from_array(np.ones((4, 4), np.float32), "w"),
        numpy_helper.from_array(np.array([0], np.int64), "zero"),
        numpy_helper.from_array(np.array([3], np.int64), "three"),
    ]
    nodes = [
        helper.make_node("Slice", ["pos", "zero", "three", "zero"], ["p"], name="rows"),
        helper.make_node("Slice", ["shape_like", "zero", "three"], ["s"], name="dims"),
        helper.make_node("MatMul", ["p", "w"], ["y"], name="mm"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("s", TensorProto.INT64, None)],
        inits,
    )  # fmt: skip
    return ir.serde.deserialize_model(helper.make_model(graph))


def test_slice_table_is_a_weight_only_when_slice_is_asked_for():
    weights, skipped = find_weights(_sliced_table_model())
    assert [w.name for w in weights] == ["w"] and not skipped  # default: no Slice
    weights, skipped = find_weights(_sliced_table_model(), ("MatMul", "Slice"))
    by_name = {w.name: w for w in weights}
    assert sorted(by_name) == ["pos", "w"] and not skipped  # the int64 Slice input is no weight
    assert by_name["pos"].channel_axis == 0 and by_name["pos"].op_types == {"Slice"}


def test_pruning_leaves_slice_tables_alone():
    model = _sliced_table_model()
    before = model.graph.initializers["pos"].const_value.numpy().copy()
    options = MagnitudePruneOptions(sparsity=0.9, skip_first=False, skip_last=False)
    MagnitudePrunePass(options)(model)
    np.testing.assert_array_equal(model.graph.initializers["pos"].const_value.numpy(), before)
    assert (model.graph.initializers["w"].const_value.numpy() == 0).mean() >= 0.5


def _caffe2_style() -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """A classifier weight stored flat and reshaped before its Gemm, and a per-channel scale
    unsqueezed before a Mul, as Caffe2-era zoo models have them."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 8)).astype(np.float32)
    scale = rng.uniform(0.5, 1.5, 5).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["w_flat", "w_shape"], ["w"]),
         helper.make_node("Gemm", ["x", "w"], ["g"], transB=1),
         helper.make_node("Unsqueeze", ["scale"], ["scale2"], axes=[0]),
         helper.make_node("Mul", ["g", "scale2"], ["y"])],
        "caffe2",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        [numpy_helper.from_array(w.reshape(-1), "w_flat"),
         numpy_helper.from_array(np.array([5, 8], np.int64), "w_shape"),
         numpy_helper.from_array(scale, "scale")],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)]), w, scale


def test_reshaped_and_unsqueezed_weights_are_folded_into_initializers():
    proto, w, scale = _caffe2_style()
    model = ir.serde.deserialize_model(proto)
    assert fold_weight_views(model) == 2
    assert [n.op_type for n in model.graph] == ["Gemm", "Mul"]
    weights, _ = find_weights(model)
    assert [weight.shape for weight in weights] == [(5, 8)]
    np.testing.assert_array_equal(weights[0].array, w)
    mul_scale = next(n for n in model.graph if n.op_type == "Mul").inputs[1].const_value.numpy()
    np.testing.assert_array_equal(mul_scale, scale[None, :])
    x = np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)
    np.testing.assert_allclose(run_onnx(ir.serde.serialize_model(model), {"x": x})[0],
                               run_onnx(proto, {"x": x})[0], rtol=1e-6)  # fmt: skip


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", [0, 1000, 2047, -1])
def test_all_finite_finds_one_bad_value_in_any_piece(
    bad: float, where: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(chunks, "PIECE", 64)  # 32 pieces, 4 slices over the threads
    monkeypatch.setattr(chunks, "SLICE", 512)
    array = np.random.default_rng(0).standard_normal((32, 64)).astype(np.float16)
    assert all_finite(array)
    array.reshape(-1)[where] = bad
    assert not all_finite(array)
    assert not all_finite(array[:, ::-1])  # a strided view is read as a copy, same answer


def test_all_finite_of_empty_and_integer_arrays() -> None:
    assert all_finite(np.zeros((0, 3), np.float32)) and all_finite(np.arange(5))
