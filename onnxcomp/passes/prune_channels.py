"""Structured pruning (``prune-channels``): remove whole channels, hidden units and attention heads.

The channel groups come from :mod:`onnxcomp.analysis.channels`: sets of channels that every
dependent tensor must lose together (a Conv's filters and bias, the BatchNormalization after it,
the next layer's input slices, the other branch of a residual Add, the Q/K/V/output projections
of one attention head, ...). For each safe group the pass ranks its units (channels, or whole
heads) by an importance score, removes the lowest ``ratio`` share, and physically slices every
member tensor, the depthwise ``group`` attributes and the Reshape shape constants that hold the
group's size; intermediate value shapes are updated to match. Groups the analysis cannot prove
safe are left whole and listed in the notes with the reason.

What it promises: the pruned model computes exactly what the input model computes with the
removed channels' contributions to the next layers set to zero (their input slices of the
consuming Conv/Gemm/MatMul weights zeroed). Accuracy drops without fine-tuning; the pipeline's
numeric check reports by how much.

Importance per unit (larger = kept): ``l1`` / ``l2``: norm of the producing layers' output
slices (filters, weight columns), summed over the group's producers; ``bn-scale``: ``|gamma|`` of
the BatchNormalizations in the group (groups without one fall back to ``l1``, with a note);
``entropy``: activation entropy of the channels where the next layers read them, on ``--data``
(:func:`onnxcomp.analysis.importance.channel_entropy`); a feature map's channel is first averaged
over its spatial positions, so its entropy measures how its response varies across inputs.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common as common_passes

from onnxcomp.analysis.channels import (
    ChannelAnalysis,
    ChannelGroup,
    analyze_channels,
    positions,
    target_sources,
)
from onnxcomp.errors import UsageError
from onnxcomp.passes._base import CompressionPass, CompressionResult, PassOptions, option
from onnxcomp.passes._weights import lift_constant_weights, matches

if TYPE_CHECKING:
    from onnxcomp.data import Dataset


@dataclasses.dataclass(frozen=True)
class ChannelPruneOptions(PassOptions):
    """Options of ``prune-channels``."""

    ratio: float = option(0.5, "share of channels removed (per group, or overall), 0 <= r < 1")
    scope: Literal["group", "global"] = option(
        "group", "group: every group loses ratio; global: one ranking across groups"
    )
    importance: Literal["l1", "l2", "bn-scale", "entropy"] = option(
        "l1", "unit score: l1, l2 (output weights), bn-scale (|gamma|), entropy (needs --data)"
    )
    round_to: int = option(1, "keep channel counts a multiple of this where possible (8, 16)")
    min_channels: int = option(1, "keep at least this many channels in every group")
    exclude: tuple[str, ...] = option(
        (), "fnmatch patterns of layer (node) or weight names whose output channels stay"
    )
    heads: bool = option(True, "prune whole attention heads of MatMul-based attention")
    bins: int = option(32, "histogram bins per channel for importance=entropy")
    samples: int = option(512, "samples of --data that importance=entropy runs")

    def validate(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise UsageError(f"prune-channels:ratio must be in [0, 1), got {self.ratio}")
        if self.round_to < 1:
            raise UsageError(f"prune-channels:round_to must be >= 1, got {self.round_to}")
        if self.min_channels < 1:
            raise UsageError(f"prune-channels:min_channels must be >= 1, got {self.min_channels}")
        if self.bins < 2:
            raise UsageError(f"prune-channels:bins must be >= 2, got {self.bins}")
        if self.samples < 1:
            raise UsageError(f"prune-channels:samples must be >= 1, got {self.samples}")


class ChannelPrunePass(CompressionPass):
    """Remove the least important channels / hidden units / heads and shrink every tensor."""

    summary = "remove whole channels, hidden units and attention heads (structured, shrinks)"
    options_class = ChannelPruneOptions
    options: ChannelPruneOptions

    def preflight(self) -> None:
        super().preflight()
        if self.options.importance == "entropy" and self.data is None:
            raise UsageError(
                "prune-channels:importance=entropy ranks channels by their activations on real "
                "inputs: pass --data FILE.npz"
            )

    def apply(self, model: ir.Model) -> CompressionResult:
        o = self.options
        lifted = lift_constant_weights(model) > 0
        common_passes.TopologicalSortPass()(model)
        common_passes.NameFixPass()(model)
        common_passes.ShapeInferencePass()(model)
        analysis = analyze_channels(model)
        notes: list[str] = []
        candidates: list[int] = []
        for index, group in enumerate(analysis.groups):
            reason = self._skip_reason(group)
            if reason:
                notes.append(f"skipped group {group.name} ({group.channels} channels): {reason}")
            else:
                candidates.append(index)
        stats: dict = {
            "importance": o.importance,
            "ratio": o.ratio,
            "scope": o.scope,
            "groups": len(analysis.groups),
            "groups_skipped": len(analysis.groups) - len(candidates),
        }
        params_before = _params(model)
        if not candidates:
            reasons = sorted({n.split(": ", 1)[-1] for n in notes}) or ["no layer with weights"]
            notes.insert(0, "no prunable channel groups: " + "; ".join(reasons[:5]))
            stats.update(groups_pruned=0, params_before=params_before, params_after=params_before)
            return CompressionResult(model, lifted, stats=stats, notes=notes)

        groups = [analysis.groups[i] for i in candidates]
        scores, score_notes = self._scores(model, analysis, groups)
        notes += score_notes
        keep_counts = [
            kept_units(g.units, g.unit, o.ratio, o.round_to, o.min_channels) for g in groups
        ]
        if o.scope == "global":
            keep_counts = global_keep_counts(
                scores, [g.unit for g in groups], o.ratio, o.round_to, o.min_channels
            )
        removed: dict[int, np.ndarray] = {}
        channels: dict[str, str] = {}
        for index, group, score, keep in zip(candidates, groups, scores, keep_counts, strict=True):
            if keep >= group.units:
                notes.append(f"group {group.name}: kept all {group.channels} channels "
                             f"(ratio {o.ratio}, round_to {o.round_to})")  # fmt: skip
                continue
            drop = np.setdiff1d(np.arange(group.units), top_units(score, keep))
            removed[index] = drop
            label = f"{group.channels}->{keep * group.unit}"
            if group.heads:
                label += f" ({group.units}->{keep} heads)"
            channels[group.name] = label
        if removed:
            apply_removal(model, analysis, removed)
        stats.update(
            groups_pruned=len(removed),
            channels=channels,
            params_before=params_before,
            params_after=_params(model),
        )
        return CompressionResult(model, bool(removed) or lifted, stats=stats, notes=notes)

    def _skip_reason(self, group: ChannelGroup) -> str | None:
        o = self.options
        if not group.safe:
            return "; ".join(group.reasons)
        names = [m.value.name for m in group.members if m.role == "out"]
        names += [n.name for n in group.producers]
        if o.exclude and matches(o.exclude, *names):
            return "excluded by pattern"
        if group.heads and not o.heads:
            return "attention heads (heads=false)"
        if group.units < 2:
            return "a single unit (one channel or one head) cannot be pruned"
        return None

    def _scores(
        self, model: ir.Model, analysis: ChannelAnalysis, groups: Sequence[ChannelGroup]
    ) -> tuple[list[np.ndarray], list[str]]:
        o = self.options
        if o.importance == "entropy":
            assert self.data is not None  # requires() checked
            return entropy_scores(model, analysis, groups, self.data, o.bins, o.samples)
        scores, notes = [], []
        for group in groups:
            score = None
            if o.importance == "bn-scale":
                score = member_scores(group, "bn-scale", "l1")
                if score is None:
                    notes.append(f"group {group.name}: no BatchNormalization; ranked by l1")
            if score is None:
                score = member_scores(group, "out", "l2" if o.importance == "l2" else "l1")
            scores.append(score if score is not None else np.zeros(group.units))
        return scores, notes


def kept_units(units: int, unit: int, ratio: float, round_to: int, min_channels: int) -> int:
    """Units a group keeps: ``ratio`` of them removed (rounded down), at least ``min_channels``
    channels, then rounded up so the kept channel count is a multiple of ``round_to``."""
    keep = units - math.floor(ratio * units + 1e-9)
    keep = max(keep, min(units, math.ceil(min_channels / unit)), 1)
    step = math.lcm(unit, round_to) // unit
    return min(units, math.ceil(keep / step) * step)


def global_keep_counts(
    scores: Sequence[np.ndarray],
    unit_sizes: Sequence[int],
    ratio: float,
    round_to: int,
    min_channels: int,
) -> list[int]:
    """Units each group keeps when ``ratio`` of all channels go under one ranking.

    Scores are divided by their group's mean so groups of different scales compete; each group
    keeps at least ``min_channels`` channels and at least one unit, and its kept count is then
    rounded up to ``round_to`` channels as in :func:`kept_units`.
    """
    total = sum(len(s) * u for s, u in zip(scores, unit_sizes, strict=True))
    budget = math.floor(ratio * total + 1e-9)
    ranked = []
    for g, score in enumerate(scores):
        mean = float(np.mean(score)) if len(score) else 0.0
        norm = score / mean if mean > 0 else np.zeros_like(score, dtype=np.float64)
        ranked += [(float(v), g, u) for u, v in enumerate(norm)]
    ranked.sort()
    keep = [len(s) for s in scores]
    minimum = [max(1, min(len(s), math.ceil(min_channels / u)))
               for s, u in zip(scores, unit_sizes, strict=True)]  # fmt: skip
    removed = 0
    for _, g, _ in ranked:
        if removed >= budget:
            break
        if keep[g] > minimum[g] and removed + unit_sizes[g] <= budget:
            keep[g] -= 1
            removed += unit_sizes[g]
    result = []
    for k, s, u in zip(keep, scores, unit_sizes, strict=True):
        step = math.lcm(u, round_to) // u
        result.append(min(len(s), math.ceil(k / step) * step))
    return result


def top_units(score: np.ndarray, keep: int) -> np.ndarray:
    """Indices of the ``keep`` highest scores, ties to the lower index, in ascending order."""
    order = np.argsort(-np.asarray(score, dtype=np.float64), kind="stable")
    return np.sort(order[:keep])


def member_scores(group: ChannelGroup, role: str, norm: Literal["l1", "l2"]) -> np.ndarray | None:
    """Per-unit l1 (or l2) norm of the group's member slices of ``role``; None if it has none."""
    total = np.zeros(group.units, np.float64)
    found = False
    for member in group.members:
        if member.role != role:
            continue
        array = np.asarray(member.value.const_value.numpy(), dtype=np.float64)
        values = np.abs(array) if norm == "l1" else array * array
        per_position = values.sum(axis=tuple(i for i in range(array.ndim) if i != member.axis))
        for u in range(group.units):
            total[u] += per_position[positions(member.segment, group.unit, [u])].sum()
        found = True
    if not found:
        return None
    return np.sqrt(total) if norm == "l2" else total


