"""The --data format and random inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcomp.data import load_data, parse_shapes, random_inputs
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
