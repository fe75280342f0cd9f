"""Structured pruning (``prune-channels``): remove whole channels, hidden units and attention heads.

The channel groups come from :mod:`onnxcomp.analysis.channels`: sets of channels that every
dependent tensor must lose together (a Conv's filters and bias, the BatchNormalization after it,
the next layer's input slices, the other branch of a residual Add, the Q/K/V/output projections
of one attention head, ...). For each safe group the pass ranks its units (channels, or whole
heads) by an importance score, removes the lowest ``ratio`` share, and physically slices every
member tensor, the depthwise ``group`` attributes and the Reshape shape constants that hold the
group's size; intermediate value shapes are updated to match. Channels made or read by grouped
Convs are removed evenly per group, and behind a channel shuffle the kept channels are
reordered as the smaller shuffle lays them out (:func:`even_keep` picks such a set). Groups the
analysis cannot prove safe are left whole and listed in the notes with the reason.

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
    Member,
    Partition,
    analyze_channels,
    part_labels,
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
            kept = top_units(score, keep)
            if group.partitions:
                kept = even_keep(score, group.partitions, keep, o.round_to, o.min_channels)
                if kept is None:
                    notes.append(f"group {group.name}: no even split of its {group.channels} "
                                 "channels over its Conv groups / shuffle rows keeps "
                                 f"fewer")  # fmt: skip
                    continue
                keep = len(kept)
            drop = np.setdiff1d(np.arange(group.units), kept)
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


def even_keep(
    score: np.ndarray,
    partitions: Sequence[Partition],
    keep: int,
    round_to: int = 1,
    min_channels: int = 1,
) -> np.ndarray | None:
    """The channels (ascending) to keep of a group whose channels a grouped Conv or a channel
    shuffle reads in ``partitions``: about ``keep`` of them, the highest-scoring set for which
    the pruned model still has equal parts and every kept channel in its own part.

    The kept channels keep their order, so the ``i``-th kept channel must lie in the part the
    ``i``-th channel of the pruned space falls in (:func:`part_labels`). A dynamic programme
    picks the best increasing sequence with these labels; kept counts that allow none are
    skipped, nearest to ``keep`` first. None when no count below all of them works."""
    channels = len(score)
    step = math.lcm(round_to, *(p.parts for p in partitions),
                    *(p.shuffle[0] for p in partitions if p.shuffle))  # fmt: skip
    counts = [k for k in range(step, channels, step) if k >= min(min_channels, channels - 1)]
    counts.sort(key=lambda k: (abs(k - keep), -k))

    def code(labels: list[np.ndarray]) -> np.ndarray:
        return np.ravel_multi_index(labels, [p.parts for p in partitions])

    have = code([part_labels(p, channels) for p in partitions])
    for k in counts:
        want = code([part_labels(p, channels, k) for p in partitions])
        kept = _best_sequence(np.asarray(score, dtype=np.float64), have, want)
        if kept is not None:
            return kept
    return None


DP_LIMIT = 1 << 24  # cells of the dynamic programme's table (128 MiB of float64)


def _best_sequence(score: np.ndarray, have: np.ndarray, want: np.ndarray) -> np.ndarray | None:
    """Increasing indices ``c_0 < c_1 < ...`` with ``have[c_i] == want[i]`` and the largest
    total score; None when there are none (or the table would exceed DP_LIMIT)."""
    if (np.diff(have) >= 0).all() and (np.diff(want) >= 0).all():
        # Each label's channels are one run, in the order the labels are wanted (the usual
        # case: parts listed outermost first): the best of each run, as many as wanted.
        picked = []
        for label, count in zip(*np.unique(want, return_counts=True), strict=True):
            run = np.flatnonzero(have == label)
            if len(run) < count:
                return None
            picked.append(run[top_units(score[run], int(count))])
        return np.sort(np.concatenate(picked))
    if len(want) * len(score) > DP_LIMIT:
        return None
    best = np.full((len(want), len(score)), -np.inf)
    for i, label in enumerate(want):
        before = np.maximum.accumulate(best[i - 1]) if i else np.zeros(len(score))
        reach = np.concatenate([[-np.inf], before[:-1]]) if i else before
        best[i] = np.where(have == label, reach + score, -np.inf)
    if not np.isfinite(best[-1]).any():
        return None
    picked = [int(np.argmax(best[-1]))]
    for i in range(len(want) - 2, -1, -1):
        picked.append(int(np.argmax(best[i, : picked[-1]])))
    return np.asarray(picked[::-1])


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
    shape constant and value shape that holds them. Slices behind a channel shuffle are
    reordered as the pruned shuffle lays the kept channels out."""
    slots: dict[ir.Value, dict[int, list[Member]]] = defaultdict(lambda: defaultdict(list))
    for index in removed:
        for member in analysis.groups[index].members:
            slots[member.value][member.axis].append(member)
    for value, axes in slots.items():
        array = value.const_value.numpy()
        # A grouped Conv's input axis first: its groups of filters are the rows as they were.
        for axis in sorted(axes, key=lambda ax: -max(m.groups for m in axes[ax])):
            members = axes[axis]
            grouped = max(m.groups for m in members)
            length = array.shape[axis] * grouped
            order = _kept_positions(analysis, removed, members, length)
            array = _take_grouped(array, order, grouped) if grouped > 1 else \
                np.take(array, order, axis=axis)  # fmt: skip
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
    for edit in analysis.dim_edits:
        n = removed_on(edit.source) // edit.divisor
        if n and edit.value.shape is not None and isinstance(edit.value.shape[edit.axis], int):
            dims = list(edit.value.shape)
            dims[edit.axis] -= n
            edit.value.shape = ir.Shape(dims)
    for node in analysis.group_edits:
        n = removed_on(node.inputs[0])
        if n:
            group = node.attributes.get_int("group", 1)
            node.attributes["group"] = ir.AttrInt64("group", group - n)
    editor = _ShapeEditor(model.graph)
    for shape_edit in analysis.shape_edits:
        n = removed_on(shape_edit.source or shape_edit.node.outputs[0]) // shape_edit.divisor
        if n:
            editor.shrink(shape_edit.node, shape_edit.position, n)


