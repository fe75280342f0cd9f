"""Graphs beyond onnxcomp's demo models, built with onnx.helper and random weights: a
torchvision-style ResNet, a MobileNetV2-style network, Inception-like Concat branches, a
grouped Conv, a weight used twice, a multi-head attention block and a graph with nothing to
prune. Every builder returns a checked model with a dynamic batch dimension ``N``."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class GraphBuilder:
    """Collects nodes and random initializers; names are generated from a counter."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.count = 0

    def fresh(self, hint: str) -> str:
        self.count += 1
        return f"{hint}{self.count}"

    def const(self, hint: str, array: np.ndarray) -> str:
        name = self.fresh(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], **attrs) -> str:
        out = self.fresh(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out + "_node", **attrs))
        return out

    def conv(self, x: str, cin: int, cout: int, k: int = 3, stride: int = 1, group: int = 1,
             bias: bool = False) -> str:  # fmt: skip
        w = self.const("w", self.rng.standard_normal((cout, cin // group, k, k)).astype(
            np.float32) * (2.0 / (cin // group * k * k)) ** 0.5)  # fmt: skip
        inputs = [x, w]
        if bias:
            inputs.append(self.const("b", self.rng.standard_normal(cout).astype(np.float32) * 0.1))
        pad = k // 2
        return self.op("Conv", inputs, kernel_shape=[k, k], strides=[stride, stride],
                       pads=[pad] * 4, group=group)  # fmt: skip

    def bn(self, x: str, c: int) -> str:
        rng = self.rng
        params = [
            self.const("gamma", rng.uniform(0.5, 1.5, c).astype(np.float32)),
            self.const("beta", rng.uniform(-0.2, 0.2, c).astype(np.float32)),
            self.const("mean", rng.uniform(-0.2, 0.2, c).astype(np.float32)),
            self.const("var", rng.uniform(0.5, 1.5, c).astype(np.float32)),
        ]
        return self.op("BatchNormalization", [x, *params], epsilon=1e-5)

    def conv_bn(self, x: str, cin: int, cout: int, act: str | None = "Relu", **kw) -> str:
        y = self.bn(self.conv(x, cin, cout, **kw), cout)
        if act == "Relu6":
            return self.op("Clip", [y, self.const("lo", np.float32(0)),
                                    self.const("hi", np.float32(6))])  # fmt: skip
        return self.op(act, [y]) if act else y

    def gemm(self, x: str, cin: int, cout: int) -> str:
        w = self.const("fc", self.rng.standard_normal((cout, cin)).astype(np.float32) * 0.2)
        b = self.const("fcb", self.rng.standard_normal(cout).astype(np.float32) * 0.1)
        return self.op("Gemm", [x, w, b], transB=1)

    def model(self, inputs: dict[str, list], outputs: list[str], dtype=TensorProto.FLOAT,
              name: str = "robust") -> onnx.ModelProto:  # fmt: skip
        graph = helper.make_graph(
            self.nodes,
            name,
            [helper.make_tensor_value_info(k, dtype, s) for k, s in inputs.items()],
            [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
            self.inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
        onnx.checker.check_model(model, full_check=True)
        return model


def _head(b: GraphBuilder, x: str, c: int, classes: int = 10, view: bool = False) -> str:
    pooled = b.op("GlobalAveragePool", [x])
    if view:  # torch's x.view(x.size(0), -1), as exporters write it
        batch = b.op("Shape", [pooled], start=0, end=1)
        target = b.op("Concat", [batch, b.const("minus1", np.array([-1], np.int64))], axis=0)
        flat = b.op("Reshape", [pooled, target])
    else:
        flat = b.op("Flatten", [pooled])
    return b.gemm(flat, c, classes)


def resnet_model(seed: int = 0) -> onnx.ModelProto:
    """Stem, a basic block with an identity shortcut, a strided block with a 1x1 Conv+BN
    downsample shortcut, global pooling, ``x.view(N, -1)``, Gemm. [N,3,16,16] -> [N,10]."""
    b = GraphBuilder(seed)
    x = b.conv_bn("x", 3, 16)
    y = b.conv_bn(b.conv_bn(x, 16, 16), 16, 16, act=None)
    x = b.op("Relu", [b.op("Add", [y, x])])
    y = b.conv_bn(b.conv_bn(x, 16, 32, stride=2), 32, 32, act=None)
    shortcut = b.conv_bn(x, 16, 32, act=None, k=1, stride=2)
    x = b.op("Relu", [b.op("Add", [y, shortcut])])
    out = _head(b, x, 32, view=True)
    return b.model({"x": ["N", 3, 16, 16]}, [out], name="resnet")


def mobilenet_v2_model(seed: int = 0) -> onnx.ModelProto:
    """ReLU6 stem, an inverted residual (1x1 expand, depthwise 3x3, 1x1 project, Add), a
    strided one without residual, global pooling, Flatten, Gemm. [N,3,16,16] -> [N,10]."""
    b = GraphBuilder(seed)
    x = b.conv_bn("x", 3, 16, act="Relu6", stride=2)
    for cout, stride in ((16, 1), (24, 2)):
        h = b.conv_bn(x, 16, 64, act="Relu6", k=1)
        h = b.conv_bn(h, 64, 64, act="Relu6", group=64, stride=stride)
        h = b.conv_bn(h, 64, cout, act=None, k=1)
        x = b.op("Add", [h, x]) if stride == 1 else h
    out = _head(b, x, 24)
    return b.model({"x": ["N", 3, 16, 16]}, [out], name="mobilenet_v2")


def inception_model(seed: int = 0) -> onnx.ModelProto:
    """Three branches (1x1; 1x1 -> 3x3; MaxPool -> 1x1) concatenated along channels, then a
    1x1 Conv, pooling and Gemm. [N,3,8,8] -> [N,10]."""
    b = GraphBuilder(seed)
    x = b.conv_bn("x", 3, 16)
    a = b.conv_bn(x, 16, 8, k=1)
    c = b.conv_bn(b.conv_bn(x, 16, 8, k=1), 8, 12)
    pooled = b.op("MaxPool", [x], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1])
    d = b.conv_bn(pooled, 16, 4, k=1)
    cat = b.op("Concat", [a, c, d], axis=1)
    y = b.conv_bn(cat, 24, 16, k=1)
    return b.model({"x": ["N", 3, 8, 8]}, [_head(b, y, 16)], name="inception")


def grouped_conv_model(seed: int = 0) -> onnx.ModelProto:
    """Conv -> grouped Conv (group=2) -> Conv -> pooling -> Gemm. [N,3,8,8] -> [N,10]."""
    b = GraphBuilder(seed)
    x = b.conv_bn("x", 3, 8)
    x = b.conv_bn(x, 8, 8, group=2)
    x = b.conv_bn(x, 8, 16)
    return b.model({"x": ["N", 3, 8, 8]}, [_head(b, x, 16)], name="grouped")


def shared_weight_model(seed: int = 0) -> onnx.ModelProto:
    """One 8x8x3x3 Conv weight applied twice in a row (with its own bias each time).
    [N,3,8,8] -> [N,10]."""
    b = GraphBuilder(seed)
    x = b.conv_bn("x", 3, 8)
    w = b.const("shared", b.rng.standard_normal((8, 8, 3, 3)).astype(np.float32) * 0.2)
    for _ in range(2):
        bias = b.const("b", b.rng.standard_normal(8).astype(np.float32) * 0.1)
        x = b.op("Relu", [b.op("Conv", [x, w, bias], kernel_shape=[3, 3], pads=[1, 1, 1, 1])])
    return b.model({"x": ["N", 3, 8, 8]}, [_head(b, x, 8)], name="shared")


def attention_model(
    seed: int = 0, d: int = 16, heads: int = 4, hidden: int = 32
) -> onnx.ModelProto:
    """One pre-LN encoder layer written with MatMul/Reshape/Transpose/Softmax, heads split by a
    constant [0, 0, heads, d/heads] and merged by a constant [0, 0, d], and an Erf-GELU MLP.
    x [N,L,d] -> y [N,L,d]."""
    b = GraphBuilder(seed)
    hd = d // heads
    rng = b.rng

    def linear(x: str, cin: int, cout: int) -> str:
        w = b.const("w", rng.standard_normal((cin, cout)).astype(np.float32) / cin**0.5)
        bias = b.const("bias", rng.standard_normal(cout).astype(np.float32) * 0.1)
        return b.op("Add", [b.op("MatMul", [x, w]), bias])

    def layer_norm(x: str) -> str:
        scale = b.const("ln", np.ones(d, np.float32))
        return b.op("LayerNormalization", [x, scale, b.const("lnb", np.zeros(d, np.float32))])

    split = b.const("split", np.array([0, 0, heads, hd], np.int64))
    h = layer_norm("x")
    q, k, v = (b.op("Reshape", [linear(h, d, d), split]) for _ in range(3))
    q = b.op("Transpose", [q], perm=[0, 2, 1, 3])
    k = b.op("Transpose", [k], perm=[0, 2, 3, 1])
    v = b.op("Transpose", [v], perm=[0, 2, 1, 3])
    scores = b.op("Mul", [b.op("MatMul", [q, k]), b.const("scale", np.float32(hd**-0.5))])
    attn = b.op("MatMul", [b.op("Softmax", [scores], axis=-1), v])
    merged = b.op("Reshape", [b.op("Transpose", [attn], perm=[0, 2, 1, 3]),
                              b.const("merge", np.array([0, 0, d], np.int64))])  # fmt: skip
    x = b.op("Add", ["x", linear(merged, d, d)])
    u = linear(layer_norm(x), d, hidden)
    erf = b.op("Erf", [b.op("Div", [u, b.const("sqrt2", np.float32(2**0.5))])])
    gelu = b.op("Mul", [b.op("Mul", [u, b.op("Add", [erf, b.const("one", np.float32(1))])]),
                        b.const("half", np.float32(0.5))])  # fmt: skip
    y = b.op("Add", [x, linear(gelu, hidden, d)])
    return b.model({"x": ["N", "L", d]}, [y], name="attention")


def shuffle_unit_model(seed: int = 0) -> onnx.ModelProto:
    """A ShuffleNet unit whose rows do not split evenly over the second grouped Conv's groups:
    Conv -> grouped Conv (group=3, 30 filters) -> channel shuffle (Reshape [3, 10], Transpose,
    Reshape) -> depthwise Conv -> grouped Conv (group=3, runs of 10) -> Conv. [N,6,5,5] ->
    [N,5,5,5]."""
    b = GraphBuilder(seed)
    x = b.conv_bn("x", 6, 9, k=1)
    x = b.conv_bn(x, 9, 30, k=1, group=3)
    x = b.op("Reshape", [x, b.const("split", np.array([0, 3, 10, 5, 5]))])
    x = b.op("Transpose", [x], perm=[0, 2, 1, 3, 4])
    x = b.op("Reshape", [x, b.const("merge", np.array([0, 30, 5, 5]))])
    x = b.conv_bn(x, 30, 30, act=None, group=30)
    x = b.conv_bn(x, 30, 12, k=1, group=3)
    y = b.conv(x, 12, 5, k=1, bias=True)
    return b.model({"x": ["N", 6, 5, 5]}, [y], name="shuffle_unit")


def nothing_prunable_model(seed: int = 0) -> onnx.ModelProto:
    """A single Conv whose output is the graph output: no channel can go."""
    b = GraphBuilder(seed)
    y = b.conv("x", 3, 4, bias=True)
    return b.model({"x": ["N", 3, 8, 8]}, [y], name="single_conv")


ROBUSTNESS_MODELS = {
    "resnet": resnet_model,
    "mobilenet_v2": mobilenet_v2_model,
    "inception": inception_model,
    "grouped_conv": grouped_conv_model,
    "shared_weight": shared_weight_model,
    "attention": attention_model,
}
