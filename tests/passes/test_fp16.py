"""fp16: float16 weights and activations, fp32 graph I/O, fp32 where float16 overflows.

Tolerances (ONNX Runtime CPU, basic level): on the demo models the fp16 result keeps output
cosine >= 0.9999, max abs error <= 2e-3 * max|output| and the same top-1 accuracy on the eval
split; weight bytes halve exactly and the file shrinks to <= 0.65x (names and shapes do not
shrink).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import onnxcomp
from onnxcomp import chunks
from onnxcomp.data import Dataset, load_data
from onnxcomp.errors import UsageError
from onnxcomp.passes import Float16Options, Float16Pass, fp16
from tests.conftest import MODELS, run_onnx

RNG = np.random.default_rng(0)
DEMOS = [("digits_cnn", "digits"), ("tiny_encoder", "encoder")]


def _make(nodes, inputs, outputs, inits=None, opset=18) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "m",
        [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
        [helper.make_tensor_value_info(n, t, s) for n, t, s in outputs],
        [numpy_helper.from_array(a, n) for n, a in (inits or {}).items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model, full_check=True)
    return model


def _convert(model: onnx.ModelProto, data: dict[str, np.ndarray] | None = None, **options):
    ir_model = ir.serde.deserialize_model(model)
    dataset = Dataset(inputs=data) if data is not None else None
    result = Float16Pass(Float16Options(**options), data=dataset)(ir_model)
    proto = ir.serde.serialize_model(ir_model)
    onnx.checker.check_model(proto, full_check=True)
    return proto, result


def _node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def _value_types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    values = [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    types = {v.name: v.type.tensor_type.elem_type for v in values}
    types.update((t.name, t.data_type) for t in model.graph.initializer)
    return types


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _overflow_model() -> onnx.ModelProto:
    """x[N,8] -> MatMul(w, entries 30000) -> h (|h| ~1e5 and more, beyond 65504) -> Mul(1e-4) ->
    Relu -> y: fine in fp32, inf in fp16."""
    return _make(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
            helper.make_node("Mul", ["h", "s"], ["hs"], name="scale"),
            helper.make_node("Relu", ["hs"], ["y"], name="relu"),
        ],
        [("x", TensorProto.FLOAT, ["N", 8])],
        [("y", TensorProto.FLOAT, ["N", 4])],
        {"w": np.full((8, 4), 30000.0, np.float32), "s": np.array(1e-4, np.float32)},
    )


@pytest.mark.parametrize(("model_name", "data_name"), DEMOS)
def test_demo_models_run_in_fp16_within_tolerance_with_fp32_io(model_name, data_name, tmp_path):
    source = MODELS / f"{model_name}.onnx"
    data = MODELS / f"{data_name}_eval.npz"
    output = tmp_path / "fp16.onnx"
    model, report = onnxcomp.optimize(source, "fp16", data=data, output=output)
    original = onnx.load(source)
    converted = onnx.load(output)
    assert [(v.name, v.type) for v in converted.graph.input] == [
        (v.name, v.type) for v in original.graph.input
    ]
    assert [v.type.tensor_type.elem_type for v in converted.graph.output] == [TensorProto.FLOAT]
    assert {t.data_type for t in converted.graph.initializer} <= {
        TensorProto.FLOAT16, TensorProto.INT64
    }  # fmt: skip
    stats = report.records[0].stats
    assert stats["tensor_bytes_after"] * 2 == stats["tensor_bytes_before"] > 0
    assert stats["nodes_kept_fp32"] == 0
    assert output.stat().st_size <= 0.65 * source.stat().st_size

    dataset = load_data(data, model)
    feeds = dataset.inputs
    (want,), (got,) = run_onnx(original, feeds), run_onnx(converted, feeds)
    assert got.dtype == np.float32 and np.isfinite(got).all()
    assert _cosine(got, want) >= 0.9999
    assert np.abs(got - want).max() <= 2e-3 * np.abs(want).max()
    assert np.mean(got.argmax(1) == dataset.labels) == np.mean(want.argmax(1) == dataset.labels)


def test_keep_io_types_false_makes_graph_inputs_and_outputs_fp16():
    converted, result = _convert(_overflow_model(), keep_io_types=False)
    assert converted.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert converted.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert result.stats["casts_inserted"] == 0
    x = RNG.uniform(-1, 1, (3, 8)).astype(np.float16) / 100
    (got,) = run_onnx(converted, {"x": x})
    assert got.dtype == np.float16


def _fp16_arithmetic(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """Run with onnx's reference evaluator, which computes float16 ops in float16 (as a GPU
    would); ONNX Runtime's CPU provider computes most of them in float32 between Casts."""
    return ReferenceEvaluator(model).run(None, feeds)[0]


