"""Distillation's torch side: an onnx_ir graph as a trainable module, and write-back.

Needs torch (``pip install torch==2.13.0`` for the CPU build, then ``pip install -e ".[torch]"``);
nothing outside this package imports it, so the rest of onnxcomp runs without torch.

- :class:`OnnxModule` interprets an ``onnx_ir.Model`` with torch ops: weights are parameters
  keyed by their ONNX names, pruned weights keep their zeros, quantised weights train on their
  grid (fake quantisation with a straight-through estimator), and
  :meth:`OnnxModule.write_back` puts trained weights into the same graph by name.
- :data:`SUPPORTED_OPS`: the op types it implements (default domain).
"""

from onnxcomp.distill.fake_quant import QuantGrid
from onnxcomp.distill.module import OnnxModule, UnsupportedOpError, to_torch
from onnxcomp.distill.ops import OPS

SUPPORTED_OPS: frozenset[str] = frozenset({*OPS, "Constant"})

__all__ = ["SUPPORTED_OPS", "OnnxModule", "QuantGrid", "UnsupportedOpError", "to_torch"]
