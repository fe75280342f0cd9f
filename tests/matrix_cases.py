"""The pass x model matrix: every registered pass on every kind of graph onnxcomp may meet.

Models: the onnx wheel's ``light`` model-zoo architectures in the layout the zoo publishes them
(IR version 3, opset 9, every weight an initializer also listed as a graph input; the wheel
ships them with ``ConstantOfShape`` fills instead of weights, so :func:`zoo_layout` puts seeded
random weights of the declared shapes back) and as shipped; the backend test models that have
weights (IR 3, opset 6); and graphs built here: If / Loop / Scan bodies holding weights, a
weight shared by the main graph and a subgraph, fp16 weights and I/O, external data in a
subfolder, no weights at all, input dims named / -1 / unnamed / undeclared, and 0-d inputs.

:func:`judge` runs one pass (default options; ``distill`` one epoch) on one model through
``onnxcomp.optimize`` with generated data where the pass needs it, and the loss bound off
(random weights make lossy passes lossy; the bound is not the subject here). Outcomes:

- ``ok``: the written model passes onnx.checker, loads in plain ONNX Runtime, and its outputs
  have the input model's shapes and are finite wherever the input model's are;
- ``refused``: onnxcomp said why in one line (an OnnxcompError that is not a failed pass);
- ``failed``: anything else: a pass that broke the model (PassFailedError) or built one ONNX
  Runtime rejects, an internal error, a written model that fails a check above, an error
  message over several lines.

Shared by tests/test_matrix.py (a bounded sample) and benchmarks/matrix.py (all of it).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnx.backend.test import loader

import onnxcomp
from onnxcomp import registry
from onnxcomp.data import Dataset, random_inputs
from onnxcomp.errors import OnnxcompError, PassFailedError
from onnxcomp.instrument import LossBound

LIGHT_DIR = Path(loader.DATA_DIR) / "light"
BACKEND_DIR = Path(loader.DATA_DIR)
LIGHT_MODELS = (
    "bvlc_alexnet", "densenet121", "inception_v1", "inception_v2", "resnet50", "shufflenet",
    "squeezenet", "vgg19", "zfnet512",
)  # fmt: skip
# Options the matrix gives a pass instead of its defaults: one epoch keeps distillation short.
PASS_OPTIONS: dict[str, str] = {"distill": "epochs=1"}
# Samples of generated data for passes that need --data (calibration, distillation).
DATA_SAMPLES = 4
# Passes given the generated data though they run without: fp16 probes activations on it for
# overflow (random weights through 50 layers overflow float16 where real ones do not).
USES_DATA = ("fp16",)
Status = Literal["ok", "refused", "failed"]


def has_torch() -> bool:
    return importlib.util.find_spec("torch") is not None


def matrix_passes() -> list[str]:
    """Every registered pass; ``distill`` only when torch is installed."""
    return [name for name in registry.PASSES if name != "distill" or has_torch()]


def pipeline_for(pass_name: str) -> str:
    options = PASS_OPTIONS.get(pass_name)
    return f"{pass_name}:{options.replace(',', ':')}" if options else pass_name


# --- the light zoo models in the zoo's layout -----------------------------------------------


def zoo_layout(name: str, seed: int = 0) -> onnx.ModelProto:
    """``light_<name>.onnx`` as the model zoo publishes it: each ``ConstantOfShape`` fill
    replaced by an initializer of its shape (seeded He-scaled normals for conv/dense weights,
    BN-like scales near 1, small biases) that is also listed as a graph input, IR version 3.
    The fill (0.02 everywhere) would make every channel alike, which no real model is."""
    model = onnx.load(LIGHT_DIR / f"light_{name}.onnx")
    graph = model.graph
    rng = np.random.default_rng(seed)
    shapes = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    scale_inputs = _scale_like_inputs(graph)
    kept_nodes, weights = [], []
    for node in graph.node:
        if node.op_type != "ConstantOfShape" or node.input[0] not in shapes:
            kept_nodes.append(node)
            continue
        shape = tuple(int(d) for d in shapes[node.input[0]])
        weights.append(numpy_helper.from_array(
            _random_weight(shape, node.output[0] in scale_inputs, rng), node.output[0]
        ))  # fmt: skip
    used = {name for node in kept_nodes for name in node.input}
    initializers = [t for t in graph.initializer if t.name in used] + weights
    names = {t.name for t in initializers}
    feeds = [i for i in graph.input if i.name not in shapes]
    infos = [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in weights]
    infos += [i for i in graph.input if i.name in shapes and i.name in names]
    del graph.node[:]
    graph.node.extend(kept_nodes)
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    del graph.input[:]
    graph.input.extend(feeds + infos)
    model.ir_version = 3
    _temper_logits(model)
    onnx.checker.check_model(model)
    return model


# Ops through which scaling a weight by c > 0 scales the output by c.
_HOMOGENEOUS = {"Relu", "GlobalAveragePool", "AveragePool", "MaxPool", "Reshape", "Flatten",
                "Dropout", "Identity"}  # fmt: skip
LOGIT_STD = 3.0


def _temper_logits(model: onnx.ModelProto) -> None:
    """Scale the classifier so the logits before the final Softmax have std ~ LOGIT_STD on a
    random image: random weights through 50 residual layers otherwise saturate the Softmax
    (one class at probability 1.0), and every output comparison would read cosine 1."""
    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    softmax = producers.get(graph.output[0].name)
    if softmax is None or softmax.op_type != "Softmax":
        return
    node = producers.get(softmax.input[0])
    while node is not None and node.op_type in _HOMOGENEOUS:
        node = producers.get(node.input[0])
    weights = {t.name: t for t in graph.initializer}
    if node is None or node.op_type not in ("Gemm", "Conv"):
        return
    # The weight may be reshaped on the way (Inception v1's classifier).
    scaled = [producers[n].input[0] if n in producers and producers[n].op_type == "Reshape"
              else n for n in node.input[1:3]]  # fmt: skip
    if scaled[0] not in weights:
        return
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(onnx.ValueInfoProto(name=softmax.input[0]))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = session.get_inputs()[0]
    shape = [d if isinstance(d, int) else 1 for d in feed.shape]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    logits = session.run([softmax.input[0]], {feed.name: x})[0]
    factor = LOGIT_STD / max(float(np.std(logits)), 1e-6)
    for name in scaled:
        if name in weights:
            weights[name].CopyFrom(numpy_helper.from_array(
                numpy_helper.to_array(weights[name]) * np.float32(factor), name
            ))  # fmt: skip


def _scale_like_inputs(graph: onnx.GraphProto) -> set[str]:
    """Values read as a BatchNormalization scale or variance, or multiplied into an output
    (the Mul of an Unsqueeze-Mul-Add BN as Caffe2 exported it): these sit near 1."""
    names = set()
    for node in graph.node:
        if node.op_type == "BatchNormalization":
            names.update((node.input[1], node.input[4]))
        if node.op_type == "Unsqueeze" and "_w_" in node.input[0]:
            names.add(node.input[0])
    return names


def _random_weight(shape: tuple[int, ...], scale_like: bool, rng: np.random.Generator):
    if len(shape) >= 2:
        fan_in = int(np.prod(shape[1:]))
        return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
    if scale_like:
        return rng.uniform(0.5, 1.5, shape).astype(np.float32)
    return rng.uniform(-0.1, 0.1, shape).astype(np.float32)


# --- graphs built here ------------------------------------------------------------------------


def _init(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def _model(nodes, inputs, outputs, inits, opset: int = 17, ir_version: int | None = None):
    graph = helper.make_graph(nodes, "matrix", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    if ir_version is not None:
        model.ir_version = ir_version
    onnx.checker.check_model(model)
    return model


def _weights(seed: int, *shapes: tuple[int, ...]) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32) for s in shapes]


def mlp(input_shape: list | None = ("N", 8), seed: int = 0, dtype=np.float32) -> onnx.ModelProto:
    """x -> MatMul -> Add -> Relu -> Gemm -> y: the body for the input-shape variants and fp16."""
    w1, b1, w2, b2 = _weights(seed, (8, 16), (16,), (16, 4), (4,))
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
        helper.make_node("Add", ["h", "b1"], ["hb"], name="add1"),
        helper.make_node("Relu", ["hb"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], name="fc"),
    ]
    shape = None if input_shape is None else list(input_shape)
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", elem, shape)],
        [helper.make_tensor_value_info("y", elem, ["N", 4])],
        [_init(n, a.astype(dtype)) for n, a in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2))],
    )


def if_weights(seed: int = 0) -> onnx.ModelProto:
    """A main MatMul, then an If (on the sign of the sum) whose branches each hold a weight."""
    w, wt, we = _weights(seed, (8, 8), (8, 4), (8, 4))

    def branch(name: str, weight: np.ndarray) -> onnx.GraphProto:
        return helper.make_graph(
            [helper.make_node("MatMul", ["h", f"{name}_w"], [f"{name}_y"], name=f"{name}_mm")],
            name, [], [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, ["N", 4])],
            [_init(f"{name}_w", weight)],
        )  # fmt: skip

    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        helper.make_node("ReduceSum", ["h"], ["s"], name="sum", keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["cond"], name="positive"),
        helper.make_node("If", ["cond"], ["y"], name="if",
                         then_branch=branch("then", wt), else_branch=branch("else", we)),
    ]  # fmt: skip
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [_init("w", w), _init("zero", np.float32(0))],
    )


def loop_weights(seed: int = 0) -> onnx.ModelProto:
    """Three Loop iterations of h = Tanh(h @ W_body), W_body an initializer of the body."""
    w, wb = _weights(seed, (8, 8), (8, 8))
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("MatMul", ["h_in", "body_w"], ["hm"], name="body_mm"),
            helper.make_node("Tanh", ["hm"], ["h_out"], name="body_tanh"),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_in", TensorProto.FLOAT, ["N", 8]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_out", TensorProto.FLOAT, ["N", 8]),
        ],
        [_init("body_w", wb)],
    )
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h0"], name="mm"),
        helper.make_node("Loop", ["trips", "", "h0"], ["y"], name="loop", body=body),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
        [_init("w", w), _init("trips", np.int64(3))],
    )


def scan_weights(seed: int = 0) -> onnx.ModelProto:
    """An RNN as Scan over the first axis of x[T, 8]: h = Tanh(x_t @ W_in + h @ W_rec)."""
    w_in, w_rec = _weights(seed, (8, 8), (8, 8))
    body = helper.make_graph(
        [
            helper.make_node("MatMul", ["x_t", "w_in"], ["a"], name="in_mm"),
            helper.make_node("MatMul", ["h_in", "w_rec"], ["b"], name="rec_mm"),
            helper.make_node("Add", ["a", "b"], ["ab"], name="sum"),
            helper.make_node("Tanh", ["ab"], ["h_out"], name="tanh"),
            helper.make_node("Identity", ["h_out"], ["y_t"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("h_in", TensorProto.FLOAT, [8]),
            helper.make_tensor_value_info("x_t", TensorProto.FLOAT, [8]),
        ],
        [
            helper.make_tensor_value_info("h_out", TensorProto.FLOAT, [8]),
            helper.make_tensor_value_info("y_t", TensorProto.FLOAT, [8]),
        ],
        [_init("w_in", w_in), _init("w_rec", w_rec)],
    )
    nodes = [helper.make_node("Scan", ["h0", "x"], ["h_last", "y"], name="scan", body=body,
                              num_scan_inputs=1)]  # fmt: skip
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", 8])],
        [
            helper.make_tensor_value_info("h_last", TensorProto.FLOAT, [8]),
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", 8]),
        ],
        [_init("h0", np.zeros(8, np.float32))],
    )


def shared_subgraph_weights(seed: int = 0) -> onnx.ModelProto:
    """One weight W read by a main-graph MatMul and, through the outer scope, by a MatMul in
    both If branches."""
    (w,) = _weights(seed, (8, 8))

    def branch(name: str, op: str) -> onnx.GraphProto:
        return helper.make_graph(
            [
                helper.make_node("MatMul", ["h", "w"], [f"{name}_m"], name=f"{name}_mm"),
                helper.make_node(op, [f"{name}_m"], [f"{name}_y"], name=f"{name}_act"),
            ],
            name, [], [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, ["N", 8])],
        )  # fmt: skip

    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        helper.make_node("ReduceSum", ["h"], ["s"], name="sum", keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["cond"], name="positive"),
        helper.make_node("If", ["cond"], ["y"], name="if",
                         then_branch=branch("then", "Relu"), else_branch=branch("else", "Tanh")),
    ]  # fmt: skip
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
        [_init("w", w), _init("zero", np.float32(0))],
    )


def no_weights() -> onnx.ModelProto:
    """Two inputs, elementwise ops and a reduction: nothing any weight pass could take."""
    nodes = [
        helper.make_node("Add", ["a", "b"], ["s"], name="add"),
        helper.make_node("Relu", ["s"], ["r"], name="relu"),
        helper.make_node("Mul", ["r", "a"], ["m"], name="mul"),
        helper.make_node("Softmax", ["m"], ["y"], name="softmax", axis=-1),
    ]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 8]) for n in "ab"]
    return _model(nodes, inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
                  [])  # fmt: skip


def scalar_input(seed: int = 0) -> onnx.ModelProto:
    """y = (x * scale) @ W + b, with ``scale`` a 0-d input (a temperature, a step size)."""
    w, b = _weights(seed, (8, 4), (4,))
    nodes = [
        helper.make_node("Mul", ["x", "scale"], ["xs"], name="scale"),
        helper.make_node("Gemm", ["xs", "w", "b"], ["y"], name="fc"),
    ]
    return _model(
        nodes,
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8]),
            helper.make_tensor_value_info("scale", TensorProto.FLOAT, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [_init("w", w), _init("b", b)],
    )


def only_scalar_inputs() -> onnx.ModelProto:
    """Every input 0-d (as in onnx's test_range / test_clip cases): y = Clip(x, lo, hi) * w."""
    nodes = [
        helper.make_node("Clip", ["x", "lo", "hi"], ["c"], name="clip"),
        helper.make_node("Mul", ["c", "w"], ["y"], name="mul"),
    ]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, []) for n in ("x", "lo", "hi")]
    return _model(nodes, inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
                  [_init("w", np.arange(6, dtype=np.float32).reshape(2, 3))])  # fmt: skip


