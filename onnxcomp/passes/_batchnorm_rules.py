"""The rewrite rules that fold a BatchNormalization into the op before it: onnxscript's for
Conv / ConvTranspose / Gemm, and onnxcomp's own for ``BN(MatMul(x, W))`` and
``BN(MatMul(x, W) + b)`` with rank-2 activations. Imported by
:func:`onnxcomp.passes._batchnorm.fold_batchnorms` when a model has BatchNorms (onnxscript
is slow to import)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import MatchResult, RewriteRuleClassBase, RewriteRuleSet
from onnxscript.rewriter.rules.common import (
    fuse_batchnorm_into_conv_rule,
    fuse_batchnorm_into_conv_transpose_rule,
    fuse_batchnorm_into_gemm_rule,
)

from onnxcomp.passes._batchnorm import bn_scale_shift


class _FoldBatchNormIntoMatMul(RewriteRuleClassBase):
    """``BN(MatMul(x, W))`` -> ``MatMul(x, W * s) + shift`` for rank-2 x."""

    def pattern(self, op, x, w):
        return op.BatchNormalization(op.MatMul(x, w), _allow_other_inputs=True, _outputs=["bn_out"])

    def check(self, context, x, w, bn_out, **_):
        return _check_matmul_fold(x, w, None, bn_out)

    def rewrite(self, op, x, w, bn_out, **_):
        return _fold_matmul(op, x, w, None, bn_out)


class _FoldBatchNormIntoMatMulAdd(RewriteRuleClassBase):
    """``BN(MatMul(x, W) + b)`` -> ``MatMul(x, W * s) + (b * s + shift)`` for rank-2 x."""

    def pattern(self, op, x, w, b):
        return op.BatchNormalization(
            op.Add(op.MatMul(x, w), b), _allow_other_inputs=True, _outputs=["bn_out"]
        )

    def check(self, context, x, w, b, bn_out, **_):
        return _check_matmul_fold(x, w, b, bn_out)

    def rewrite(self, op, x, w, b, bn_out, **_):
        return _fold_matmul(op, x, w, b, bn_out)


def _check_matmul_fold(x, w, b, bn_out) -> MatchResult:
    result = MatchResult()
    bn_node = bn_out.producer()
    if any(o.uses() or o.is_graph_output() for o in bn_node.outputs[1:]):
        return result.fail("training-mode BatchNormalization")
    if any(v is None or v.const_value is None for v in bn_node.inputs[1:5]):
        return result.fail("BatchNormalization statistics are not constant")
    for value in [w] if b is None else [w, b]:
        if value.const_value is None or not value.is_initializer() or value.is_graph_input():
            return result.fail(f"{value.name} is not a constant initializer")
        if len(value.uses()) > 1:
            return result.fail(f"{value.name} is shared with another node")
    if w.const_value.shape is None or len(w.const_value.shape) != 2:
        return result.fail("MatMul weight is not a matrix")
    # BN normalises axis 1; that is MatMul's output axis only when x is a matrix.
    if x.shape is None or len(x.shape) != 2:
        return result.fail("activation rank is not known to be 2")
    channels = w.const_value.shape[1]
    if bn_node.inputs[1].const_value.shape[0] != channels:
        return result.fail("BatchNormalization size differs from the MatMul output size")
    if b is not None and b.const_value.size not in (1, channels):
        return result.fail("bias does not broadcast per output channel")
    return result


def _fold_matmul(op, x, w, b, bn_out):
    scale, shift = bn_scale_shift(bn_out.producer())
    weight = w.const_value.numpy()
    bias = b.const_value.numpy().reshape(-1) if b is not None else np.zeros(1)
    dtype = weight.dtype
    new_w = op.initializer(ir.tensor((weight * scale).astype(dtype)), name=f"{w.name}_bnfold")
    new_b = op.initializer(
        ir.tensor((bias * scale + shift).astype(dtype)), name=f"{w.name}_bnfold_bias"
    )
    return op.Add(op.MatMul(x, new_w), new_b)


FOLD_RULES = RewriteRuleSet(
    [
        fuse_batchnorm_into_conv_rule,
        fuse_batchnorm_into_conv_transpose_rule,
        fuse_batchnorm_into_gemm_rule,
        _FoldBatchNormIntoMatMulAdd.rule(),
        _FoldBatchNormIntoMatMul.rule(),
    ],
    commute=True,
)
