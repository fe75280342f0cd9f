"""The new differentiable ops pass torch's gradcheck: analytic gradients (what distillation
trains with) equal finite differences, in float64, for every float input of the node.

Values are checked against the backend node tests (``test_backend_nodes.py``); this file
checks the backward pass, which no reference output covers. Each case is one node whose
float inputs are graph inputs; integer inputs (indices, sizes) are constants.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")

import onnx_ir as ir  # noqa: E402

from onnxcomp.distill import OnnxModule  # noqa: E402

RNG = np.random.default_rng(0)


def _x(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape)


def _i64(*values: int) -> np.ndarray:
    return np.asarray(values, np.int64)


def _f32(*values: float) -> np.ndarray:
    return np.asarray(values, np.float32)


# id -> (op, float inputs, constant inputs, input order, opset, outputs, attributes)
CASES = {
    "resize-linear-half-pixel": ("Resize", {"x": _x(1, 2, 3, 4)}, {"roi": np.zeros(0, np.float32),
        "scales": _f32(1, 1, 2, 1.5)}, ("x", "roi", "scales"), 19, 1, {"mode": "linear"}),
    "resize-cubic-antialias-down": ("Resize", {"x": _x(1, 1, 8, 8)}, {"sizes": _i64(1, 1, 3, 5)},
        ("x", "", "", "sizes"), 19, 1, {"mode": "cubic", "antialias": 1}),
    "resize-nearest-asymmetric": ("Resize", {"x": _x(1, 2, 3, 3)}, {"sizes": _i64(1, 2, 7, 5)},
        ("x", "", "", "sizes"), 19, 1, {"mode": "nearest",
                                        "coordinate_transformation_mode": "asymmetric"}),
    "upsample-linear": ("Upsample", {"x": _x(1, 1, 3, 3)}, {"s": _f32(1, 1, 2, 2)}, ("x", "s"), 9,
        1, {"mode": "linear"}),
    "gather-nd-batch": ("GatherND", {"x": _x(2, 3, 4)}, {"i": _i64(0, 2, 1, -1).reshape(2, 1, 2)},
        ("x", "i"), 18, 1, {"batch_dims": 1}),
    "scatter-nd-add": ("ScatterND", {"x": _x(4, 3), "u": _x(2, 3)}, {"i": _i64(1, 1).reshape(2, 1)},
        ("x", "i", "u"), 18, 1, {"reduction": "add"}),
    "scatter-elements": ("ScatterElements", {"x": _x(3, 4), "u": _x(3, 2)},
        {"i": _i64(0, 3, 1, 2, 3, 0).reshape(3, 2)}, ("x", "i", "u"), 18, 1, {"axis": 1}),
    "top-k": ("TopK", {"x": _x(3, 5)}, {"k": _i64(2)}, ("x", "k"), 18, 1, {"axis": 1}),
    "grid-sample": ("GridSample", {"x": _x(1, 2, 4, 4), "g": RNG.uniform(-0.9, 0.9, (1, 3, 3, 2))},
        {}, ("x", "g"), 20, 1, {"mode": "linear"}),
    "lrn": ("LRN", {"x": _x(1, 6, 2, 2)}, {}, ("x",), 18, 1, {"size": 3}),
    "group-norm": ("GroupNormalization", {"x": _x(2, 4, 3), "s": _x(4), "b": _x(4)}, {},
        ("x", "s", "b"), 21, 1, {"num_groups": 2}),
    "rms-norm": ("RMSNormalization", {"x": _x(2, 3, 4), "s": _x(4)}, {}, ("x", "s"), 23, 1, {}),
    "mean-variance-norm": ("MeanVarianceNormalization", {"x": _x(2, 3, 2, 2)}, {}, ("x",), 18, 1,
        {}),
    "lp-norm": ("LpNormalization", {"x": _x(3, 4)}, {}, ("x",), 18, 1, {"p": 2}),
    "lstm-bidirectional-peepholes": ("LSTM", {"x": _x(4, 2, 3), "w": _x(2, 12, 3) * 0.5,
        "r": _x(2, 12, 3) * 0.5, "b": _x(2, 24) * 0.1, "p": _x(2, 9) * 0.1},
        {"lens": np.asarray([4, 2], np.int32)}, ("x", "w", "r", "b", "lens", "", "", "p"), 18, 3,
        {"hidden_size": 3, "direction": "bidirectional"}),
    "gru-reset-before": ("GRU", {"x": _x(3, 2, 3), "w": _x(1, 9, 3) * 0.5, "r": _x(1, 9, 3) * 0.5,
        "b": _x(1, 18) * 0.1}, {}, ("x", "w", "r", "b"), 18, 2, {"hidden_size": 3}),
    "rnn-reverse": ("RNN", {"x": _x(3, 2, 3), "w": _x(1, 4, 3) * 0.5, "r": _x(1, 4, 4) * 0.5}, {},
        ("x", "w", "r"), 18, 2, {"hidden_size": 4, "direction": "reverse"}),
    "attention-gqa-causal": ("Attention", {"q": _x(1, 3, 8), "k": _x(1, 3, 4), "v": _x(1, 3, 4)},
        {}, ("q", "k", "v"), 23, 1, {"q_num_heads": 4, "kv_num_heads": 2, "is_causal": 1}),
    "rotary-embedding": ("RotaryEmbedding", {"x": _x(1, 2, 3, 4), "c": _x(3, 2), "s": _x(3, 2)},
        {"pos": _i64(0, 2, 1).reshape(1, 3)}, ("x", "c", "s", "pos"), 23, 1, {}),
    "depth-to-space": ("DepthToSpace", {"x": _x(1, 8, 2, 2)}, {}, ("x",), 18, 1,
        {"blocksize": 2, "mode": "CRD"}),
    "col2im": ("Col2Im", {"x": _x(1, 4, 9)}, {"img": _i64(4, 4), "blk": _i64(2, 2)},
        ("x", "img", "blk"), 18, 1, {"strides": [1, 1]}),
    "lp-pool": ("LpPool", {"x": _x(1, 1, 4, 4)}, {}, ("x",), 18, 1,
        {"kernel_shape": [2, 2], "p": 3}),
    "average-pool-dilated": ("AveragePool", {"x": _x(1, 1, 5, 5)}, {}, ("x",), 19, 1,
        {"kernel_shape": [2, 2], "dilations": [2, 2], "pads": [1, 1, 1, 1]}),
    "deform-conv-masked": ("DeformConv", {"x": _x(1, 2, 4, 4), "w": _x(2, 2, 2, 2),
        "off": _x(1, 8, 3, 3) * 0.4, "b": _x(2), "m": RNG.uniform(0.2, 1, (1, 4, 3, 3))}, {},
        ("x", "w", "off", "b", "m"), 22, 1, {"kernel_shape": [2, 2]}),
    "roi-align-avg": ("RoiAlign", {"x": _x(1, 2, 6, 6)}, {"rois": np.asarray([[0.5, 1.2, 4.1,
        5.3], [1.0, 0.3, 3.2, 2.2]], np.float64), "bi": _i64(0, 0)}, ("x", "rois", "bi"), 16, 1,
        {"output_height": 2, "output_width": 2, "sampling_ratio": 2}),
    "dft-onesided": ("DFT", {"x": _x(2, 8, 1)}, {"axis": _i64(1).reshape(())},
        ("x", "", "axis"), 20, 1, {"onesided": 1}),
    "stft-windowed": ("STFT", {"x": _x(1, 16, 1), "w": _x(4)}, {"step": _i64(2).reshape(())},
        ("x", "step", "w"), 17, 1, {}),
    "swish-celu-shrink": ("Swish", {"x": _x(3, 3)}, {}, ("x",), 24, 1, {"alpha": 1.5}),
}  # fmt: skip


def _model(op: str, floats: dict, consts: dict, order: tuple, opset: int, outputs: int,
           attrs: dict) -> ir.Model:  # fmt: skip
    names = [f"y{i}" for i in range(outputs)]
    node = helper.make_node(op, list(order), names, name="node", **attrs)
    graph = helper.make_graph(
        [node],
        op,
        [helper.make_tensor_value_info(n, TensorProto.DOUBLE, a.shape) for n, a in floats.items()],
        [helper.make_tensor_value_info(n, TensorProto.DOUBLE, None) for n in names],
        [numpy_helper.from_array(a, n) for n, a in consts.items()],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return ir.serde.deserialize_model(proto)


@pytest.mark.parametrize("case", list(CASES))
def test_gradients_match_finite_differences(case: str) -> None:
    op, floats, consts, order, opset, outputs, attrs = CASES[case]
    module = OnnxModule(_model(op, floats, consts, order, opset, outputs, attrs))
    tensors = tuple(torch.from_numpy(a.astype(np.float64)).requires_grad_() for a in
                    floats.values())  # fmt: skip
    assert torch.autograd.gradcheck(lambda *xs: module(*xs), tensors, atol=1e-6, rtol=1e-4)


def test_gradients_flow_through_control_flow_bodies() -> None:
    """A Loop whose body multiplies by an outer weight: the weight (a main-graph parameter)
    gets the gradient of every iteration."""
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Mul", ["state", "w"], ["next"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("state", TensorProto.FLOAT, [3]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("next", TensorProto.FLOAT, [3]),
        ],
    )
    graph = helper.make_graph(
        [helper.make_node("Loop", ["n", "", "x"], ["y"], body=body)],
        "loop",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
        [
            numpy_helper.from_array(_i64(3).reshape(()), "n"),
            numpy_helper.from_array(_f32(0.5, 2.0, -1.0), "w"),
        ],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    # The weight multiplies an Add/Sub/Mul operand inside the body: a vector-shaped trainable.
    module = OnnxModule(ir.serde.deserialize_model(proto))
    x = torch.tensor([1.0, 2.0, 3.0])
    (y,) = module(x)
    w = module.parameter("w")
    np.testing.assert_allclose(y.detach().numpy(), x.numpy() * w.detach().numpy() ** 3)
    y.sum().backward()
    np.testing.assert_allclose(w.grad.numpy(), 3 * w.detach().numpy() ** 2 * x.numpy(), rtol=1e-6)
