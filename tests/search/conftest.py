"""A small classifier with one deliberately fragile layer, and data files for it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.conftest import run_onnx

SAMPLES = 240


def fragile_mlp() -> onnx.ModelProto:
    """x[N,16] -> Gemm w1 -> Relu -> Gemm w2 -> Relu -> Gemm w3 -> y[N,4].

    Hidden unit 0 of the first layer is dead (zero weights and bias), so the model never
    reads row 0 of w2; that row holds weights of 1000, which set every per-channel (and
    per-block) quantisation scale of w2 and round its real weights to zero. Quantising w2
    alone destroys the model; w1 and w3 quantise harmlessly."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((16, 32)).astype(np.float32) * 0.5
    b1 = rng.standard_normal(32).astype(np.float32) * 0.1
    w1[:, 0], b1[0] = 0.0, 0.0
    w2 = rng.standard_normal((32, 32)).astype(np.float32) * 0.3
    w2[0, :] = 1000.0
    w3 = rng.standard_normal((32, 4)).astype(np.float32) * 0.5
    inits = [numpy_helper.from_array(a, n) for n, a in (
        ("w1", w1), ("b1", b1), ("w2", w2), ("b2", np.zeros(32, np.float32)),
        ("w3", w3), ("b3", np.zeros(4, np.float32)))]  # fmt: skip
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h1"], name="fc1"),
        helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
        helper.make_node("Gemm", ["r1", "w2", "b2"], ["h2"], name="fc2"),
        helper.make_node("Relu", ["h2"], ["r2"], name="relu2"),
        helper.make_node("Gemm", ["r2", "w3", "b3"], ["y"], name="fc3"),
    ]
    graph = helper.make_graph(
        nodes, "fragile", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])], inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.fixture(scope="session")
def fragile(tmp_path_factory) -> dict[str, Path]:
    """The model, data labelled by the model itself (top-1 100%), the same without labels, and
    with the float logits as an extra array ``targets`` for a custom metric."""
    root = tmp_path_factory.mktemp("fragile")
    model = fragile_mlp()
    paths = {"model": root / "fragile.onnx", "data": root / "data.npz",
             "unlabelled": root / "unlabelled.npz", "targets": root / "targets.npz"}  # fmt: skip
    onnx.save(model, paths["model"])
    x = np.random.default_rng(1).standard_normal((SAMPLES, 16)).astype(np.float32)
    logits = run_onnx(model, {"x": x})[0]
    np.savez(paths["data"], x=x, labels=logits.argmax(1))
    np.savez(paths["unlabelled"], x=x)
    np.savez(paths["targets"], x=x, targets=logits)
    return paths


def negative_max_error(outputs: dict, arrays: dict) -> float:
    """A custom metric: minus the largest error against the float logits in the data file."""
    return -float(np.max(np.abs(outputs["y"] - arrays["targets"])))