def test_intermediate_beyond_fp16_range_on_the_data_keeps_its_ops_fp32():
    original = _overflow_model()
    x = RNG.uniform(0.5, 4.0, (16, 8)).astype(np.float32)  # |h| up to 960000
    converted, result = _convert(original, {"x": x})
    assert result.stats["ops_kept_fp32"] == {"MatMul": 1, "Mul": 1}  # producer and consumer of h
    types = _value_types(converted)
    assert types["w"] == TensorProto.FLOAT and types["h"] == TensorProto.FLOAT
    assert types["hs"] == TensorProto.FLOAT and types["hs.fp16"] == TensorProto.FLOAT16  # Relu
    assert any("reaches" in note and "on the data" in note for note in result.notes)
    want = run_onnx(original, {"x": x})[0]
    for got in (run_onnx(converted, {"x": x})[0], _fp16_arithmetic(converted, {"x": x})):
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, want, rtol=2e-3)


def test_without_data_activations_are_not_probed_and_fp16_arithmetic_overflows():
    converted, result = _convert(_overflow_model())
    assert result.stats["nodes_kept_fp32"] == 0 and not result.stats["activation_probe"]
    assert any("no data" in note for note in result.notes)
    x = RNG.uniform(0.5, 4.0, (4, 8)).astype(np.float32)
    with np.errstate(over="ignore"):
        assert np.isinf(_fp16_arithmetic(converted, {"x": x})).all()  # what the probe prevents


def test_nan_from_a_weight_that_underflows_in_fp16_is_traced_back_and_kept_fp32():
    # 1e-9 is below float16's smallest subnormal: x * 1e-9 becomes 0, Log(0) = -inf.
    original = _make(
        [
            helper.make_node("Mul", ["x", "tiny"], ["small"], name="mul"),
            helper.make_node("Log", ["small"], ["y"], name="log"),
        ],
        [("x", TensorProto.FLOAT, ["N", 4])],
        [("y", TensorProto.FLOAT, ["N", 4])],
        {"tiny": np.array(1e-9, np.float32)},
    )
    x = RNG.uniform(1, 2, (8, 4)).astype(np.float32)
    converted, result = _convert(original, {"x": x})
    assert result.stats["ops_kept_fp32"] == {"Log": 1, "Mul": 1}
    (want,), (got,) = run_onnx(original, {"x": x}), run_onnx(converted, {"x": x})
    np.testing.assert_allclose(got, want, rtol=1e-6)
    unprobed, _ = _convert(original)
    assert np.isneginf(run_onnx(unprobed, {"x": x})[0]).all()  # what the probe prevented


def test_initializer_beyond_fp16_range_stays_fp32_with_its_consumers():
    original = _make(
        [
            helper.make_node("Mul", ["x", "big"], ["h"], name="mul"),
            helper.make_node("Div", ["h", "big"], ["d"], name="div"),
            helper.make_node("Add", ["d", "b"], ["y"], name="add"),
        ],
        [("x", TensorProto.FLOAT, ["N", 4])],
        [("y", TensorProto.FLOAT, ["N", 4])],
        {"big": np.array(1e5, np.float32), "b": np.ones(4, np.float32)},
    )
    converted, result = _convert(original)
    types = _value_types(converted)
    assert types["big"] == TensorProto.FLOAT and types["b"] == TensorProto.FLOAT16
    assert result.stats["ops_kept_fp32"] == {"Div": 1, "Mul": 1}
    assert any("beyond float16's range (1e+05)" in note for note in result.notes)
    x = RNG.standard_normal((3, 4)).astype(np.float32)
    np.testing.assert_allclose(
        run_onnx(converted, {"x": x})[0], run_onnx(original, {"x": x})[0], rtol=1e-3
    )


def test_keep_fp32_and_exclude_put_casts_around_the_ops_they_name():
    original = _make(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
            helper.make_node("Softmax", ["h"], ["p"], name="softmax"),
            helper.make_node("Add", ["p", "b"], ["q"], name="head.add"),
            helper.make_node("Relu", ["q"], ["y"], name="relu"),
        ],
        [("x", TensorProto.FLOAT, ["N", 8])],
        [("y", TensorProto.FLOAT, ["N", 4])],
        {"w": RNG.standard_normal((8, 4)).astype(np.float32), "b": np.ones(4, np.float32)},
    )
    converted, result = _convert(original, keep_fp32=("Softmax",), exclude=("head.*",))
    assert result.stats["ops_kept_fp32"] == {"Add": 1, "Softmax": 1}
    types = _value_types(converted)
    assert types["h"] == TensorProto.FLOAT16 and types["y"] == TensorProto.FLOAT
    assert types["p"] == types["q"] == TensorProto.FLOAT and types["b"] == TensorProto.FLOAT
    assert _node(converted, "softmax").input[0] == "h.fp32"
    # x -> fp16, h -> fp32, q -> fp16, y -> fp32 (graph output)
    assert result.stats["casts_inserted"] == 4
    x = RNG.standard_normal((3, 8)).astype(np.float32)
    np.testing.assert_allclose(
        run_onnx(converted, {"x": x})[0], run_onnx(original, {"x": x})[0], atol=2e-3
    )


