"""Lossless graph simplification, built from onnxscript's optimizer and onnx_ir's common passes.

Constant folding, onnxscript's default rewrite rules (no-op removal, Conv/Gemm+BatchNorm fusion,
reshape and slice clean-ups), function inlining, dead code, identity elimination, common
subexpressions, initializer deduplication, and weights held in ``Constant`` nodes lifted to
initializers so every later pass sees them as weights. Outputs stay within fp32 rounding.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import onnx_ir as ir
import onnxscript.optimizer
from onnx_ir.passes import common as common_passes

from onnxcomp.errors import UsageError
from onnxcomp.passes._base import CompressionPass, CompressionResult, PassOptions, option


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

    def apply(self, model: ir.Model) -> CompressionResult:
        options: SimplifyOptions = self.options  # type: ignore[assignment]
        before = _fingerprint(model)
        counts_before = _counts(model)
        onnxscript.optimizer.optimize_ir(
            model,
            num_iterations=options.iterations,
            input_size_limit=options.fold_limit,
        )
        common_passes.IdentityEliminationPass()(model)
        common_passes.DeduplicateHashedInitializersPass()(model)
        common_passes.RemoveUnusedNodesPass()(model)
        counts_after = _counts(model)
        stats = {
            "nodes": f"{counts_before['nodes']} -> {counts_after['nodes']}",
            "initializers": f"{counts_before['initializers']} -> {counts_after['initializers']}",
            "constant_nodes_lifted_or_folded": counts_before["Constant"]
            - counts_after["Constant"],
            # onnxscript's default rules fuse BN into Conv/Gemm; say so rather than hide it.
            "batchnorms_fused": counts_before["BatchNormalization"]
            - counts_after["BatchNormalization"],
        }
        return CompressionResult(model, _fingerprint(model) != before, stats=stats)


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
