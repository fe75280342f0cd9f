"""Build ``mbv3_block.onnx``: a stack of MobileNetV3-style inverted-residual blocks.

Why: ONNX Runtime's default static QDQ quantisation makes such models *slower* than fp32 on
CPU, because Q/DQ pairs around HardSwish, HardSigmoid and the squeeze-excite Mul block its
integer-kernel fusions. This model lets onnxcomp's ``int8-static`` placement be measured on
that pattern. Weights are random (fixed seed), scaled so activations stay in a realistic range;
the model is not trained, so there is no accuracy, only output agreement.

Each block: 1x1 expand Conv + HardSwish, depthwise 3x3 Conv + HardSwish, squeeze-excite
(GlobalAveragePool, 1x1 Conv, Relu, 1x1 Conv, HardSigmoid, Mul), 1x1 project Conv, residual
Add. A stem 3x3 Conv + HardSwish brings 3 input channels to the block width; a head of
GlobalAveragePool, Flatten and Gemm gives 10 logits. BatchNormalization is already folded
into the convolutions (as exported inference models have it).

Outputs, written next to this script (plain onnx + numpy; no torch, no onnxcomp):

* ``mbv3_block.onnx``      - ``input`` float32 [N, 3, 56, 56] -> ``logits`` float32 [N, 10],
                             opset 17, weights in initializers;
* ``mbv3_block_calib.npz`` - ``input`` float32 [16, 3, 56, 56] (standard normal, fixed seed).

Run from the repository root: ``python models/build_mobilenet_block.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent
ONNX_PATH = HERE / "mbv3_block.onnx"
CALIB_PATH = HERE / "mbv3_block_calib.npz"

SEED = 0
OPSET = 17
IN_CHANNELS, WIDTH, EXPAND, SQUEEZE, BLOCKS, SIZE, CLASSES = 3, 16, 64, 16, 3, 56, 10
CALIB_SAMPLES = 16


def build(seed: int = SEED, blocks: int = BLOCKS, size: int = SIZE) -> onnx.ModelProto:
    """The model, with random He-scaled weights drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[TensorProto] = []

    def conv(x: str, name: str, cin: int, cout: int, k: int = 1, group: int = 1) -> str:
        fan_in = cin // group * k * k
        w = rng.standard_normal((cout, cin // group, k, k)) * np.sqrt(2.0 / fan_in)
        b = rng.uniform(-0.1, 0.1, cout)
        inits.append(numpy_helper.from_array(w.astype(np.float32), f"{name}.weight"))
        inits.append(numpy_helper.from_array(b.astype(np.float32), f"{name}.bias"))
        pad = k // 2
        nodes.append(
            helper.make_node(
                "Conv", [x, f"{name}.weight", f"{name}.bias"], [name], name=name,
                kernel_shape=[k, k], pads=[pad] * 4, group=group,
            )
        )  # fmt: skip
        return name

    def op(op_type: str, inputs: list[str], name: str, **attrs) -> str:
        nodes.append(helper.make_node(op_type, inputs, [name], name=name, **attrs))
        return name

    x = op("HardSwish", [conv("input", "stem", IN_CHANNELS, WIDTH, k=3)], "stem_act")
    for i in range(blocks):
        p = f"block{i}"
        h = op("HardSwish", [conv(x, f"{p}.expand", WIDTH, EXPAND)], f"{p}.expand_act")
        h = op("HardSwish", [conv(h, f"{p}.dw", EXPAND, EXPAND, k=3, group=EXPAND)], f"{p}.dw_act")
        s = op("GlobalAveragePool", [h], f"{p}.se_pool")
        s = op("Relu", [conv(s, f"{p}.se_reduce", EXPAND, SQUEEZE)], f"{p}.se_relu")
        s = op("HardSigmoid", [conv(s, f"{p}.se_expand", SQUEEZE, EXPAND)], f"{p}.se_gate",
               alpha=1.0 / 6, beta=0.5)  # fmt: skip
        h = op("Mul", [h, s], f"{p}.se_mul")
        x = op("Add", [conv(h, f"{p}.project", EXPAND, WIDTH), x], f"{p}.residual")
    pooled = op("Flatten", [op("GlobalAveragePool", [x], "head_pool")], "head_flat")
    fc_w = rng.standard_normal((CLASSES, WIDTH)) * np.sqrt(1.0 / WIDTH)
    inits.append(numpy_helper.from_array(fc_w.astype(np.float32), "fc.weight"))
    inits.append(numpy_helper.from_array(np.zeros(CLASSES, np.float32), "fc.bias"))
    nodes.append(
        helper.make_node("Gemm", [pooled, "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1)
    )
    graph = helper.make_graph(
        nodes,
        "mbv3_blocks",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", IN_CHANNELS, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    model = onnx.shape_inference.infer_shapes(model)
    onnx.checker.check_model(model, full_check=True)
    return model


def calibration_data(seed: int = SEED, samples: int = CALIB_SAMPLES) -> np.ndarray:
    """Standard-normal inputs [samples, 3, SIZE, SIZE]."""
    rng = np.random.default_rng(seed + 1)
    return rng.standard_normal((samples, IN_CHANNELS, SIZE, SIZE)).astype(np.float32)


def main() -> None:
    model = build()
    onnx.save(model, ONNX_PATH)
    np.savez_compressed(CALIB_PATH, input=calibration_data())
    for path in (ONNX_PATH, CALIB_PATH):
        print(f"wrote {path.name}: {path.stat().st_size / 1024:.1f} KB")


if __name__ == "__main__":
    main()