def entropy_scores(
    model: ir.Model,
    analysis: ChannelAnalysis,
    groups: Sequence[ChannelGroup],
    data: Dataset,
    bins: int,
    samples: int,
) -> tuple[list[np.ndarray], list[str]]:
    """Per-unit mean activation entropy where the next layers read the group's channels."""
    from onnxcomp.analysis.importance import channel_entropy

    probes: list[list[tuple[str, object]]] = []
    points: dict[str, int] = {}
    renamed: dict[str, str] = {}
    for group in groups:
        found = []
        for member in group.members:
            act = member.activation
            if member.role != "in" or act is None or act.name is None:
                continue
            state = analysis.states.get(act)
            if state is None or (member.segment.block * group.unit).denominator != 1:
                continue
            points[act.name] = state.axis
            found.append((act.name, member.segment))
        probes.append(found)
    probe = model.clone()
    by_name = {v.name: v for node in probe.graph for v in node.outputs if v.name in points}
    for name, value in by_name.items():
        if points[name] == 1 and value.shape is not None and len(value.shape) > 2:
            # A feature map's channel is scored by its per-sample mean response: what varies
            # from input to input, not from position to position.
            pooled = ir.node("GlobalAveragePool", [value], name=f"{name}__pool")
            pooled.outputs[0].name = f"{name}__pooled"
            probe.graph.append(pooled)
            points[pooled.outputs[0].name] = 1
            del points[name]
            renamed[name] = pooled.outputs[0].name
    entropies = channel_entropy(probe, data, points, bins=bins, samples=samples) if points else {}
    entropies = {name: entropies[renamed.get(name, name)] for name in by_name
                 if renamed.get(name, name) in entropies}  # fmt: skip
    scores, notes = [], []
    for group, found in zip(groups, probes, strict=True):
        per_probe = []
        for name, segment in found:
            values = entropies.get(name)
            if values is None:
                continue
            per_probe.append([
                float(np.mean(values[positions(segment, group.unit, [u])]))  # type: ignore[arg-type]
                for u in range(group.units)
            ])  # fmt: skip
        if per_probe:
            scores.append(np.mean(np.asarray(per_probe), axis=0))
        else:
            notes.append(f"group {group.name}: no activation to measure; ranked by l1")
            score = member_scores(group, "out", "l1")
            scores.append(score if score is not None else np.zeros(group.units))
    return scores, notes