def test_constants_and_float_casts_inside_the_region_become_fp16():
    original = _make(
        [
            helper.make_node(
                "Constant",
                [],
                ["c"],
                name="const",
                value=numpy_helper.from_array(np.float32(0.5), "c"),
            ),
            helper.make_node("Constant", [], ["c2"], name="const2", value_floats=[1.0, 2.0]),
            helper.make_node("Shape", ["x"], ["shape"], name="shape"),
            helper.make_node("ConstantOfShape", ["shape"], ["zeros"], name="zeros"),
            helper.make_node("Cast", ["m"], ["mf"], name="cast", to=TensorProto.FLOAT),
            helper.make_node("Mul", ["x", "c"], ["xc"], name="mul"),
            helper.make_node("Add", ["xc", "zeros"], ["s"], name="add"),
            helper.make_node("Mul", ["s", "mf"], ["sm"], name="mask"),
            helper.make_node("Add", ["sm", "c2"], ["y"], name="add2"),
        ],
        [("x", TensorProto.FLOAT, ["N", 2]), ("m", TensorProto.INT64, ["N", 2])],
        [("y", TensorProto.FLOAT, ["N", 2])],
    )
    converted, result = _convert(original)
    assert helper.get_attribute_value(_node(converted, "cast").attribute[0]) == TensorProto.FLOAT16
    for name in ("const", "const2", "zeros"):
        (attr,) = _node(converted, name).attribute
        assert attr.name == "value" and attr.t.data_type == TensorProto.FLOAT16
    types = _value_types(converted)
    assert all(types[v] == TensorProto.FLOAT16 for v in ("c", "c2", "zeros", "mf", "sm"))
    assert result.stats["tensors_converted"] == 2 and result.stats["nodes_kept_fp32"] == 0
    feeds = {"x": RNG.standard_normal((3, 2)).astype(np.float32),
             "m": np.array([[1, 0], [0, 1], [1, 1]], np.int64)}  # fmt: skip
    np.testing.assert_allclose(
        run_onnx(converted, feeds)[0], run_onnx(original, feeds)[0], atol=2e-3
    )


def test_range_and_resize_scales_stay_fp32_where_the_schema_wants_float():
    original = _make(
        [
            helper.make_node("Range", ["start", "limit", "delta"], ["r"], name="range"),
            helper.make_node("Resize", ["x", "", "scales"], ["up"], name="resize", mode="nearest"),
            helper.make_node("Add", ["up", "r"], ["y"], name="add"),
        ],
        [("x", TensorProto.FLOAT, [1, 1, 2, 2])],
        [("y", TensorProto.FLOAT, [1, 1, 4, 4])],
        {
            "start": np.array(0.0, np.float32),
            "limit": np.array(4.0, np.float32),
            "delta": np.array(1.0, np.float32),
            "scales": np.array([1, 1, 2, 2], np.float32),
        },
    )
    converted, result = _convert(original)
    types = _value_types(converted)
    assert types["scales"] == types["start"] == types["r"] == TensorProto.FLOAT
    assert types["up"] == TensorProto.FLOAT16
    assert result.stats["ops_kept_fp32"] == {"Range": 1}
    assert any("does not take float16" in note for note in result.notes)
    x = RNG.standard_normal((1, 1, 2, 2)).astype(np.float32)
    np.testing.assert_allclose(
        run_onnx(converted, {"x": x})[0], run_onnx(original, {"x": x})[0], atol=2e-3
    )


