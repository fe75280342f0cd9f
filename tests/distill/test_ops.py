"""The interpreter's op table against ONNX Runtime, one tricky case per test.

Each case is a one-node model run in ONNX Runtime (basic optimisations) and in
:class:`OnnxModule`; outputs must agree to 1e-5 (exactly, for integer outputs).
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")

import onnx_ir as ir  # noqa: E402

from onnxcomp.distill import OnnxModule, UnsupportedOpError  # noqa: E402
from onnxcomp.errors import UnsupportedModelError  # noqa: E402
from tests.conftest import run_onnx  # noqa: E402

RNG = np.random.default_rng(0)
BIG = np.iinfo(np.int64).max
_ONNX_TYPES = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.int64): TensorProto.INT64,
    np.dtype(np.int32): TensorProto.INT32,
    np.dtype(np.bool_): TensorProto.BOOL,
    np.dtype(np.uint8): TensorProto.UINT8,
    np.dtype(np.int8): TensorProto.INT8,
}


def _randn(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def _i64(*values: int) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)


def _check(
    op: str,
    inputs: dict[str, np.ndarray],
    consts: dict[str, np.ndarray] | None = None,
    *,
    outputs: tuple[str, ...] = ("y",),
    out_types: tuple[int, ...] = (TensorProto.FLOAT,),
    opset: int = 18,
    order: tuple[str, ...] | None = None,
    atol: float = 1e-5,
    **attrs,
) -> list[np.ndarray]:
    """Run one ``op`` node in ONNX Runtime and in OnnxModule; assert they agree."""
    consts = consts or {}
    names = order or (*inputs, *consts)
    node = helper.make_node(op, list(names), list(outputs), name="node", **attrs)
    graph = helper.make_graph(
        [node],
        "op",
        [
            helper.make_tensor_value_info(n, _ONNX_TYPES[a.dtype], a.shape)
            for n, a in inputs.items()
        ],
        [
            helper.make_tensor_value_info(n, t, None)
            for n, t in zip(outputs, out_types, strict=True)
        ],
        [numpy_helper.from_array(a, n) for n, a in consts.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    expected = run_onnx(model, inputs)
    module = OnnxModule(ir.serde.deserialize_model(model))
    with torch.no_grad():
        got = module(**{n: torch.from_numpy(a) for n, a in inputs.items()})
    for e, g in zip(expected, got, strict=True):
        g = g.numpy()
        assert g.shape == e.shape, (g.shape, e.shape)
        if np.issubdtype(e.dtype, np.floating):
            np.testing.assert_allclose(g, e, atol=atol, rtol=1e-5)
        else:
            np.testing.assert_array_equal(g, e)
    return expected


@pytest.mark.parametrize(
    ("shape", "target", "allowzero"),
    [
        ((2, 3, 4), (0, -1), 0),
        ((2, 3, 4), (-1, 0, 2), 0),
        ((0, 4), (0, 2, 2), 1),
        ((2, 3, 4), (4, 6), 1),
    ],
)
def test_reshape_zero_and_minus_one(shape, target, allowzero):
    x = np.zeros(shape, np.float32) if 0 in shape else _randn(*shape)
    _check("Reshape", {"x": x}, {"s": _i64(*target)}, allowzero=allowzero)


@pytest.mark.parametrize(
    ("starts", "ends", "axes", "steps"),
    [
        ((1, -3), (BIG, -1), (0, 2), (1, 1)),
        ((-1,), (-BIG,), (1,), (-1,)),
        ((10,), (-100,), (-1,), (-2,)),
        ((0, 1), (5, 100), (0, 1), (2, 3)),
        ((-100,), (100,), (2,), (1,)),
    ],
)
def test_slice_negative_and_large_bounds(starts, ends, axes, steps):
    _check(
        "Slice",
        {"x": _randn(5, 6, 7)},
        {"s": _i64(*starts), "e": _i64(*ends), "a": _i64(*axes), "t": _i64(*steps)},
    )


def test_slice_opset9_attributes():
    _check("Slice", {"x": _randn(4, 5)}, opset=9, starts=[1, -2], ends=[BIG, 5], axes=[0, 1])


@pytest.mark.parametrize(("indices", "axis"), [(_i64(0, -1, 2, -3), 0), (_i64(-1), 1), (None, 1)])
def test_gather_negative_indices(indices, axis):
    idx = np.asarray(-2, np.int64) if indices is None else indices
    _check("Gather", {"x": _randn(4, 5, 3), "i": idx}, axis=axis)


def test_gather_scalar_from_a_shape_vector():
    """Regression: Shape -> Gather(scalar index) gives a 0-d tensor (torch reshape() needs ())."""
    _check(
        "Gather",
        {"x": _i64(4, 7, 9), "i": np.asarray(-2, np.int64)},
        out_types=(TensorProto.INT64,),
    )


def test_gather_elements_negative_indices():
    _check("GatherElements", {"x": _randn(3, 4), "i": RNG.integers(-4, 4, (3, 2))}, axis=1)


def test_where_broadcasts():
    cond = RNG.random((3, 1, 4)) > 0.5
    _check("Where", {"c": cond, "a": _randn(2, 4), "b": _randn(3, 2, 1)})


def test_expand_bidirectional():
    _check("Expand", {"x": _randn(3, 1, 5)}, {"s": _i64(2, 1, 4, 1)})


def test_einsum():
    _check("Einsum", {"a": _randn(2, 3, 4), "b": _randn(2, 4, 5)}, equation="bij,bjk->bik")


@pytest.mark.parametrize(("trans_a", "trans_b"), [(0, 0), (1, 0), (0, 1), (1, 1)])
def test_gemm_transpose_alpha_beta(trans_a, trans_b):
    a = _randn(4, 3) if not trans_a else _randn(3, 4)
    b = _randn(3, 5) if not trans_b else _randn(5, 3)
    _check(
        "Gemm",
        {"a": a},
        {"b": b, "c": _randn(1, 5)},
        transA=trans_a,
        transB=trans_b,
        alpha=0.5,
        beta=2.0,
    )


@pytest.mark.parametrize(
    "attrs",
    [
        {"pads": [1, 0, 2, 1], "strides": [2, 1]},
        {"dilations": [2, 2], "pads": [2, 2, 2, 2]},
        {"group": 2, "strides": [2, 2]},
        {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
        {"auto_pad": "SAME_LOWER", "strides": [2, 2]},
    ],
)
def test_conv_pads_strides_dilations_groups(attrs):
    group = attrs.get("group", 1)
    _check(
        "Conv",
        {"x": _randn(2, 4, 9, 8)},
        {"w": _randn(6, 4 // group, 3, 3), "b": _randn(6)},
        atol=1e-4,
        **attrs,
    )


def test_conv1d():
    _check("Conv", {"x": _randn(2, 3, 11)}, {"w": _randn(5, 3, 4)}, pads=[1, 2], strides=[2])


@pytest.mark.parametrize(
    "attrs",
    [
        {"strides": [2, 2], "pads": [1, 0, 0, 1], "output_padding": [1, 1]},
        {"strides": [2, 1], "group": 2},
        {"strides": [2, 2], "output_shape": [10, 9]},
        {"strides": [2, 2], "auto_pad": "SAME_UPPER"},
    ],
)
def test_conv_transpose(attrs):
    group = attrs.get("group", 1)
    _check(
        "ConvTranspose",
        {"x": _randn(2, 4, 5, 4)},
        {"w": _randn(4, 6 // group, 3, 3), "b": _randn(6)},
        atol=1e-4,
        **attrs,
    )


@pytest.mark.parametrize(
    "attrs",
    [
        {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1},
        {"kernel_shape": [3, 2], "strides": [2, 2], "pads": [1, 0, 1, 1], "ceil_mode": 1},
        {"kernel_shape": [2, 2], "strides": [3, 3], "pads": [0, 0, 1, 1], "ceil_mode": 1},
        {"kernel_shape": [3, 3], "dilations": [2, 1], "pads": [1, 1, 1, 1]},
        {"kernel_shape": [3, 3], "auto_pad": "SAME_UPPER", "strides": [2, 2]},
    ],
)
def test_max_pool_ceil_mode_and_pads(attrs):
    _check("MaxPool", {"x": _randn(2, 3, 8, 7)}, **attrs)


@pytest.mark.parametrize("count_include_pad", [0, 1])
@pytest.mark.parametrize(
    "attrs",
    [
        {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1},
        {"kernel_shape": [3, 2], "strides": [2, 2], "pads": [1, 0, 1, 1], "ceil_mode": 1},
        {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]},
        {"kernel_shape": [2, 2], "strides": [2, 2]},
    ],
)
def test_average_pool_ceil_mode_and_pads(attrs, count_include_pad):
    _check("AveragePool", {"x": _randn(2, 3, 8, 7)}, count_include_pad=count_include_pad, **attrs)


def test_global_pools():
    _check("GlobalAveragePool", {"x": _randn(2, 3, 5, 4)})
    _check("GlobalMaxPool", {"x": _randn(2, 3, 5, 4)})


@pytest.mark.parametrize("axis", [-1, 1, 2])
def test_layer_normalization_axis(axis):
    x = _randn(2, 3, 4, 5)
    shape = x.shape[axis:]
    _check(
        "LayerNormalization",
        {"x": x},
        {"s": _randn(*shape), "b": _randn(*shape)},
        axis=axis,
        epsilon=1e-3,
    )


def test_batch_and_instance_normalization():
    x, c = _randn(2, 3, 4, 5), 3
    stats = {"s": _randn(c), "b": _randn(c), "m": _randn(c), "v": RNG.random(c, np.float32) + 0.5}
    _check("BatchNormalization", {"x": x}, stats, epsilon=1e-3)
    _check("InstanceNormalization", {"x": x}, {"s": _randn(c), "b": _randn(c)})


@pytest.mark.parametrize(("opset", "axis"), [(18, 1), (18, -1), (11, 1), (11, 2)])
def test_softmax_axis_and_old_coercion(opset, axis):
    _check("Softmax", {"x": _randn(2, 3, 4)}, opset=opset, axis=axis)
    _check("LogSoftmax", {"x": _randn(2, 3, 4)}, opset=opset, axis=axis)


def test_split_uneven_num_outputs_and_sizes():
    outs, types = ("a", "b", "c"), (TensorProto.FLOAT,) * 3
    _check("Split", {"x": _randn(7, 2)}, outputs=outs, out_types=types, num_outputs=3)
    _check(
        "Split",
        {"x": _randn(2, 7)},
        {"s": _i64(1, 4, 2)},
        outputs=outs,
        out_types=types,
        axis=1,
        opset=13,
    )
    _check("Split", {"x": _randn(6, 2)}, outputs=outs, out_types=types, opset=11)


def test_squeeze_unsqueeze_attribute_and_input_forms():
    x = _randn(3, 1, 4, 1)
    _check("Squeeze", {"x": x}, opset=11, axes=[1, -1])
    _check("Squeeze", {"x": x}, {"a": _i64(-1)}, opset=13)
    _check("Squeeze", {"x": x}, opset=13)
    _check("Unsqueeze", {"x": _randn(3, 4)}, opset=11, axes=[0, -1])
    _check("Unsqueeze", {"x": _randn(3, 4)}, {"a": _i64(-1, 1)}, opset=13)


@pytest.mark.parametrize(
    ("op", "opset", "attrs", "axes"),
    [
        ("ReduceMean", 11, {"axes": [1, -1], "keepdims": 0}, None),
        ("ReduceSum", 13, {"keepdims": 1}, _i64(0, 2)),
        ("ReduceSum", 13, {"noop_with_empty_axes": 1}, None),
        ("ReduceMax", 18, {"keepdims": 0}, _i64(-1)),
        ("ReduceMin", 18, {}, None),
        ("ReduceProd", 18, {"keepdims": 0}, _i64(1)),
        ("ReduceL2", 18, {}, _i64(2)),
        ("ReduceLogSumExp", 18, {"keepdims": 0}, _i64(0, 1)),
    ],
)
def test_reductions(op, opset, attrs, axes):
    consts = {"a": axes} if axes is not None else {}
    _check(op, {"x": _randn(3, 4, 5)}, consts, opset=opset, **attrs)


def test_argmax_select_last_index():
    x = np.asarray([[1, 3, 3, 0], [2, 2, 1, 2]], np.float32)
    _check("ArgMax", {"x": x}, out_types=(TensorProto.INT64,), axis=1, select_last_index=1)
    _check("ArgMin", {"x": x}, out_types=(TensorProto.INT64,), axis=0, keepdims=0)


@pytest.mark.parametrize(
    ("mode", "pads"),
    [("constant", (1, 2, 0, 1)), ("reflect", (0, 2, 0, 1)), ("edge", (2, 0, 1, 3))],
)
def test_pad_modes(mode, pads):
    _check("Pad", {"x": _randn(4, 5)}, {"p": _i64(*pads)}, mode=mode)


def test_pad_axes_and_value():
    _check(
        "Pad",
        {"x": _randn(2, 4, 5)},
        {"p": _i64(1, 2), "v": np.float32(3.0), "a": _i64(-1)},
        order=("x", "p", "v", "a"),
    )


@pytest.mark.parametrize("opset", [6, 11, 13])
def test_clip_forms(opset):
    x = _randn(3, 4)
    if opset == 6:
        _check("Clip", {"x": x}, opset=6, min=-0.5, max=0.7)
    else:
        _check("Clip", {"x": x}, {"lo": np.float32(-0.5)}, opset=opset)
        _check("Clip", {"x": x}, {"lo": np.float32(-0.5), "hi": np.float32(0.3)}, opset=opset)


def test_integer_arithmetic_keeps_onnx_semantics():
    a, b = _i64(-7, 7, -8, 5), _i64(2, -2, 3, 5)
    out = (TensorProto.INT64,)
    _check("Div", {"a": a, "b": b}, out_types=out)
    _check("Mod", {"a": a, "b": b}, out_types=out)
    _check("Mod", {"a": a, "b": b}, out_types=out, fmod=1)
    _check(
        "Cast", {"x": np.asarray([-1.7, 2.5, 0.4], np.float32)}, out_types=out, to=TensorProto.INT64
    )


def test_shape_range_constant_of_shape_tile():
    x = _randn(3, 4, 5)
    _check("Shape", {"x": x}, out_types=(TensorProto.INT64,), start=1, end=-1)
    _check("Size", {"x": x}, out_types=(TensorProto.INT64,))
    _check(
        "Range",
        {"s": _i64(2).reshape(()), "l": _i64(11).reshape(()), "d": _i64(3).reshape(())},
        out_types=(TensorProto.INT64,),
    )
    value = numpy_helper.from_array(np.asarray([1.5], np.float32))
    _check("ConstantOfShape", {"s": _i64(2, 3)}, value=value)
    _check("Tile", {"x": _randn(2, 3)}, {"r": _i64(2, 1)})


def test_cumsum_trilu_onehot_free_ops():
    _check("CumSum", {"x": _randn(3, 4)}, {"a": np.asarray(1, np.int64)}, exclusive=1, reverse=1)
    _check("Trilu", {"x": _randn(4, 5)}, {"k": np.asarray(-1, np.int64)}, upper=0)


@pytest.mark.parametrize(
    ("op", "opset", "attrs"),
    [
        ("HardSwish", 18, {}),
        ("HardSigmoid", 18, {"alpha": 0.3, "beta": 0.4}),
        ("Gelu", 20, {"approximate": "tanh"}),
        ("Gelu", 20, {}),
        ("Erf", 18, {}),
        ("LeakyRelu", 18, {"alpha": 0.2}),
        ("Elu", 18, {"alpha": 0.5}),
        ("Selu", 18, {}),
        ("Softplus", 18, {}),
        ("Sigmoid", 18, {}),
        ("Tanh", 18, {}),
        ("Round", 18, {}),
    ],
)
def test_activations(op, opset, attrs):
    x = np.concatenate([_randn(20) * 4, np.asarray([0.5, 1.5, -2.5, 2.5], np.float32)])
    _check(op, {"x": x}, opset=opset, **attrs)


def test_prelu_and_variadic():
    _check("PRelu", {"x": _randn(2, 3, 4)}, {"s": _randn(3, 1)})
    _check("Max", {"a": _randn(3, 1), "b": _randn(4), "c": _randn(1, 4)})
    _check("Sum", {"a": _randn(3, 1), "b": _randn(4), "c": _randn(1, 4)})


def test_activation_quantize_dequantize_round_trip():
    x = _randn(3, 8)
    qdq = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
    ]
    graph = helper.make_graph(
        qdq,
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [
            numpy_helper.from_array(np.float32(0.02), "s"),
            numpy_helper.from_array(np.uint8(120), "z"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    module = OnnxModule(ir.serde.deserialize_model(model))
    xt = torch.from_numpy(x).requires_grad_()
    (y,) = module(xt)
    np.testing.assert_allclose(y.detach().numpy(), run_onnx(model, {"x": x})[0], atol=1e-6)
    y.sum().backward()
    assert xt.grad is not None and xt.grad.abs().sum() > 0  # straight-through


def test_unsupported_ops_listed_at_construction():
    nodes = [
        helper.make_node("RandomNormalLike", ["x"], ["r"], name="random"),
        helper.make_node("Bernoulli", ["r"], ["t"], name="coin"),
        helper.make_node("FusedMatMul", ["t", "t"], ["y"], domain="com.microsoft", name="f"),
        helper.make_node("RandomNormalLike", ["y"], ["z"], name="random2"),
    ]
    graph = helper.make_graph(
        nodes,
        "bad",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    )
    with pytest.raises(UnsupportedOpError) as info:
        OnnxModule(ir.serde.deserialize_model(model))
    message = str(info.value)
    assert "RandomNormalLike (2)" in message and "Bernoulli (1)" in message
    assert "com.microsoft::FusedMatMul (1)" in message
    assert isinstance(info.value, UnsupportedModelError)
    assert info.value.missing == {
        "RandomNormalLike": 2,
        "Bernoulli": 1,
        "com.microsoft::FusedMatMul": 1,
    }


@pytest.mark.parametrize("storage_order", [0, 1])
def test_max_pool_indices_match_onnxruntime(storage_order):
    """Indices count over the whole unpadded tensor (row- or column-major), as ONNX says."""
    _check(
        "MaxPool",
        {"x": _randn(2, 3, 5, 6)},
        outputs=("y", "i"),
        out_types=(TensorProto.FLOAT, TensorProto.INT64),
        kernel_shape=[3, 2],
        pads=[1, 0, 1, 1],
        strides=[2, 2],
        storage_order=storage_order,
    )


def test_random_dropout_in_training_mode_is_refused():
    node = helper.make_node("Dropout", ["x", "r", "t"], ["y"], name="drop")
    graph = helper.make_graph(
        [node],
        "drop",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
            helper.make_tensor_value_info("t", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.asarray(0.5, np.float32), "r")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    with pytest.raises(UnsupportedOpError, match="Dropout 'drop': training_mode"):
        OnnxModule(ir.serde.deserialize_model(model))


def test_constant_nodes_and_unsorted_graph():
    """Weights in Constant nodes become parameters; nodes stored out of order still run."""
    w = _randn(4, 3)
    nodes = [
        helper.make_node("Relu", ["h"], ["y"], name="relu"),
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        helper.make_node("Constant", [], ["w"], name="wc", value=numpy_helper.from_array(w)),
    ]
    graph = helper.make_graph(
        nodes,
        "c",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = ir.serde.deserialize_model(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    )
    module = OnnxModule(model)
    assert dict(module.named_onnx_parameters()).keys() == {"w"}
    x = _randn(2, 4)
    np.testing.assert_allclose(
        module(torch.from_numpy(x))[0].detach().numpy(), np.maximum(x @ w, 0), atol=1e-6
    )
    with torch.no_grad():
        module.parameter("w").mul_(2)
    module.write_back(model)
    written = model.graph.node(2).attributes["value"].as_tensor().numpy()
    np.testing.assert_allclose(written, 2 * w)


def test_constant_value_floats_bias_is_trained_and_written_back_as_a_tensor():
    nodes = [
        helper.make_node("Constant", [], ["b"], name="bc", value_floats=[0.5, -1.0, 2.0]),
        helper.make_node("Add", ["x", "b"], ["y"], name="add"),
    ]
    graph = helper.make_graph(
        nodes,
        "c",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = ir.serde.deserialize_model(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    )
    module = OnnxModule(model)
    with torch.no_grad():
        module.parameter("b").add_(1.0)
    module.write_back(model)
    x = _randn(2, 3)
    proto = ir.serde.serialize_model(model)
    np.testing.assert_allclose(
        run_onnx(proto, {"x": x})[0], x + np.float32([1.5, 0.0, 3.0]), atol=1e-6
    )
    assert list(model.graph.node(0).attributes) == ["value"]


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_max_roi_pool_matches_onnxruntime(scale):
    """No backend node test covers MaxRoiPool: ONNX Runtime is the reference."""
    rois = np.asarray([[0, 1, 1, 6, 5], [1, 0, 2, 3, 7], [0, 4.4, 0.6, 7, 7]], np.float32)
    _check("MaxRoiPool", {"x": _randn(2, 3, 8, 8), "rois": rois}, pooled_shape=[2, 3],
           spatial_scale=scale)  # fmt: skip
