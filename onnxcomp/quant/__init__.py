"""Quantisation math in pure numpy, free of ONNX, so it is unit-tested on its own.

- :mod:`onnxcomp.quant.linear`: scales and zero points per tensor, per channel or per block,
  quantize / dequantize with DequantizeLinear's semantics (round half to even, saturate).
- :mod:`onnxcomp.quant.ternary`: 1-bit (sign, XNOR-Net scale) and ternary (TWN and
  least-squares thresholds) codes with one scale per channel or block.
- :mod:`onnxcomp.quant.pack`: INT4 / INT2 packing in ONNX's byte layout.
- :mod:`onnxcomp.quant.gptq`: GPTQ (rounding errors compensated through the inputs' inverse
  Hessian); :mod:`onnxcomp.quant.awq`: activation-aware per-input-channel scales.
- :mod:`onnxcomp.quant.nbits`: ONNX Runtime's MatMulNBits weight layout.

Layouts follow DequantizeLinear: ``axis=None`` is one parameter for the whole tensor,
``block_size=0`` one per index of ``axis``, ``block_size>0`` one per run of ``block_size``
elements along ``axis`` (scale shape = weight shape with that axis divided, rounded up).
"""

from onnxcomp.quant.awq import activation_scale, awq_scale
from onnxcomp.quant.clip import CLIP_RATIOS, clip_search
from onnxcomp.quant.gptq import (
    Hessian,
    act_order_permutation,
    gptq_quantize,
    inverse_hessian_factor,
    output_error,
)
from onnxcomp.quant.linear import (
    FLOAT32_EXACT,
    NonFiniteWeight,
    by_groups,
    dequantize,
    expand,
    linear_params,
    param_shape,
    qrange,
    quantize,
    quantize_bias,
    reduce_groups,
)
from onnxcomp.quant.nbits import from_matmulnbits, to_matmulnbits
from onnxcomp.quant.pack import pack, unpack
from onnxcomp.quant.ternary import binarize, ternarize

__all__ = [
    "CLIP_RATIOS",
    "FLOAT32_EXACT",
    "Hessian",
    "NonFiniteWeight",
    "act_order_permutation",
    "activation_scale",
    "awq_scale",
    "binarize",
    "by_groups",
    "clip_search",
    "dequantize",
    "expand",
    "from_matmulnbits",
    "gptq_quantize",
    "inverse_hessian_factor",
    "linear_params",
    "output_error",
    "pack",
    "param_shape",
    "qrange",
    "quantize",
    "quantize_bias",
    "reduce_groups",
    "ternarize",
    "to_matmulnbits",
    "unpack",
]