def apply_removal(
    model: ir.Model, analysis: ChannelAnalysis, removed: dict[int, np.ndarray]
) -> None:
    """Remove ``removed`` units (group index -> unit indices) from every tensor, attribute,
    shape constant and value shape that holds them."""
    cuts: dict[ir.Value, dict[int, set[int]]] = defaultdict(lambda: defaultdict(set))
    for index, units in removed.items():
        group = analysis.groups[index]
        for member in group.members:
            cuts[member.value][member.axis].update(
                positions(member.segment, group.unit, units).tolist()
            )
    for value, axes in cuts.items():
        array = value.const_value.numpy()
        for axis, cut in axes.items():
            array = np.delete(array, sorted(cut), axis=axis)
        # A new tensor, never a write into the old one: loaded tensors are read-only views.
        value.const_value = ir.tensor(np.ascontiguousarray(array), name=value.name)
        value.shape = ir.Shape(array.shape)

    def removed_on(value: ir.Value | None) -> int:
        state = analysis.states.get(value) if value is not None else None
        if state is None:
            return 0
        count = 0
        for segment in state.segments:
            index = analysis.space_group[segment.space]
            if index in removed:
                count += len(positions(segment, analysis.groups[index].unit, removed[index]))
        return count

    for value, state in analysis.states.items():
        n = removed_on(value)
        if n and value.shape is not None and isinstance(value.shape[state.axis], int):
            dims = list(value.shape)
            dims[state.axis] = dims[state.axis] - n
            value.shape = ir.Shape(dims)
    for node in analysis.group_edits:
        n = removed_on(node.inputs[0])
        if n:
            group = node.attributes.get_int("group", 1)
            node.attributes["group"] = ir.AttrInt64("group", group - n)
    editor = _ShapeEditor(model.graph)
    for edit in analysis.shape_edits:
        n = removed_on(edit.node.outputs[0])
        if n:
            editor.shrink(edit.node, edit.position, n)