def conv_bn(seed: int = 0) -> onnx.ModelProto:
    from tests.conftest import conv_bn_residual_model

    return conv_bn_residual_model(seed)


# --- the models of the matrix ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MatrixModel:
    """One model of the matrix: ``write(folder)`` puts it (and any data files) there and returns
    the model's path. ``shapes`` are --shape values for inputs without declared shapes."""

    name: str
    group: str
    write: Callable[[Path], Path]
    shapes: Mapping[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)


def _saved(build: Callable[[], onnx.ModelProto]) -> Callable[[Path], Path]:
    def write(folder: Path) -> Path:
        path = folder / "model.onnx"
        onnx.save(build(), path)
        return path

    return write


def _external_in_subfolder(folder: Path) -> Path:
    """The conv-BN model with every weight in ``weights/model.bin`` beside it."""
    (folder / "weights").mkdir(exist_ok=True)
    path = folder / "model.onnx"
    onnx.save(conv_bn(), path, save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights/model.bin", size_threshold=0)  # fmt: skip
    return path


def _shipped(path: Path) -> Callable[[Path], Path]:
    return lambda folder: path


@functools.cache
def _zoo_bytes(name: str) -> bytes:
    return zoo_layout(name).SerializeToString()


def _zoo(name: str) -> Callable[[Path], Path]:
    def write(folder: Path) -> Path:
        path = folder / "model.onnx"
        path.write_bytes(_zoo_bytes(name))
        return path

    return write


def backend_models_with_weights() -> list[Path]:
    """The backend test models the onnx wheel ships that have float initializers."""
    paths = []
    for kind in ("simple", "pytorch-converted", "pytorch-operator"):
        for path in sorted((BACKEND_DIR / kind).glob("*/model.onnx")):
            model = onnx.load(path, load_external_data=False)
            if any(t.data_type in (1, 10, 11, 16) for t in model.graph.initializer):
                paths.append(path)
    return paths


def all_models() -> list[MatrixModel]:
    """Every model of the matrix, cheapest kinds first."""
    graphs = [
        MatrixModel("if-weights", "subgraphs", _saved(if_weights)),
        MatrixModel("loop-weights", "subgraphs", _saved(loop_weights)),
        MatrixModel("scan-weights", "subgraphs", _saved(scan_weights)),
        MatrixModel("shared-subgraph-weight", "subgraphs", _saved(shared_subgraph_weights)),
        MatrixModel("fp16-mlp", "fp16", _saved(lambda: mlp(dtype=np.float16))),
        MatrixModel("external-subfolder", "external data", _external_in_subfolder),
        MatrixModel("no-weights", "no weights", _saved(no_weights)),
        MatrixModel("dims-named", "input dims", _saved(lambda: mlp(["batch", 8]))),
        MatrixModel("dims-minus-1", "input dims", _saved(lambda: mlp([-1, 8]))),
        MatrixModel("dims-unnamed", "input dims", _saved(lambda: mlp([None, 8]))),
        MatrixModel("scalar-input", "0-d inputs", _saved(scalar_input)),
        MatrixModel("only-scalar-inputs", "0-d inputs", _saved(only_scalar_inputs)),
    ]
    backend = [
        MatrixModel(f"{p.parent.parent.name}/{p.parent.name}", "backend", _shipped(p))
        for p in backend_models_with_weights()
    ]
    light = [MatrixModel(f"light/{n}", "light (zoo layout)", _zoo(n)) for n in LIGHT_MODELS]
    shipped = [
        MatrixModel(f"light-shipped/{n}", "light (as shipped)",
                    _shipped(LIGHT_DIR / f"light_{n}.onnx"))
        for n in LIGHT_MODELS
    ]  # fmt: skip
    return graphs + backend + light + shipped


# --- one pass on one model ------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    model: str
    pass_name: str
    status: Status
    detail: str = ""
    seconds: float = 0.0


def generated_data(model_path: Path, shapes: Mapping[str, tuple[int, ...]]) -> Dataset:
    """:data:`DATA_SAMPLES` samples of random inputs (a static batch dim stays as it is)."""
    model = onnxcomp.load(model_path)
    from onnxcomp.layout import normalize_layout

    normalize_layout(model)
    wanted = dict(shapes)
    for value in model.graph.inputs:
        if value.is_initializer() or value.name in wanted or value.shape is None:
            continue
        dims = list(value.shape)
        if dims and not isinstance(dims[0], int):
            wanted[value.name] = (DATA_SAMPLES, *(d if isinstance(d, int) and d > 0 else 4
                                                  for d in dims[1:]))  # fmt: skip
    return random_inputs(model, wanted, seed=1)


def judge(spec: MatrixModel, pass_name: str, folder: Path) -> Outcome:
    """Run ``pass_name`` on ``spec`` in ``folder`` and say how it went (see the module doc)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = spec.write(folder)
    output = folder / "out.onnx"
    pass_class = registry.get(pass_name).load()
    started = time.perf_counter()

    def outcome(status: Status, detail: str = "") -> Outcome:
        return Outcome(spec.name, pass_name, status, detail, time.perf_counter() - started)

    try:
        wants_data = pass_class.needs_data or pass_name in USES_DATA
        data = generated_data(path, spec.shapes) if wants_data else None
        onnxcomp.optimize(
            path,
            pipeline_for(pass_name),
            data=data,
            shapes=dict(spec.shapes) or None,
            output=output,
            bound=LossBound(allow_loss=True),
        )
    except PassFailedError as e:
        return outcome("failed", str(e))
    except OnnxcompError as e:
        text = str(e)
        if "\n" in text.strip():
            return outcome("failed", f"a message over several lines: {text[:300]}")
        if text.startswith("pass '") and "ONNX Runtime" in text:
            # The input model ran (the check's reference did): a pass built one that does not.
            return outcome("failed", text)
        return outcome("refused", text)
    except Exception as e:
        return outcome("failed", f"internal error: {type(e).__name__}: {e}"[:400])
    problem = written_model_problem(path, output, spec.shapes)
    return outcome("failed", problem) if problem else outcome("ok")


def written_model_problem(
    source: Path, written: Path, shapes: Mapping[str, tuple[int, ...]]
) -> str | None:
    """What is wrong with ``written`` (checker, ONNX Runtime, output shapes, new non-finite
    values against ``source`` on the same random inputs), or None."""
    try:
        onnx.checker.check_model(str(written))
    except Exception as e:
        return f"the written model fails onnx.checker: {str(e).splitlines()[0][:200]}"
    model = onnxcomp.load(source)
    from onnxcomp.layout import normalize_layout

    normalize_layout(model)
    feeds = random_inputs(model, dict(shapes) or None, seed=2).inputs
    try:
        expected = _run(source, feeds)
    except Exception:
        return None  # ORT cannot run the input: onnxcomp's own check would have refused
    try:
        got = _run(written, feeds)
    except Exception as e:
        return f"ONNX Runtime cannot run the written model: {str(e).splitlines()[0][:200]}"
    if len(got) != len(expected):
        return f"{len(got)} outputs, the input model has {len(expected)}"
    for index, (want, have) in enumerate(zip(expected, got, strict=True)):
        if np.shape(want) != np.shape(have):
            return f"output {index} has shape {np.shape(have)}, was {np.shape(want)}"
        if np.asarray(want).dtype.kind == "f":
            new = np.isfinite(np.asarray(want, np.float64)) & ~np.isfinite(
                np.asarray(have, np.float64)
            )
            if new.any():
                return f"output {index} has {int(new.sum())} new NaN/Inf"
    return None


def _run(path: Path, feeds: dict[str, np.ndarray]) -> list:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 4  # failures are reported as outcomes, not logged
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feeds.items() if k in names})
