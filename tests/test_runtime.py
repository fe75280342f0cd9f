"""ONNX Runtime sessions over onnx_ir models (onnxcomp/runtime.py)."""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxcomp
from onnxcomp import runtime


def _external_model(folder: Path) -> Path:
    """x @ W (float32) + DequantizeLinear(int4 codes) + float16 bias cast up, with W, the
    codes and the bias in external data; a Loop body holds an external weight too."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "w")
    codes = numpy_helper.from_array(rng.integers(-8, 8, 8).astype(ml_dtypes.int4), "codes")
    scale = numpy_helper.from_array(np.array(0.5, np.float32), "scale")
    bias = numpy_helper.from_array(rng.standard_normal(8).astype(np.float16), "bias")
    body_w = numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "body_w")
    body = helper.make_graph(
        [helper.make_node("Add", ["acc_in", "body_w"], ["acc_out"]),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, [None, 8])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [None, 8])],
        [body_w],
    )  # fmt: skip
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["m"]),
            helper.make_node("DequantizeLinear", ["codes", "scale"], ["d"]),
            helper.make_node("Cast", ["bias"], ["b"], to=TensorProto.FLOAT),
            helper.make_node("Add", ["m", "d"], ["md"]),
            helper.make_node("Add", ["md", "b"], ["y0"]),
            helper.make_node("Loop", ["trips", "", "y0"], ["y"], body=body),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 8])],
        [w, codes, scale, bias, numpy_helper.from_array(np.array(2, np.int64), "trips")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    path = folder / "m.onnx"
    onnx.save_model(model, path, save_as_external_data=True, location="m.onnx.data",
                    size_threshold=0)  # fmt: skip
    return path


def test_external_weights_reach_onnx_runtime_without_a_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _external_model(tmp_path)
    x = np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32)
    expected = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"x": x}
    )[0]
    model = onnxcomp.load(path)

    def no_copy(*args, **kwargs):
        raise AssertionError("the model's weights were copied into a file for ONNX Runtime")

    monkeypatch.setattr(runtime.ir, "save", no_copy)
    for prepack in (True, False):
        session = runtime.make_session(model, prepack=prepack)
        np.testing.assert_allclose(session.run(None, {"x": x})[0], expected, rtol=1e-6,
                                   atol=1e-6)  # fmt: skip
    # The main graph's weights are handed over as they lie in the file; the INT4 codes (no
    # numpy dtype) and the Loop body's weight are inlined.
    assert all(isinstance(v.const_value, ir.ExternalTensor)
               for v in model.graph.initializers.values())  # fmt: skip
    shared = runtime._shared_weights(model)
    assert shared is not None and sorted(shared[0]) == ["bias", "scale", "trips", "w"]