class _ShapeEditor:
    """Rewrites one entry of Reshape targets, giving each changed target its own constant (the
    original may be shared by Reshapes of other layers)."""

    def __init__(self, graph: ir.Graph):
        self.graph = graph
        self.names = {v.name for v in graph.initializers.values()}
        for node in graph:
            self.names.update(v.name for v in node.outputs if v.name)
        self.cache: dict[tuple, ir.Value] = {}

    def constant(self, array: np.ndarray, hint: str) -> ir.Value:
        name, k = hint, 0
        while name in self.names:
            k += 1
            name = f"{hint}_{k}"
        self.names.add(name)
        value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
        value.shape = ir.Shape(array.shape)
        value.type = ir.TensorType(ir.DataType.INT64)
        self.graph.register_initializer(value)
        return value

    def shrink(self, node: ir.Node, position: int, by: int) -> None:
        target = node.inputs[1]
        sources = target_sources(target)
        assert target is not None and sources is not None  # the analysis read them
        piece, index, slot = sources[position]
        key = (target, position, by)
        if key not in self.cache:
            array = piece.const_value.numpy().astype(np.int64).reshape(-1).copy()
            array[index] -= by
            array = array.reshape(piece.const_value.shape)
            hint = f"{node.name or 'reshape'}_shape"
            if piece is target:
                self.cache[key] = self.constant(array, hint)
            else:
                concat = target.producer()
                assert concat is not None
                inputs = list(concat.inputs)
                inputs[slot] = self.constant(array, hint)
                new = ir.node("Concat", inputs, {"axis": 0}, name=f"{hint}_concat")
                new.outputs[0].name = self.constant_name(f"{hint}_value")
                new.outputs[0].shape = target.shape
                new.outputs[0].type = target.type
                self.graph.insert_before(node, new)
                self.cache[key] = new.outputs[0]
        node.replace_input_with(1, self.cache[key])

    def constant_name(self, hint: str) -> str:
        name, k = hint, 0
        while name in self.names:
            k += 1
            name = f"{hint}_{k}"
        self.names.add(name)
        return name


def _params(model: ir.Model) -> int:
    total = 0
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is not None and tensor.dtype.is_floating_point():
            total += int(np.prod(tensor.shape))
    return total
