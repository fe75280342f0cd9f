"""Lossless graph simplification, built from onnxscript's optimizer and onnx_ir's common passes.

Constant folding, onnxscript's default rewrite rules (no-op removal, Conv/Gemm+BatchNorm fusion,
reshape and slice clean-ups), function inlining, dead code, identity elimination, common
subexpressions, initializer deduplication, and weights held in ``Constant`` nodes lifted to
initializers so every later pass sees them as weights. Outputs stay within fp32 rounding.

One rewrite of onnxcomp's own puts erf-GELU written as ``x * (0.5 * (1 + erf(x / sqrt 2)))``
(PyTorch's exporter) into the order ONNX Runtime's GELU fusion recognises,
``((1 + erf(x / sqrt 2)) * x) * 0.5``: bit-identical (multiplying by 0.5 is exact), and ONNX
Runtime then runs one BiasGelu kernel where it ran five nodes (5% of the demo encoder's time
at batch 1).

Models on which onnxscript's constant folding is known to produce a wrong or invalid graph
(see :func:`folding_hazard`) skip folding and rewriting, with a note saying why.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import onnx_ir as ir
import onnxscript.optimizer
from onnx_ir.passes import common as common_passes
from onnxscript.rewriter.pattern import RewriteRule, RewriteRuleSet

from onnxcomp.errors import UsageError
from onnxcomp.passes._base import CompressionPass, CompressionResult, PassOptions, option
from onnxcomp.passes._opset import onnx_opset
from onnxcomp.passes._weights import lift_constant_weights


@dataclasses.dataclass(frozen=True)
class SimplifyOptions(PassOptions):
    iterations: int = option(2, "rounds of folding and rewriting")
    fold_limit: int = option(
        8192, "largest constant (elements) folding may read; bigger inputs stay as they are"
    )

    def validate(self) -> None:
        if self.iterations < 1:
            raise UsageError("simplify:iterations must be >= 1")
        if self.fold_limit < 0:
            raise UsageError("simplify:fold_limit must be >= 0")


class SimplifyPass(CompressionPass):
    """Fold constants, remove dead and redundant nodes, lift Constant-node weights."""

    summary = "lossless clean-up: constant folding, dead code, CSE, dedup, lift Constant weights"
    options_class = SimplifyOptions
    lossless = True
    # Any opset, including models that import only other domains (ai.onnx.ml).
    min_opset = 0

    def apply(self, model: ir.Model) -> CompressionResult:
        options: SimplifyOptions = self.options  # type: ignore[assignment]
        before = _fingerprint(model)
        counts_before = _counts(model)
        hazard = folding_hazard(model)
        if hazard is None:
            # Identity nodes are removed by the folder, which keeps one where both ends are
            # graph outputs; onnx_ir's IdentityEliminationPass would then list one value twice
            # (a Scan body doing so makes ONNX Runtime return garbage), so it is not run.
            onnxscript.optimizer.optimize_ir(
                model,
                num_iterations=options.iterations,
                input_size_limit=options.fold_limit,
            )
        else:
            lift_constant_weights(model)
        gelus = GELU_ORDER.apply_to_model(model)
        _make_contiguous(model)
        common_passes.DeduplicateHashedInitializersPass()(model)
        common_passes.RemoveUnusedNodesPass()(model)
        counts_after = _counts(model)
        stats = {
            "nodes": f"{counts_before['nodes']} -> {counts_after['nodes']}",
            "initializers": f"{counts_before['initializers']} -> {counts_after['initializers']}",
            "constant_nodes_lifted_or_folded": counts_before["Constant"] - counts_after["Constant"],
            # onnxscript's default rules fuse BN into Conv/Gemm; say so rather than hide it.
            "batchnorms_fused": counts_before["BatchNormalization"]
            - counts_after["BatchNormalization"],
            "gelus_reordered": gelus,
        }
        notes = [f"skipped constant folding and rewrite rules: {hazard}"] if hazard else []
        return CompressionResult(model, _fingerprint(model) != before, stats=stats, notes=notes)


def _gelu_as_exported(op, x, half, root2, one):
    return op.Mul(x, op.Mul(half, op.Add(op.Erf(op.Div(x, root2)), one)))


def _gelu_as_fused(op, x, half, root2, one):
    return op.Mul(op.Mul(op.Add(op.Erf(op.Div(x, root2)), one), x), half)


def _gelu_constants(context, x, half, root2, one) -> bool:
    """The three constants are the scalars GELU's formula has (any float dtype)."""
    del context, x
    expected = ((half, 0.5, 0.0), (one, 1.0, 0.0), (root2, float(np.sqrt(2.0)), 1e-6))
    for value, number, tolerance in expected:
        tensor = value.const_value
        if tensor is None or tensor.size != 1 or not np.issubdtype(
                tensor.numpy().dtype, np.floating):  # fmt: skip
            return False
        if abs(float(tensor.numpy().reshape(())) - number) > tolerance:
            return False
    return True


