"""ONNX operators as small torch functions: the op table :class:`OnnxModule` interprets with.

Each entry of :data:`OPS` takes the node's inputs (torch tensors, ``None`` for an omitted
optional input) and its attributes (plain Python values; tensors as torch tensors; ``_opset``
the model's default-domain opset, ``_outputs`` the node's output count, plus what the module
prepared for the op, such as ``_qrange`` or compiled control-flow bodies) and returns a tensor
or a tuple of tensors. Semantics follow the ONNX spec as ONNX Runtime implements it, in every
opset since 7 where older forms differ (attribute forms of Slice, Squeeze, Unsqueeze, Split,
Clip, Pad and the reductions; Upsample and Resize-10's nearest rounding; Scan-8). Float ops are
differentiable where the op is; integer, boolean and shape ops pass values through.

The families live in their own modules (elementwise, tensor, nn, reduce, quantize, image,
recurrent, attention, control, signal); this table is the one registry.
"""

from __future__ import annotations

from onnxcomp.distill.ops import (
    attention,
    control,
    elementwise,
    image,
    nn,
    quantize,
    recurrent,
    reduce,
    signal,
    tensor,
)
from onnxcomp.distill.ops._common import TORCH_DTYPES, OpFn
from onnxcomp.distill.ops.quantize import expand_param

OPS: dict[str, OpFn] = {
    **elementwise.OPS,
    **tensor.OPS,
    **nn.OPS,
    **reduce.OPS,
    **quantize.OPS,
    **image.OPS,
    **recurrent.OPS,
    **attention.OPS,
    **control.OPS,
    **signal.OPS,
}

__all__ = ["OPS", "TORCH_DTYPES", "OpFn", "expand_param"]