def test_if_subgraphs_stay_fp32_and_are_reported():
    branch = lambda name, op: helper.make_graph(  # noqa: E731
        [helper.make_node(op, ["h", "h"], [f"{name}_out"], name=f"{name}_op")],
        name, [], [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, ["N", 4])],
    )  # fmt: skip
    original = _make(
        [
            helper.make_node("Relu", ["x"], ["h"], name="relu"),
            helper.make_node(
                "If",
                ["flag"],
                ["z"],
                name="if",
                then_branch=branch("then", "Add"),
                else_branch=branch("else", "Mul"),
            ),
            helper.make_node("Add", ["z", "x"], ["y"], name="add"),
        ],
        [("x", TensorProto.FLOAT, ["N", 4]), ("flag", TensorProto.BOOL, [])],
        [("y", TensorProto.FLOAT, ["N", 4])],
    )
    converted, result = _convert(original)
    assert result.stats["ops_kept_fp32"] == {"If": 1}
    assert any("subgraph" in note for note in result.notes)
    x = RNG.standard_normal((3, 4)).astype(np.float32)
    for flag in (True, False):
        feeds = {"x": x, "flag": np.array(flag)}
        np.testing.assert_allclose(
            run_onnx(converted, feeds)[0], run_onnx(original, feeds)[0], atol=5e-3
        )


def test_headroom_below_one_is_rejected():
    with pytest.raises(UsageError, match="headroom"):
        Float16Options(headroom=0.5)


def test_fp16_model_file_loads_in_ort_at_every_optimisation_level(tmp_path: Path):
    import onnxruntime as ort

    output = tmp_path / "enc.onnx"
    onnxcomp.optimize(MODELS / "tiny_encoder.onnx", "fp16", output=output, check="none")
    data = np.load(MODELS / "encoder_eval.npz")
    feeds = {k: data[k][:4] for k in ("input_ids", "attention_mask")}
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                  ort.GraphOptimizationLevel.ORT_ENABLE_ALL):  # fmt: skip
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        session = ort.InferenceSession(str(output), options, providers=["CPUExecutionProvider"])
        assert np.isfinite(session.run(None, feeds)[0]).all()


# The weight cast (ONNX Runtime's Cast on threads, NaN pieces by numpy) and the range check
# (min/max per piece) against plain numpy, bit for bit.


def _reference_half(array: np.ndarray) -> tuple[np.ndarray, int]:
    with np.errstate(over="ignore"):
        new = array.astype(np.float16)
    return new, int(np.count_nonzero((new == 0) & (array != 0)))


def _reference_max_abs(array: np.ndarray) -> float:
    finite = array[np.isfinite(array)]
    return float(np.abs(finite).max()) if finite.size else 0.0


def _bits(*patterns: int) -> np.ndarray:
    values = np.array(patterns, np.uint32)
    return np.concatenate([values, values | np.uint32(0x80000000)]).view(np.float32)


# Around fp16's flush to zero (2**-25 rounds to 0, the next float up to 2**-24), its smallest
# subnormal and normal, its largest value and overflow (65520 rounds to inf), inf, NaNs.
EDGES = _bits(0, 1, 0x00800000, 0x32FFFFFF, 0x33000000, 0x33000001, 0x337FFFFF, 0x33800000,
              0x33C00000, 0x387FE000, 0x387FF000, 0x38800000, 0x477FE000, 0x477FEFFF,
              0x477FF000, 0x477FF001, 0x7F7FFFFF, 0x7F800000, 0x7F800001, 0x7FA00000,
              0x7FC00000, 0x7FC01234, 0x7FFFFFFF)  # fmt: skip


def _half_cases() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    mixed = (rng.standard_normal(5000) * np.exp2(rng.integers(-30, 20, 5000))).astype(np.float32)
    mixed[rng.integers(0, 5000, 40)] = rng.choice(EDGES, 40)
    clean = rng.standard_normal((37, 53)).astype(np.float32)
    clean[3, 5] = np.nan  # NaN in one piece only
    return {
        "edges": EDGES,
        "mixed": mixed,
        "clean_and_one_nan": clean,
        "sweep": np.arange(0, 1 << 32, 65537, dtype=np.uint64).astype(np.uint32).view(np.float32),
        "empty": np.zeros((0, 4), np.float32),
    }


@pytest.mark.parametrize("name", list(_half_cases()))
def test_weight_cast_and_flush_count_equal_numpys(name, monkeypatch):
    monkeypatch.setattr(chunks, "PIECE", 64)  # many pieces and slices, slices on threads
    monkeypatch.setattr(chunks, "SLICE", 448)
    monkeypatch.setattr(fp16, "_SESSION_MIN_SIZE", 0)  # ONNX Runtime's cast, however small
    array = _half_cases()[name]
    new, flushed, peak = fp16._to_half(ir.tensor(array))
    want, want_flushed = _reference_half(array)
    assert new.shape == array.shape and new.dtype == np.float16
    assert new.view(np.uint16).tobytes() == want.view(np.uint16).tobytes()
    assert flushed == want_flushed
    assert fp16._max_abs(array) == peak == _reference_max_abs(array)


