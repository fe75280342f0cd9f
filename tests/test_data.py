"""The --data format and random inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcomp.data import Dataset, load_data, parse_shapes, random_inputs, rows_of, static_batch
from onnxcomp.errors import OnnxcompError, UsageError
from tests.conftest import mlp_model


def _token_model() -> ir.Model:
    table = numpy_helper.from_array(np.zeros((50, 4), np.float32), "table")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["emb"]),
         helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
         helper.make_node("Unsqueeze", ["m", "axes"], ["m3"]),
         helper.make_node("Mul", ["emb", "m3"], ["y"])],
        "tokens",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", "L"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["N", "L"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "L", 4])],
        [table, numpy_helper.from_array(np.array([2], np.int64), "axes")],
    )  # fmt: skip
    return ir.serde.deserialize_model(helper.make_model(graph))


def test_random_token_ids_stay_inside_the_embedding_table():
    data = random_inputs(_token_model(), {"ids": (3, 200)})
    assert data.inputs["ids"].shape == (3, 200)
    assert data.inputs["ids"].max() < 50 and data.inputs["ids"].max() > 2
    assert np.all(data.inputs["attention_mask"] == 1)
    assert data.inputs["attention_mask"].shape == (2, 32)  # the stated defaults
    assert "ids=3x200" in data.description and "attention_mask=2x32" in data.description


def test_load_data_casts_safe_integer_widths(tmp_path: Path):
    path = tmp_path / "d.npz"
    np.savez(path, ids=np.ones((4, 7), np.int32), attention_mask=np.ones((4, 7), np.int64),
             labels=np.arange(4))  # fmt: skip
    data = load_data(path, _token_model())
    assert data.inputs["ids"].dtype == np.int64
    assert data.num_samples == 4 and list(data.labels) == [0, 1, 2, 3]
    assert [b["ids"].shape[0] for b in data.batches(3)] == [3, 1]


@pytest.mark.parametrize(
    ("arrays", "needle"),
    [
        ({"x": np.zeros((4, 9), np.float32)}, "axis 1, the model expects 8"),
        ({"x": np.zeros((4, 8, 1), np.float32)}, "rank 3, the model expects 2"),
        ({"x": np.zeros((4, 8), np.complex64)}, "is complex64"),
        ({"x": np.zeros((4, 8), np.float32), "labels": np.zeros(3)}, "labels has 3 rows"),
        ({"y": np.zeros((4, 8), np.float32)}, "missing x; unexpected y"),
    ],
)
def test_data_that_does_not_fit_the_model_is_refused(tmp_path: Path, arrays, needle: str):
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    with pytest.raises(OnnxcompError, match=needle):
        load_data(path, ir.serde.deserialize_model(mlp_model()))


def test_not_an_npz_file(tmp_path: Path):
    path = tmp_path / "d.npz"
    path.write_bytes(b"not a zip")
    with pytest.raises(OnnxcompError, match=r"not a readable \.npz"):
        load_data(path, ir.serde.deserialize_model(mlp_model()))


def test_parse_shapes():
    assert parse_shapes(["input_ids=1x128", "x=3"]) == {"input_ids": (1, 128), "x": (3,)}
    with pytest.raises(UsageError, match="NAME=DIMxDIM"):
        parse_shapes(["input_ids=1xabc"])


def test_onnx_helper_model_roundtrip_is_valid():
    onnx.checker.check_model(mlp_model(), full_check=True)


def _scalar_model(batch_dim: int | str = "N") -> ir.Model:
    """y = x * scale, ``scale`` a 0-d input."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "scale"], ["y"])],
        "scaled",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch_dim, 3]),
         helper.make_tensor_value_info("scale", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch_dim, 3])],
    )  # fmt: skip
    return ir.serde.deserialize_model(helper.make_model(graph))


def test_scalar_inputs_are_the_same_in_every_batch():
    dataset = Dataset({"scale": np.asarray(np.float32(2)), "x": np.ones((5, 3), np.float32)})
    assert dataset.num_samples == 5
    batches = list(dataset.batches(2))
    assert [b["x"].shape for b in batches] == [(2, 3), (2, 3), (1, 3)]
    assert all(b["scale"].shape == () and b["scale"] == 2 for b in batches)


def test_only_scalar_inputs_make_one_sample():
    dataset = Dataset({"a": np.asarray(1.0), "b": np.asarray(2.0)})
    assert dataset.num_samples == 1
    assert len(list(dataset.batches(16))) == 1


def test_random_scalar_inputs_are_0d_arrays():
    """numpy's generators return Python/NumPy scalars for shape (); ONNX Runtime wants arrays."""
    data = random_inputs(_scalar_model())
    assert isinstance(data.inputs["scale"], np.ndarray) and data.inputs["scale"].shape == ()
    assert "scale=scalar" in data.description


def test_data_file_may_hold_a_scalar_for_a_scalar_input(tmp_path: Path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.ones((4, 3), np.float32), scale=np.float32(3))
    dataset = load_data(path, _scalar_model())
    assert dataset.num_samples == 4 and dataset.inputs["scale"].shape == ()


def test_data_file_scalar_for_an_array_input_is_refused(tmp_path: Path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.float32(1), scale=np.float32(3))
    with pytest.raises(OnnxcompError, match=r"'x' is a single value \(0-d\), the model expects"):
        load_data(path, _scalar_model())


def test_minus_one_dims_are_dynamic():
    """Paddle2ONNX writes dynamic dims as dim_value -1 (regression: 'negative dimensions')."""
    model = _scalar_model(batch_dim=-1)
    assert static_batch(model) is None
    assert random_inputs(model).inputs["x"].shape == (2, 3)


def test_rows_of_keeps_scalars_whole():
    rows = rows_of({"x": np.arange(6).reshape(3, 2), "s": np.asarray(7)}, np.array([2, 0]))
    np.testing.assert_array_equal(rows["x"], [[4, 5], [0, 1]])
    assert rows["s"] == 7
