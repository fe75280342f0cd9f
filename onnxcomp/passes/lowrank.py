"""Low-rank factorisation (``lowrank``): a weight matrix becomes two thinner ones, ``W ≈ L·R``.

Each Gemm / MatMul weight ``W[m, n]`` (and, with ``op_types`` including Conv, each Conv
weight seen as ``[out, in·kh·kw]``) is replaced by its truncated SVD (see
:mod:`onnxcomp.factor`), the rank chosen by ``energy`` (the fewest singular values holding
that share of the squared spectrum) or ``ratio`` (that share of ``min(m, n)``):

- ``MatMul(x, W)`` -> ``MatMul(MatMul(x, L), R)``;
- ``Gemm(A, W, C)`` -> ``Gemm(Gemm(A, L), R, C)`` with ``alpha``, ``beta``, ``transA`` kept;
  with ``transB=1`` (``W`` stored ``[out, in]``) both factors are stored that way too;
- ``Conv(x, W, b)`` (group 1) -> a ``kh x kw`` Conv to ``r`` channels (same strides, pads,
  dilations) followed by a 1x1 Conv to the outputs with the bias.

A layer is factored only where it saves parameters (``r·(m + n) < m·n``, and at least
``min_saving`` of them); every weight left alone is listed in the notes with the reason. A
tensor shared by several layers is factored once and every consumer rewired to the same
factors. Outputs move by about the dropped energy (per layer, the relative Frobenius error is
reported); recover accuracy with distillation. Run it before quantisation: quantised weights
(DequantizeLinear) are skipped.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import numpy as np
import onnx_ir as ir

from onnxcomp import factor
from onnxcomp.errors import UsageError
from onnxcomp.passes._base import (
    CompressionPass,
    CompressionResult,
    PassOptions,
    name_list,
    option,
)
from onnxcomp.passes._weights import (
    Weight,
    add_initializer,
    find_weights,
    lift_constant_weights,
    lifted_note,
)

FACTORABLE_OPS = ("Gemm", "MatMul", "Conv")


@dataclasses.dataclass(frozen=True)
class LowRankOptions(PassOptions):
    """Options of ``lowrank``."""

    energy: float = option(
        0.9, "keep the fewest singular values holding this share of the squared energy"
    )
    ratio: float = option(0.0, "if > 0: rank = ratio x min(m, n) instead of the energy rule")
    min_saving: float = option(
        0.0, "factor a layer only if its parameters shrink by more than this share"
    )
    op_types: tuple[str, ...] = option(("Gemm", "MatMul"), "ops whose weights are factored")
    exclude: tuple[str, ...] = option((), "fnmatch patterns of node or weight names left dense")
    min_size: int = option(1024, "leave weights with fewer elements dense")

    def validate(self) -> None:
        if not 0.0 < self.energy <= 1.0:
            raise UsageError(f"lowrank:energy must be in (0, 1], got {self.energy}")
        if not 0.0 <= self.ratio <= 1.0:
            raise UsageError(f"lowrank:ratio must be in [0, 1] (0: use energy), got {self.ratio}")
        if not 0.0 <= self.min_saving < 1.0:
            raise UsageError(f"lowrank:min_saving must be in [0, 1), got {self.min_saving}")
        unknown = sorted(set(self.op_types) - set(FACTORABLE_OPS))
        if unknown:
            raise UsageError(
                f"lowrank: cannot factor {', '.join(unknown)} weights "
                f"(valid op_types: {', '.join(FACTORABLE_OPS)})"
            )
        if self.min_size < 0:
            raise UsageError(f"lowrank:min_size must be >= 0, got {self.min_size}")


class LowRankPass(CompressionPass):
    """Replace Gemm / MatMul (optionally Conv) weights by truncated-SVD factor pairs."""

    summary = "factor Gemm/MatMul (and Conv) weights as W ≈ L·R by truncated SVD"
    options_class = LowRankOptions
    options: LowRankOptions

    def apply(self, model: ir.Model) -> CompressionResult:
        o = self.options
        lifted = lift_constant_weights(model)
        weights, skipped = find_weights(model, o.op_types, exclude=o.exclude, min_size=o.min_size)
        notes = [str(s) for s in skipped]
        notes = lifted_note(lifted) + notes
        kept: dict[str, list[str]] = defaultdict(list)
        per_layer: dict[str, dict] = {}
        before = after = 0
        for weight in weights:
            matrix, reason = _as_matrix(weight)
            if matrix is None:
                kept[reason].append(weight.name)
                continue
            m, n = matrix.shape
            values = factor.singular_values(matrix)
            if o.ratio > 0:
                rank = factor.rank_for_ratio(m, n, o.ratio)
            else:
                rank = factor.rank_for_energy(values, o.energy)
            if rank == 0:
                kept["all zeros"].append(weight.name)
                continue
            saving = 1 - rank * (m + n) / (m * n)
            if saving <= o.min_saving:
                limit = factor.break_even_rank(m, n)
                kept[f"no saving at the chosen rank (break-even rank {limit})"].append(
                    f"{weight.name} (rank {rank} of {min(m, n)})"
                )
                continue
            factors = factor.factorize(matrix, rank)
            _rewire(model.graph, weight, factors)
            before += m * n
            after += rank * (m + n)
            per_layer[weight.name] = {
                "shape": list(weight.shape),
                "rank": rank,
                "full_rank": min(m, n),
                "rel_error": round(factors.relative_error, 5),
                "energy": round(factors.energy, 5),
            }
        for reason, names in kept.items():
            notes.append(f"kept {len(names)} weights dense ({reason}): {name_list(names)}")
        if not weights:
            notes.append(f"no {'/'.join(o.op_types)} weights to factor")
        stats = {
            "rule": f"ratio={o.ratio}" if o.ratio > 0 else f"energy={o.energy}",
            "layers_factored": len(per_layer),
            "weight_params_before": before,
            "weight_params_after": after,
            "max_rel_error": max((v["rel_error"] for v in per_layer.values()), default=0.0),
            "per_layer": per_layer,
        }
        if per_layer:
            notes.append("outputs move with the dropped energy; recover accuracy with distillation")
        return CompressionResult(model, bool(per_layer), stats=stats, notes=notes)


def _as_matrix(weight: Weight) -> tuple[np.ndarray | None, str]:
    """The weight as the 2-D matrix its consumers multiply by, or None and why not."""
    ops = weight.op_types
    array = weight.array
    if ops == {"Conv"}:
        if any(use.node.attributes.get_int("group", 1) != 1 for use in weight.uses):
            return None, "grouped Conv"
        if array.ndim < 3:
            return None, "Conv weight without spatial axes"
        return array.reshape(array.shape[0], -1), ""
    if "Conv" in ops:
        return None, "read by Conv and by Gemm/MatMul"
    if array.ndim != 2:
        return None, f"a {array.ndim}-D MatMul operand, not a matrix"
    return array, ""


def _rewire(graph: ir.Graph, weight: Weight, factors: factor.Factors) -> None:
    """Replace every consumer of ``weight`` by two nodes over the factor initializers."""
    left, right = factors.left, factors.right  # the weight (as a matrix) ≈ left @ right
    if weight.op_types == {"Conv"}:
        shape = weight.shape
        left = left.reshape(shape[0], factors.rank, *([1] * (len(shape) - 2)))
        right = right.reshape(factors.rank, *shape[1:])
    left_value = add_initializer(graph, f"{weight.name}.lowrank_left", ir.tensor(left))
    right_value = add_initializer(graph, f"{weight.name}.lowrank_right", ir.tensor(right))
    for use in weight.uses:
        _replace_use(graph, use.node, left_value, right_value)
    graph.initializers.pop(weight.name)


def _replace_use(graph: ir.Graph, node: ir.Node, left: ir.Value, right: ir.Value) -> None:
    """``node`` reads ``left @ right`` (as a matrix) as its weight: split it in two nodes.

    MatMul and Gemm: ``x @ W = (x @ L) @ R``; Gemm with transB stores ``W^T = L @ R``, so
    ``x @ W = (x @ R^T) @ L^T``. Conv: the spatial conv by ``R`` to rank channels, then the
    1x1 conv by ``L`` (with the bias).
    """
    inputs = list(node.inputs)
    attrs = dict(node.attributes.items())
    name = node.name or node.outputs[0].name or "layer"
    if node.op_type == "MatMul":
        first = ir.node("MatMul", [inputs[0], left])
        second = ir.node("MatMul", [first.outputs[0], right])
    elif node.op_type == "Gemm":
        trans_b = node.attributes.get_int("transB", 0)
        inner, outer = (right, left) if trans_b else (left, right)
        kept = {k: v for k, v in attrs.items() if k not in ("transA", "transB")}
        transposes = {"transA": node.attributes.get_int("transA", 0), "transB": trans_b}
        first_inputs = [inputs[0], inner]
        if graph.opset_imports.get("", graph.opset_imports.get("ai.onnx", 0)) < 11:
            # Gemm's C is required before opset 11: a zero that broadcasts.
            zero = np.zeros(1, dtype=inner.const_value.numpy().dtype)
            first_inputs.append(add_initializer(graph, f"{name}_lowrank_zero", ir.tensor(zero)))
        first = ir.node("Gemm", first_inputs, transposes)
        second = ir.node(
            "Gemm", [first.outputs[0], outer, *inputs[2:]], {**kept, "transB": trans_b}
        )
    else:
        first = ir.node("Conv", [inputs[0], right], attrs)
        second = ir.node("Conv", [first.outputs[0], left, *inputs[2:]])
    first.name, second.name = f"{name}_lowrank_a", f"{name}_lowrank_b"
    first.outputs[0].name = f"{name}_lowrank"
    if node.outputs[0].dtype is not None:
        first.outputs[0].dtype = node.outputs[0].dtype
    ir.convenience.replace_nodes_and_values(
        graph, node, [node], [first, second], [node.outputs[0]], [second.outputs[0]]
    )