GELU_ORDER = RewriteRuleSet(
    [RewriteRule(_gelu_as_exported, _gelu_as_fused, _gelu_constants, name="gelu-order")],
    commute=True,
)


def folding_hazard(model: ir.Model) -> str | None:
    """Why onnxscript's constant folding would break ``model``, or None when it is safe.

    Its SplitToSequence and ConcatFromSequence folding emits Split/Squeeze/Unsqueeze with
    the opset-13 signatures (axes and split as inputs) and Split's opset-18 ``num_outputs``
    whatever the model's opset, and raises on a SplitToSequence whose split is a non-constant
    scalar. Its partial evaluators run before any ``should_fold`` hook, so they cannot be
    turned off node by node.
    """
    opset = onnx_opset(model)
    graphs: list[ir.Graph | ir.Function] = [model.graph, *model.functions.values()]
    for graph in graphs:
        for node in ir.traversal.RecursiveGraphIterator(graph):
            if node.domain not in ("", "ai.onnx"):
                continue
            if node.op_type == "ConcatFromSequence" and opset < 13:
                return f"ConcatFromSequence in an opset-{opset} model (folding needs opset 13)"
            if node.op_type == "SplitToSequence" and len(node.inputs) > 1:
                split = node.inputs[1]
                if split is None:
                    continue
                rank = _rank(split)
                if rank != 1 and split.const_value is None:
                    return "SplitToSequence with a split size that is not a constant"
                if opset < 13 or (rank != 1 and opset < 18):
                    return f"SplitToSequence in an opset-{opset} model (folding needs opset 18)"
    return None


def _make_contiguous(model: ir.Model) -> None:
    """Give folded weights that are strided numpy views (a folded Transpose of a weight) a
    contiguous copy: onnx_ir's initializer dedup hashes the buffer and refuses strided ones."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            raw = tensor.raw if isinstance(tensor, ir.Tensor) else None
            if isinstance(raw, np.ndarray) and not raw.flags.c_contiguous:
                value.const_value = ir.Tensor(
                    np.ascontiguousarray(raw), dtype=tensor.dtype, name=tensor.name
                )


def _rank(value: ir.Value) -> int | None:
    if value.const_value is not None:
        return len(value.const_value.shape)
    return value.shape.rank() if value.shape is not None else None


def _counts(model: ir.Model) -> Counter:
    counts: Counter = Counter()
    for graph in model.graphs():
        counts["initializers"] += len(graph.initializers)
        for node in graph:
            counts["nodes"] += 1
            counts[node.op_type] += 1
    return counts


def _fingerprint(model: ir.Model) -> tuple:
    """Identity of every node, edge and weight tensor: changes whenever a rewrite happened."""
    nodes = tuple(
        (id(node), tuple(id(v) for v in node.inputs), tuple(id(v) for v in node.outputs))
        for graph in model.graphs()
        for node in graph
    )
    weights = tuple(
        (name, id(value.const_value))
        for graph in model.graphs()
        for name, value in graph.initializers.items()
    )
    return nodes, weights, tuple(id(v) for v in model.graph.outputs)
