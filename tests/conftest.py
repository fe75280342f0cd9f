"""Small models built in code, shared by the tests, and helpers to run them in ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, settings
from onnx import TensorProto, helper, numpy_helper

from onnxcomp.instrument import LossBound

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "models"
# Property-based tests (tests/test_fuzz.py): "ci" by default, "thorough" from benchmarks/fuzz.py
# (pytest --hypothesis-profile=thorough). Fixed seeds in CI so a failure reproduces.
_FUZZ_HEALTH = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
settings.register_profile(
    "ci", max_examples=40, deadline=None, derandomize=True, suppress_health_check=_FUZZ_HEALTH
)
settings.register_profile(
    "thorough", max_examples=1500, deadline=None, suppress_health_check=_FUZZ_HEALTH
)
settings.load_profile("ci")

# For tests whose subject is not the loss bound but whose pipelines lose more than it allows.
LOSS_ALLOWED = LossBound(allow_loss=True)


def run_onnx(model: onnx.ModelProto | str | Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run a model in plain ONNX Runtime (basic optimisations, as onnxcomp's check does)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"]).run(
        None, feeds
    )


@pytest.fixture(autouse=True)
def _fresh_module_rng(request: pytest.FixtureRequest) -> None:
    """Reseed a test module's shared ``RNG`` before each test, so every test draws the same
    numbers whatever ran before it (pytest-xdist changes the order and the grouping)."""
    if isinstance(getattr(request.module, "RNG", None), np.random.Generator):
        request.module.RNG = np.random.default_rng(0)


def _init(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(array, name)


def conv_bn_residual_model(seed: int = 0, opset: int = 17) -> onnx.ModelProto:
    """x -> Conv(no bias) -> BN -> Relu -> Conv(bias) -> BN -> Add(skip) -> Relu -> Flatten
    -> Gemm -> BN -> MatMul + Add -> BN -> y. Batch dim dynamic."""
    rng = np.random.default_rng(seed)
    c = 4

    def bn(prefix: str, n: int) -> list[TensorProto]:
        return [
            _init(f"{prefix}.scale", rng.uniform(0.5, 1.5, n).astype(np.float32)),
            _init(f"{prefix}.bias", rng.uniform(-0.5, 0.5, n).astype(np.float32)),
            _init(f"{prefix}.mean", rng.uniform(-1, 1, n).astype(np.float32)),
            _init(f"{prefix}.var", rng.uniform(0.5, 2.0, n).astype(np.float32)),
        ]

    def bn_node(prefix: str, x: str, y: str) -> onnx.NodeProto:
        inputs = [x] + [f"{prefix}.{k}" for k in ("scale", "bias", "mean", "var")]
        return helper.make_node("BatchNormalization", inputs, [y], name=prefix, epsilon=1e-5)

    inits = [
        _init("w1", rng.standard_normal((c, 1, 3, 3)).astype(np.float32)),
        _init("w2", rng.standard_normal((c, c, 3, 3)).astype(np.float32) * 0.3),
        _init("b2", rng.standard_normal(c).astype(np.float32)),
        _init("fc_w", rng.standard_normal((c * 16, 8)).astype(np.float32) * 0.2),
        _init("fc_b", rng.standard_normal(8).astype(np.float32)),
        _init("mm_w", rng.standard_normal((8, 6)).astype(np.float32)),
        _init("mm_b", rng.standard_normal(6).astype(np.float32)),
        *bn("bn1", c), *bn("bn2", c), *bn("bn3", 8), *bn("bn4", 6),
    ]  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        bn_node("bn1", "c1", "n1"),
        helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        bn_node("bn2", "c2", "n2"),
        helper.make_node("Add", ["n2", "r1"], ["s"], name="residual"),
        helper.make_node("Relu", ["s"], ["r2"], name="relu2"),
        helper.make_node("Flatten", ["r2"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["g"], name="fc"),
        bn_node("bn3", "g", "n3"),
        helper.make_node("MatMul", ["n3", "mm_w"], ["m"], name="mm"),
        helper.make_node("Add", ["m", "mm_b"], ["ma"], name="mm_add"),
        bn_node("bn4", "ma", "y"),
    ]
    graph = helper.make_graph(
        nodes,
        "conv_bn_residual",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model = onnx.shape_inference.infer_shapes(model)
    onnx.checker.check_model(model, full_check=True)
    return model


def mlp_model(seed: int = 0, opset: int = 17) -> onnx.ModelProto:
    """x[N,8] -> MatMul -> Add -> Relu -> MatMul -> y[N,4], with an Identity and a foldable
    constant expression (weights scaled by Constant nodes) for simplify to remove."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Identity", ["x"], ["xi"], name="identity"),
        helper.make_node(
            "Constant", [], ["w1"], name="w1_const",
            value=_init("w1v", rng.standard_normal((8, 16)).astype(np.float32)),
        ),
        helper.make_node("Constant", [], ["two"], name="two", value=_init("t", np.float32(2.0))),
        helper.make_node("Mul", ["w1", "two"], ["w1x2"], name="scale_w1"),
        helper.make_node("MatMul", ["xi", "w1x2"], ["h"], name="mm1"),
        helper.make_node("Add", ["h", "b1"], ["hb"], name="add1"),
        helper.make_node("Relu", ["hb"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2"),
        helper.make_node("MatMul", ["r", "w2"], ["unused"], name="dead"),
    ]  # fmt: skip
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [
            _init("b1", rng.standard_normal(16).astype(np.float32)),
            _init("w2", rng.standard_normal((16, 4)).astype(np.float32)),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.fixture
def cnn_path(tmp_path: Path) -> Path:
    path = tmp_path / "cnn.onnx"
    onnx.save(conv_bn_residual_model(), path)
    return path


@pytest.fixture
def mlp_path(tmp_path: Path) -> Path:
    path = tmp_path / "mlp.onnx"
    onnx.save(mlp_model(), path)
    return path
