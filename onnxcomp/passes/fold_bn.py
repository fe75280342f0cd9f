"""Fold inference-mode BatchNormalization into the linear op that feeds it.

``BN(Conv(x))``, ``BN(ConvTranspose(x))`` and ``BN(Gemm(x))`` use onnxscript's fusion rules;
``BN(MatMul(x, W))`` and ``BN(MatMul(x, W) + b)`` for rank-2 activations (where BN's channel
axis is MatMul's output axis) are :mod:`onnxcomp.passes._batchnorm`'s, which the weight
quantisation pass shares. A Conv without bias gets one; a BN whose
output feeds a residual Add folds like any other. BN nodes that cannot be folded (non-constant
statistics, weights shared with another node, a producer that is not linear) stay and are
listed in the result. Outputs stay within fp32 rounding of the input model.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir
from onnx_ir.passes import common as common_passes

from onnxcomp.passes._base import CompressionPass, CompressionResult, PassOptions
from onnxcomp.passes._batchnorm import batchnorms, fold_batchnorms, why_kept


@dataclasses.dataclass(frozen=True)
class FoldBatchNormOptions(PassOptions):
    """fold-bn has no options: folding is exact up to fp32 rounding."""


class FoldBatchNormPass(CompressionPass):
    """Fold BatchNormalization into preceding Conv / ConvTranspose / Gemm / MatMul(+Add)."""

    summary = "fold BatchNormalization into the preceding Conv/ConvTranspose/Gemm/MatMul weights"
    options_class = FoldBatchNormOptions
    lossless = True
    # Only a model that has BatchNormalization nodes needs opset >= BN_MIN_OPSET; apply
    # upgrades an older one (the converter refuses a `spatial=0` BN it cannot express).
    min_opset = 0

    def apply(self, model: ir.Model) -> CompressionResult:
        folded, notes = fold_batchnorms(model)
        common_passes.RemoveUnusedNodesPass()(model)
        left = batchnorms(model)
        upgraded = bool(notes)
        notes += [f"kept BatchNormalization '{node.name}': {why_kept(node)}" for node in left]
        stats = {"batchnorms_folded": folded, "batchnorms_left": len(left)}
        return CompressionResult(model, folded > 0 or upgraded, stats=stats, notes=notes)