def _kept_positions(
    analysis: ChannelAnalysis, removed: dict[int, np.ndarray], members: list[Member], length: int
) -> np.ndarray:
    """The positions of an axis of ``length`` that stay, in their new order: each pruned
    segment's kept channels (laid out as a pruned channel shuffle would), the rest as they are."""
    runs: dict[int, np.ndarray] = {}  # start -> positions that replace the segment's run
    ends: dict[int, int] = {}
    for member in members:
        segment = member.segment
        index = analysis.space_group[segment.space]
        if index not in removed:
            continue
        group = analysis.groups[index]
        kept = np.setdiff1d(np.arange(group.units), removed[index])
        if segment.shuffle is not None:
            # The pruned shuffle has rows of len(kept) / g: kept channel i moves to index
            # (i % k') * g + i // k'; read the original positions in that order.
            g = segment.shuffle[0]
            k = len(kept) // g
            i = np.arange(len(kept))
            kept = kept[np.argsort((i % k) * g + i // k)]
        start = int(segment.offset)
        runs[start] = positions(segment, group.unit, kept)
        ends[start] = start + int(group.channels * segment.block)
    pieces, at = [], 0
    for start in sorted(runs):
        pieces += [np.arange(at, start), runs[start]]
        at = ends[start]
    pieces.append(np.arange(at, length))
    return np.concatenate(pieces).astype(np.int64)


def _take_grouped(array: np.ndarray, order: np.ndarray, groups: int) -> np.ndarray:
    """A grouped Conv weight [O, C / groups, ...] reading the input channels ``order`` (input
    positions, in their new order): each group of filters keeps its own share."""
    rows, per = array.shape[0] // groups, array.shape[1]
    share = len(order) // groups
    parts = []
    for r in range(groups):
        columns = order[r * share : (r + 1) * share] - r * per
        assert ((columns >= 0) & (columns < per)).all(), "channel left its Conv group"
        parts.append(array[r * rows : (r + 1) * rows][:, columns])
    return np.concatenate(parts, axis=0)


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
