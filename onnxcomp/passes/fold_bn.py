"""Fold inference-mode BatchNormalization into the linear op that feeds it.

``BN(Conv(x))``, ``BN(ConvTranspose(x))`` and ``BN(Gemm(x))`` use onnxscript's fusion rules;
this module adds ``BN(MatMul(x, W))`` and ``BN(MatMul(x, W) + b)`` for rank-2 activations
(where BN's channel axis is MatMul's output axis). A Conv without bias gets one; a BN whose
output feeds a residual Add folds like any other. BN nodes that cannot be folded (non-constant
statistics, weights shared with another node, a producer that is not linear) stay and are
listed in the result. Outputs stay within fp32 rounding of the input model.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import onnxscript.optimizer
from onnx_ir.passes import common as common_passes
from onnxscript.rewriter import MatchResult, RewriteRuleClassBase, RewriteRuleSet
from onnxscript.rewriter.rules.common import (
    fuse_batchnorm_into_conv_rule,
    fuse_batchnorm_into_conv_transpose_rule,
    fuse_batchnorm_into_gemm_rule,
)

from onnxcomp.passes._base import CompressionPass, CompressionResult, PassOptions
from onnxcomp.passes._opset import onnx_opset, upgrade_opset
from onnxcomp.passes._weights import lift_constant_weights
from onnxcomp.passes.simplify import folding_hazard

BN_EPSILON_DEFAULT = 1e-5
# BatchNormalization-9 dropped the `spatial` attribute whose `0` value changes the math.
BN_MIN_OPSET = 9


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
        before = _batchnorms(model)
        notes = []
        if before:
            if onnx_opset(model) < BN_MIN_OPSET:
                notes += upgrade_opset(model, BN_MIN_OPSET, why="folding BatchNormalization")
                before = _batchnorms(model)
            # The fusion rules need constant initializers: exporters hold weights in Constant
            # nodes, or build a bias-less Conv's zero bias from Shape/Expand; fold those first
            # (unless folding is known to break this model, see simplify.folding_hazard).
            if folding_hazard(model) is None:
                onnxscript.optimizer.fold_constants(model)
            lift_constant_weights(model)
        folded = _RULES.apply_to_model(model) if before else 0
        common_passes.RemoveUnusedNodesPass()(model)
        left = _batchnorms(model)
        notes += [f"kept BatchNormalization '{node.name}': {_why_kept(node)}" for node in left]
        stats = {"batchnorms_folded": folded, "batchnorms_left": len(left)}
        upgraded = len(notes) > len(left)
        return CompressionResult(model, folded > 0 or upgraded, stats=stats, notes=notes)


def _batchnorms(model: ir.Model) -> list[ir.Node]:
    return [n for g in model.graphs() for n in g if n.op_type == "BatchNormalization"]


def _why_kept(node: ir.Node) -> str:
    if len([o for o in node.outputs if o.uses() or o.is_graph_output()]) > 1:
        return "training-mode outputs (running mean/var) are used"
    if any(v is None or v.const_value is None for v in node.inputs[1:5]):
        return "scale/bias/mean/var are not constants"
    if any(v.is_graph_input() for v in node.inputs[1:5]):
        return "scale/bias/mean/var are graph inputs, which a caller may override"
    producer = node.inputs[0].producer() if node.inputs[0] is not None else None
    if producer is None:
        return "its input is a graph input, not a linear op"
    if producer.op_type not in {"Conv", "ConvTranspose", "Gemm", "MatMul", "Add"}:
        return f"it follows {producer.op_type}, which has no weights to fold into"
    if len(producer.outputs[0].uses()) > 1:
        return f"the {producer.op_type} output is also used elsewhere"
    weights = [v for v in producer.inputs[1:] if v is not None]
    if any(v.const_value is None for v in weights):
        return f"the {producer.op_type} weights are not constant"
    if any(v.is_graph_input() for v in weights):
        return f"the {producer.op_type} weights are graph inputs, which a caller may override"
    if any(len(v.uses()) > 1 for v in weights):
        return f"the {producer.op_type} weights are shared with another node"
    if producer.op_type in {"MatMul", "Add"}:
        return "the activation is not rank 2, so BN's channel axis is not MatMul's output axis"
    return f"the {producer.op_type} node does not match a folding rule"


def _bn_scale_shift(bn_node: ir.Node) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (scale, shift) so that BN(y) = y * scale + shift."""
    gamma, beta, mean, var = (v.const_value.numpy().astype(np.float64) for v in bn_node.inputs[1:5])
    eps = bn_node.attributes.get_float("epsilon", BN_EPSILON_DEFAULT)
    scale = gamma / np.sqrt(var + eps)
    return scale, beta - mean * scale


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
    scale, shift = _bn_scale_shift(bn_out.producer())
    weight = w.const_value.numpy()
    bias = b.const_value.numpy().reshape(-1) if b is not None else np.zeros(1)
    dtype = weight.dtype
    new_w = op.initializer(ir.tensor((weight * scale).astype(dtype)), name=f"{w.name}_bnfold")
    new_b = op.initializer(
        ir.tensor((bias * scale + shift).astype(dtype)), name=f"{w.name}_bnfold_bias"
    )
    return op.Add(op.MatMul(x, new_w), new_b)


_RULES = RewriteRuleSet(
    [
        fuse_batchnorm_into_conv_rule,
        fuse_batchnorm_into_conv_transpose_rule,
        fuse_batchnorm_into_gemm_rule,
        _FoldBatchNormIntoMatMulAdd.rule(),
        _FoldBatchNormIntoMatMul.rule(),
    ],
    commute=True,
)
