"""Quantisation math in pure numpy, free of ONNX, so it is unit-tested on its own.

- :mod:`onnxcomp.quant.linear`: scales and zero points per tensor, per channel or per block,
  quantize / dequantize with DequantizeLinear's semantics (round half to even, saturate).
- :mod:`onnxcomp.quant.ternary`: 1-bit (sign, XNOR-Net scale) and ternary (TWN and
  least-squares thresholds) codes with one scale per channel or block.
- :mod:`onnxcomp.quant.pack`: INT4 / INT2 packing in ONNX's byte layout.

Layouts follow DequantizeLinear: ``axis=None`` is one parameter for the whole tensor,
``block_size=0`` one per index of ``axis``, ``block_size>0`` one per run of ``block_size``
elements along ``axis`` (scale shape = weight shape with that axis divided, rounded up).
"""

from onnxcomp.quant.linear import (
    dequantize,
    expand,
    linear_params,
    param_shape,
    qrange,
    quantize,
    quantize_bias,
    reduce_groups,
)
from onnxcomp.quant.pack import pack, unpack
from onnxcomp.quant.ternary import binarize, ternarize

__all__ = [
    "binarize",
    "dequantize",
    "expand",
    "linear_params",
    "pack",
    "param_shape",
    "qrange",
    "quantize",
    "quantize_bias",
    "reduce_groups",
    "ternarize",
    "unpack",
]