def test_weight_cast_of_every_4099th_float32_equals_numpys():
    array = np.arange(0, 1 << 32, 4099, dtype=np.uint64).astype(np.uint32).view(np.float32)
    new, flushed, peak = fp16._to_half(ir.tensor(array))
    want, want_flushed = _reference_half(array)
    assert new.view(np.uint16).tobytes() == want.view(np.uint16).tobytes()
    assert flushed == want_flushed > 0
    assert peak == _reference_max_abs(array)


def test_max_abs_skips_nonfinite_values_wherever_they_are(monkeypatch):
    monkeypatch.setattr(chunks, "PIECE", 8)
    array = np.arange(-50, 50, dtype=np.float32)
    array[[0, 60]] = [-np.inf, np.nan]  # -50 and 10 gone: 49 is the largest |x|
    assert fp16._max_abs(array) == 49.0
    assert fp16._max_abs(np.array([np.nan, -np.inf], np.float32)) == 0.0
    assert fp16._max_abs(np.full(20, -3.5, np.float32)) == 3.5


def test_converted_weights_are_numpys_float16_and_tiny_ones_are_counted():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((16, 8)).astype(np.float32)
    w.reshape(-1)[:7] = [1e-8, -2e-8, 2.9e-8, 2.0**-25, 3e-8, 0.0, np.nan]  # 4 flush to 0
    model = _make(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        [("x", TensorProto.FLOAT, [2, 16])], [("y", TensorProto.FLOAT, [2, 8])], {"w": w},
    )  # fmt: skip
    converted, result = _convert(model)
    (tensor,) = [t for t in converted.graph.initializer if t.name == "w"]
    got = numpy_helper.to_array(tensor)
    assert got.view(np.uint16).tobytes() == w.astype(np.float16).view(np.uint16).tobytes()
    assert result.stats["tiny_flushed"] == 4


def test_cast_slices_on_threads_run_on_the_session_their_binding_came_from(monkeypatch):
    # Two threads making the cached session at once got two sessions, and a binding from one
    # was run on the other ("IOBinding must be used with the session that created it").
    sessions, make = [], fp16._cast_session.__wrapped__

    def fresh_each_time():
        sessions.append(make())
        return sessions[-1]

    monkeypatch.setattr(fp16, "_cast_session", fresh_each_time)
    monkeypatch.setattr(chunks, "SLICE", 1 << 12)  # 16 slices on threads
    array = np.random.default_rng(2).standard_normal(1 << 16).astype(np.float32)
    new, _, _ = fp16._to_half(ir.tensor(array))
    assert new.tobytes() == array.astype(np.float16).tobytes()
    assert len(sessions) == 1


def test_each_weight_is_read_once_and_a_copy_the_plan_leaves_is_dropped(monkeypatch):
    rng = np.random.default_rng(7)
    w1, w2 = (rng.standard_normal((8, 8)).astype(np.float32) for _ in range(2))
    w3 = np.full((8, 8), 1e5, np.float32)  # beyond float16: its MatMul stays fp32
    model = _make(
        [helper.make_node("MatMul", ["x", "w1"], ["a"], name="mm1"),
         helper.make_node("MatMul", ["a", "w2"], ["b"], name="mm2"),
         helper.make_node("MatMul", ["b", "w3"], ["y"], name="mm3")],
        [("x", TensorProto.FLOAT, [2, 8])], [("y", TensorProto.FLOAT, [2, 8])],
        {"w1": w1, "w2": w2, "w3": w3},
    )  # fmt: skip
    monkeypatch.setattr(fp16, "_SESSION_MIN_SIZE", 0)  # the cast that finds the peak as it goes
    reads: list[int] = []
    real_to_half, real_max_abs = fp16._to_half, fp16._max_abs
    monkeypatch.setattr(fp16, "_to_half", lambda t: (reads.append(t.size), real_to_half(t))[1])
    monkeypatch.setattr(fp16, "_max_abs", lambda a: (reads.append(a.size), real_max_abs(a))[1])
    converted, result = _convert(model, exclude=("mm2",))
    assert reads == [64, 64, 64]  # one read of each weight: range and float16 copy together
    inits = {t.name: t for t in converted.graph.initializer}
    assert inits["w1"].data_type == TensorProto.FLOAT16
    # mm2 excluded and mm3 out of range: their weights stay as they were, copies unused.
    assert numpy_helper.to_array(inits["w2"]).tobytes() == w2.tobytes()
    assert numpy_helper.to_array(inits["w3"]).tobytes() == w3.tobytes()
    assert result.stats["tensors_converted"] == 1
    assert any("beyond float16's range" in note for note in result.notes)
