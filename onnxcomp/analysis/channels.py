"""Coupled channel groups: which output channels of which layers can be removed together.

Structured pruning removes whole channels (Conv output channels, hidden units of a Gemm or
MatMul, attention heads), so every tensor that holds a slice per channel must shrink with the
same index set. :func:`analyze_channels` finds these sets without editing the graph: it walks
the nodes in topological order and follows each layer's output *channel space* through the ops
that keep channels apart (BatchNormalization, activations, pooling, per-channel constants,
depthwise Conv, Transpose, Flatten/Reshape, Concat at an offset, the MatMul/Softmax/MatMul of
multi-head attention, ShuffleNet's channel shuffle as a permutation) to the layers that read it
(the next Conv, Gemm or MatMul), joining spaces that meet (residual Add/Sub/Mul, tensors shared
by several layers) with union-find. A grouped Conv's output channels, and one layer's channels
read by a grouped Conv or shuffled in rows, must be pruned evenly over those groups: the group
lists these :class:`Partition` s.

A :class:`ChannelGroup` lists every constant slice that belongs to it (:class:`Member`), every
activation that carries it, and the Reshape shape entries and depthwise ``group`` attributes
that hold its size. A group is *safe* only when every use of its channels is understood; any
other use (a graph output, LayerNormalization or Softmax over the channel axis, an unknown op, a
shape computed at run time, a grouped Conv reading the channels of several layers, a weight also
read elsewhere, ...) makes it unsafe and is kept as a reason, so callers can report it.

Channels may map to several consecutive positions of a tensor axis (``block``: after Flatten a
channel covers H*W rows of the next weight) or to a fraction of a position (after a Reshape that
splits the hidden size into heads, a head holds ``head_dim`` channels): a group then prunes in
units of ``unit`` channels (whole heads). Shapes come from the values' shapes: run shape
inference first (the ``prune-channels`` pass does). Nodes must be in topological order.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Iterator, Sequence
from fractions import Fraction
from typing import Literal

import numpy as np
import onnx_ir as ir

Role = Literal["out", "bias", "in", "bn-scale", "param", "depthwise"]

# Ops that act on each element alone: the channel axis passes through unchanged.
UNARY_OPS = frozenset({
    "Relu", "LeakyRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu",
    "Celu", "Softplus", "Softsign", "Gelu", "Mish", "Erf", "Identity", "Dropout", "Abs", "Neg",
    "Exp", "Log", "Sqrt", "Reciprocal", "Cast", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos",
    "ThresholdedRelu", "Not", "IsNaN", "IsInf", "Shrink",
})  # fmt: skip
BINARY_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "Pow", "PRelu", "Sum", "Mean"})
POOL_OPS = frozenset({
    "MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool",
})  # fmt: skip
REDUCE_OPS = frozenset({
    "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
    "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare",
})  # fmt: skip
SOFTMAX_OPS = frozenset({"Softmax", "LogSoftmax", "Hardmax"})
MAX_REASONS = 3


@dataclasses.dataclass(frozen=True)
class Segment:
    """Where a channel space lies on an axis: channel ``c`` covers positions
    ``[offset + c * block, offset + (c + 1) * block)`` (fractions when channels share a head).

    After a channel shuffle of ``shuffle = (g, k)`` (ShuffleNet's Reshape [g, k] - Transpose -
    Reshape), channel ``c`` sits at index ``(c % k) * g + c // k`` of the run instead of ``c``.
    """

    space: int
    offset: Fraction
    block: Fraction
    shuffle: tuple[int, int] | None = None

    def index(self, channels: np.ndarray) -> np.ndarray:
        """Where ``channels`` sit in the run, in channel units (the shuffle applied)."""
        if self.shuffle is None:
            return channels
        g, k = self.shuffle
        return (channels % k) * g + channels // k


@dataclasses.dataclass(frozen=True)
class Partition:
    """The channels must be pruned evenly over ``parts`` equal parts (a grouped Conv's groups,
    a channel shuffle's rows) of the run they are read in: channel ``c`` is in part
    ``index(c) // (channels / parts)``, where ``index`` applies ``shuffle`` as
    :meth:`Segment.index` does. A pruned model keeps the parts equal and each kept channel in
    its part (:func:`part_labels`)."""

    parts: int
    shuffle: tuple[int, int] | None = None


@dataclasses.dataclass(frozen=True)
class ChannelState:
    """The channel axis of an activation and the spaces laid out along it."""

    axis: int
    segments: tuple[Segment, ...]


@dataclasses.dataclass(frozen=True)
class Member:
    """A constant tensor slice that belongs to a group: ``value``'s ``axis`` at ``segment``,
    read by ``node`` at input ``index``; ``activation`` is the value a consumer layer reads.
    ``groups`` > 1: the weight of a grouped Conv, whose input axis holds ``1 / groups`` of the
    input channels for each group of filters (``segment`` is in input-channel positions)."""

    value: ir.Value
    axis: int
    segment: Segment
    role: Role
    node: ir.Node
    index: int
    activation: ir.Value | None = None
    groups: int = 1


@dataclasses.dataclass(frozen=True)
class ShapeEdit:
    """A Reshape whose target shape holds, at ``position``, the channel-axis size of its output
    (``source`` set: the size of ``source``'s channel axis divided by ``divisor``, as the rows
    of a channel shuffle)."""

    node: ir.Node
    position: int
    source: ir.Value | None = None
    divisor: int = 1


@dataclasses.dataclass(frozen=True)
class DimEdit:
    """A value inside a channel shuffle whose ``axis`` is ``source``'s channel axis divided by
    ``divisor``."""

    value: ir.Value
    axis: int
    source: ir.Value
    divisor: int


@dataclasses.dataclass
class ChannelGroup:
    """Channels that must be pruned with the same index set."""

    channels: int
    unit: int
    members: list[Member]
    producers: list[ir.Node]
    heads: bool
    reasons: list[str]
    spaces: set[int]
    partitions: list[Partition] = dataclasses.field(default_factory=list)

    @property
    def safe(self) -> bool:
        return not self.reasons

    @property
    def units(self) -> int:
        return self.channels // self.unit if self.unit else 0

    @property
    def name(self) -> str:
        names = []
        for member in self.members:
            if member.role == "out" and member.value.name not in names:
                names.append(member.value.name or "?")
        if not names:
            names = [n.name or n.op_type for n in self.producers]
        if len(names) > 3:
            names = [*names[:3], f"{len(names) - 3} more"]
        return "+".join(names)

    def member_positions(self, member: Member, units: Sequence[int]) -> np.ndarray:
        """Positions along ``member.axis`` that ``units`` (indices of prunable units) cover."""
        return positions(member.segment, self.unit, units)


@dataclasses.dataclass
class ChannelAnalysis:
    """Every channel group of a model, and what the pruning pass must edit besides weights."""

    groups: list[ChannelGroup]
    states: dict[ir.Value, ChannelState]
    shape_edits: list[ShapeEdit]
    group_edits: list[ir.Node]  # depthwise Convs whose ``group`` equals their input channels
    space_group: dict[int, int]  # space id -> index into groups
    dim_edits: list[DimEdit] = dataclasses.field(default_factory=list)

    def group_of(self, segment: Segment) -> ChannelGroup:
        return self.groups[self.space_group[segment.space]]


def positions(segment: Segment, unit: int, units: Sequence[int]) -> np.ndarray:
    """Axis positions covered by whole units of ``unit`` channels laid out as ``segment``, unit
    by unit in the order given."""
    width = segment.block * unit
    if width.denominator != 1 or segment.offset.denominator != 1:
        raise ValueError(f"unit of {unit} channels does not cover whole positions of {segment}")
    if segment.shuffle is not None and unit != 1:
        raise ValueError(f"units of {unit} channels across a channel shuffle")
    w, off = int(width), int(segment.offset)
    if not len(units):
        return np.zeros(0, np.int64)
    starts = segment.index(np.asarray(units, dtype=np.int64))
    return np.concatenate([np.arange(off + u * w, off + (u + 1) * w) for u in starts])


def part_labels(partition: Partition, channels: int, kept: int | None = None) -> np.ndarray:
    """The part of each channel of a space of ``channels`` channels; with ``kept``, the part of
    each of the ``kept`` channels the pruned model has (channel ``i`` of the pruned space)."""
    n = channels if kept is None else kept
    index = np.arange(n)
    if partition.shuffle is not None:
        g = partition.shuffle[0]
        k = partition.shuffle[1] if kept is None else n // g
        index = (index % k) * g + index // k
    return index // (n // partition.parts)


def analyze_channels(model: ir.Model) -> ChannelAnalysis:
    """Find the coupled channel groups of ``model``'s main graph (the graph is not edited)."""
    return _Analyzer(model).run()


Dim = int | str | None


class _Analyzer:
    def __init__(self, model: ir.Model):
        self.model = model
        self.graph = model.graph
        self.opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
        self.parent: list[int] = []
        self.channels: list[int] = []
        self.producers: list[ir.Node] = []
        self.reasons: dict[int, list[str]] = defaultdict(list)
        self.heads: set[int] = set()
        self.members: list[Member] = []
        self.states: dict[ir.Value, ChannelState] = {}
        self.shape_edits: list[ShapeEdit] = []
        self.group_edits: list[ir.Node] = []
        self.dim_edits: list[DimEdit] = []
        self.partitions: dict[int, list[Partition]] = defaultdict(list)

    # union-find over channel spaces
    def new_space(self, channels: int, node: ir.Node) -> int:
        self.parent.append(len(self.parent))
        self.channels.append(channels)
        self.producers.append(node)
        return len(self.parent) - 1

    def find(self, space: int) -> int:
        while self.parent[space] != space:
            self.parent[space] = self.parent[self.parent[space]]
            space = self.parent[space]
        return space

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra

    def unsafe(self, states: Iterator[ChannelState | None] | Sequence, reason: str) -> None:
        for state in states:
            if state is not None:
                for segment in state.segments:
                    if reason not in self.reasons[segment.space]:
                        self.reasons[segment.space].append(reason)

    def member(self, node: ir.Node, index: int, axis: int, state: ChannelState, role: Role,
               activation: ir.Value | None = None, groups: int = 1) -> None:  # fmt: skip
        value = node.inputs[index]
        assert value is not None
        for segment in state.segments:
            self.members.append(
                Member(value, axis, segment, role, node, index, activation, groups)
            )

    def partition(self, space: int, partition: Partition) -> None:
        if partition not in self.partitions[space]:
            self.partitions[space].append(partition)

    def run(self) -> ChannelAnalysis:
        for node in self.graph:
            self.visit(node)
        for value, state in self.states.items():
            if value.is_graph_output():
                self.unsafe([state], f"reaches graph output '{value.name}'")
            for user, _ in value.uses():
                if user.graph is not self.graph:
                    self.unsafe([state], f"read inside a subgraph of '{_name(user)}'")
        self.join_shared_members()
        return self.build()

    def visit(self, node: ir.Node) -> None:
        ins = [self.states.get(v) if v is not None else None for v in node.inputs]
        if node.domain not in ("", "ai.onnx"):
            if any(ins):
                self.unsafe(ins, f"reaches {node.domain}::{node.op_type} node '{_name(node)}'")
            return
        op = node.op_type
        if op in ("Conv", "Gemm", "MatMul"):
            getattr(self, "visit_" + op.lower())(node, ins)
            return
        if not any(ins):
            return
        handler = _HANDLERS.get(op)
        if handler is None:
            self.unsafe(ins, f"reaches {op} node '{_name(node)}', which the analysis does not know")
            return
        handler(self, node, ins)

    def out(self, node: ir.Node, state: ChannelState, index: int = 0) -> None:
        if index < len(node.outputs):
            self.states[node.outputs[index]] = state

    def extra_outputs_unused(self, node: ir.Node, ins: Sequence, keep: int = 1) -> bool:
        if any(o.uses() or o.is_graph_output() for o in node.outputs[keep:]):
            self.unsafe(ins, f"{node.op_type} node '{_name(node)}' has more outputs in use")
            return False
        return True

    # --- layers: Conv, Gemm, MatMul ---------------------------------------------------------
    def visit_conv(self, node: ir.Node, ins: Sequence[ChannelState | None]) -> None:
        weight = node.inputs[1] if len(node.inputs) > 1 else None
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if any(ins[1:]) or weight is None or weight.const_value is None:
            self.unsafe(ins, f"Conv '{_name(node)}' has a weight computed at run time")
            return
        shape = tuple(weight.const_value.shape)
        group = node.attributes.get_int("group", 1)
        state = ins[0]
        if state is not None:
            if state.axis != 1:
                self.unsafe(ins, f"Conv '{_name(node)}' reads it on a non-channel axis")
            elif group == 1:
                self.member(node, 1, 1, state, "in", node.inputs[0])
            elif shape[1] == 1 and shape[0] % group == 0:
                # Depthwise: each channel has its own filters, so the space passes through.
                multiplier = shape[0] // group
                scaled = _scale(state, Fraction(multiplier))
                self.member(node, 1, 0, scaled, "depthwise")
                if bias is not None:
                    self.member(node, 2, 0, scaled, "depthwise")
                self.group_edits.append(node)
                self.out(node, scaled)
                return
            else:
                self.grouped_input(node, state, group, shape[1])
        space = self.new_space(shape[0], node)
        new = ChannelState(1, (Segment(space, Fraction(0), Fraction(1)),))
        self.member(node, 1, 0, new, "out")
        if bias is not None:
            if bias.const_value is None:
                self.unsafe([new], f"Conv '{_name(node)}' has a bias computed at run time")
            else:
                self.member(node, 2, 0, new, "bias")
        if group != 1:
            self.partition(space, Partition(group))  # each group of filters keeps as many
        self.out(node, new)

    def grouped_input(self, node: ir.Node, state: ChannelState, group: int, per: int) -> None:
        """A grouped Conv reads its input in ``group`` runs of ``per`` channels: one layer's
        channels (shuffled or not) may be pruned evenly over the runs."""
        segment = state.segments[0]
        if len(state.segments) != 1 or segment.offset != 0 or segment.block != 1 or \
                self.channels[segment.space] != group * per:  # fmt: skip
            self.unsafe([state], f"grouped Conv '{_name(node)}' (group={group}) reads channels "
                                 "of several layers")  # fmt: skip
            return
        self.member(node, 1, 1, state, "in", node.inputs[0], groups=group)
        self.partition(segment.space, Partition(group, segment.shuffle))

    def visit_gemm(self, node: ir.Node, ins: Sequence[ChannelState | None]) -> None:
        weight = node.inputs[1]
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        trans_a = node.attributes.get_int("transA", 0)
        trans_b = node.attributes.get_int("transB", 0)
        if any(ins[1:]) or weight is None or weight.const_value is None:
            self.unsafe(ins, f"Gemm '{_name(node)}' has a weight computed at run time")
            return
        state = ins[0]
        if state is not None:
            if trans_a or state.axis != 1:
                self.unsafe(ins, f"Gemm '{_name(node)}' reads it transposed")
            else:
                self.member(node, 1, 1 if trans_b else 0, state, "in", node.inputs[0])
        if trans_a:
            return
        space = self.new_space(int(weight.const_value.shape[0 if trans_b else 1]), node)
        new = ChannelState(1, (Segment(space, Fraction(0), Fraction(1)),))
        self.member(node, 1, 0 if trans_b else 1, new, "out")
        if bias is not None:
            bshape = tuple(bias.const_value.shape) if bias.const_value is not None else None
            if bshape is None:
                self.unsafe([new], f"Gemm '{_name(node)}' has a bias computed at run time")
            elif len(bshape) >= 1 and bshape[-1] == self.channels[space] and math.prod(
                bshape[:-1]
            ) == 1:
                self.member(node, 2, len(bshape) - 1, new, "bias")
            elif math.prod(bshape) != 1:
                self.unsafe([new], f"Gemm '{_name(node)}' has a bias of shape {list(bshape)}")
        self.out(node, new)

    def visit_matmul(self, node: ir.Node, ins: Sequence[ChannelState | None]) -> None:
        a, b = node.inputs[0], node.inputs[1]
        sa = ins[0]
        if b is not None and b.const_value is not None and len(b.const_value.shape) == 2:
            rank = _rank(a)
            if sa is not None:
                if rank is not None and sa.axis == rank - 1:
                    self.member(node, 1, 0, sa, "in", a)
                else:
                    self.unsafe(ins, f"MatMul '{_name(node)}' keeps it beside a new channel axis")
            if rank is None:
                return
            space = self.new_space(int(b.const_value.shape[1]), node)
            new = ChannelState(rank - 1, (Segment(space, Fraction(0), Fraction(1)),))
            self.member(node, 1, 1, new, "out")
            self.out(node, new)
            return
        if not any(ins):
            return
        if (a is not None and a.const_value is not None) or (
            b is not None and b.const_value is not None
        ):
            self.unsafe(ins, f"MatMul '{_name(node)}' multiplies it with a constant of rank != 2")
            return
        self.matmul_activations(node, ins)

    def matmul_activations(self, node: ir.Node, ins: Sequence[ChannelState | None]) -> None:
        ra, rb = _rank(node.inputs[0]), _rank(node.inputs[1])
        if ra is None or rb is None or ra < 2 or rb < 2:
            self.unsafe(ins, f"MatMul '{_name(node)}' has operands of unknown or low rank")
            return
        ro = max(ra, rb)
        roles = []
        operands = ((ins[0], ra, ra - 1, ra - 2, ro - 2), (ins[1], rb, rb - 2, rb - 1, ro - 1))
        for state, rank, contract, own, own_out in operands:
            if state is None:
                roles.append(None)
            elif state.axis == contract:
                roles.append(("contract", -1))
            elif state.axis == own:  # A's rows or B's columns: they become the output's
                roles.append(("own", own_out))
            else:
                roles.append(("batch", state.axis + ro - rank))
        if roles[0] and roles[1]:
            sa, sb = ins[0], ins[1]
            assert sa is not None and sb is not None
            same_kind = roles[0][0] == roles[1][0] and roles[0][0] in ("contract", "batch")
            if not same_kind or roles[0][1] != roles[1][1] or not self.join(sa, sb):
                self.unsafe(ins, f"MatMul '{_name(node)}' mixes it across axes")
                return
            if roles[0][0] == "batch":
                self.out(node, ChannelState(roles[0][1], sa.segments))
            return
        index = 0 if roles[0] else 1
        role, axis = roles[index]  # type: ignore[misc]
        state = ins[index]
        assert state is not None
        if role == "contract":
            self.unsafe(ins, f"MatMul '{_name(node)}' contracts it with an unpruned operand")
            return
        if role == "batch":
            other = node.inputs[1 - index]
            other_rank = rb if index == 0 else ra
            if not _broadcasts(other, axis - (ro - other_rank)):
                self.unsafe(ins, f"MatMul '{_name(node)}' pairs it with an unpruned batch axis")
                return
        self.out(node, ChannelState(axis, state.segments))

    def join(self, a: ChannelState, b: ChannelState) -> bool:
        """Union two layouts segment by segment; False when they differ."""
        if len(a.segments) != len(b.segments):
            return False
        for x, y in zip(a.segments, b.segments, strict=True):
            if (x.offset, x.block, x.shuffle) != (y.offset, y.block, y.shuffle) or \
                    self.channels[x.space] != self.channels[y.space]:  # fmt: skip
                return False
        for x, y in zip(a.segments, b.segments, strict=True):
            self.union(x.space, y.space)
        return True

    # --- ops that keep channels apart -------------------------------------------------------
    def visit_unary(self, node: ir.Node, ins: Sequence[ChannelState | None]) -> None:
        if any(ins[1:]) or ins[0] is None:
            self.unsafe(ins, f"{node.op_type} '{_name(node)}' takes it as a parameter")
            return
        if node.op_type == "Dropout" and not self.extra_outputs_unused(node, ins):
            return
        self.out(node, ins[0])

    def visit_pool(self, node: ir.Node, ins: Sequence[ChannelState | None]) -> None:
        state = ins[0]
        if state is None or state.axis != 1:
            self.unsafe(ins, f"{node.op_type} '{_name(node)}' pools over the channel axis")
        elif self.extra_outputs_unused(node, ins):
            self.out(node, state)

    def visit_batchnormalization(self, node: ir.Node, ins: Sequence[ChannelState | None]) -> None:
        state = ins[0]
        if state is None or state.axis != 1 or any(ins[1:]):
            self.unsafe(ins, f"BatchNormalization '{_name(node)}' normalizes another axis")
            return
        if not self.extra_outputs_unused(node, ins) or not self.params(node, ins, range(1, 5)):
            return
        self.out(node, state)

    def visit_instancenormalization(self, node: ir.Node, ins: Sequence) -> None:
        state = ins[0]
        if state is None or state.axis != 1 or any(ins[1:]):
            self.unsafe(ins, f"InstanceNormalization '{_name(node)}' normalizes another axis")
        elif self.params(node, ins, range(1, 3)):
            self.out(node, state)

    def params(self, node: ir.Node, ins: Sequence, indices: range) -> bool:
        state = ins[0]
        for index in indices:
            value = node.inputs[index] if index < len(node.inputs) else None
            if value is None:
                continue
            if value.const_value is None or len(value.const_value.shape) != 1:
                self.unsafe(ins, f"{node.op_type} '{_name(node)}' has parameters computed at "
                                 "run time")  # fmt: skip
                return False
            role: Role = "bn-scale" if node.op_type == "BatchNormalization" and index == 1 \
                else "param"  # fmt: skip
            self.member(node, index, 0, state, role)
        return True

    def visit_binary(self, node: ir.Node, ins: Sequence[ChannelState | None]) -> None:
        ranks = [_rank(v) for v in node.inputs]
        out_rank = _rank(node.outputs[0])
        if out_rank is None and None not in ranks:
            out_rank = max(r for r in ranks if r is not None)
        if out_rank is None or any(r is None for r, s in zip(ranks, ins, strict=True) if s):
            self.unsafe(ins, f"{node.op_type} '{_name(node)}' has operands of unknown rank")
            return
        if node.op_type == "Pow" and ins[1] is not None:
            self.unsafe(ins, f"Pow '{_name(node)}' uses it as an exponent")
            return
        stateful = [(i, s) for i, s in enumerate(ins) if s is not None]
        first_index, first = stateful[0]
        axis = first.axis + out_rank - ranks[first_index]  # type: ignore[operator]
        for i, state in stateful[1:]:
            aligned = state.axis + out_rank - ranks[i]  # type: ignore[operator]
            if aligned != axis or not self.join(first, state):
                self.unsafe(ins, f"{node.op_type} '{_name(node)}' combines channel layouts "
                                 "that differ")  # fmt: skip
                return
        length = _dim(node.inputs[first_index], first.axis)
        for i, value in enumerate(node.inputs):
            if value is None or ins[i] is not None:
                continue
            rank = _rank(value)
            j = axis - (out_rank - rank) if rank is not None else None
            if j is not None and (j < 0 or _dim(value, j) == 1):
                continue  # broadcast along the channels
            if (
                j is not None
                and value.const_value is not None
                and isinstance(length, int)
                and _dim(value, j) == length
            ):
                self.member(node, i, j, ChannelState(j, first.segments), "param")
                continue
            self.unsafe(ins, f"{node.op_type} '{_name(node)}' combines it with a tensor that "
                             "is not pruned with it (e.g. a residual stream)")  # fmt: skip
        self.out(node, ChannelState(axis, first.segments))

    def visit_layernormalization(self, node: ir.Node, ins: Sequence) -> None:
        state, rank = ins[0], _rank(node.inputs[0])
        start = node.attributes.get_int("axis", -1)
        if state is None or rank is None or any(ins[1:]):
            self.unsafe(ins, f"LayerNormalization '{_name(node)}' takes it as a parameter")
            return
        if state.axis >= start % rank:
            self.unsafe(ins, f"LayerNormalization '{_name(node)}' normalizes over it (a hidden "
                             "size shared through the residual stream)")  # fmt: skip
        elif self.extra_outputs_unused(node, ins):
            self.out(node, state)

    def visit_softmax(self, node: ir.Node, ins: Sequence) -> None:
        state, rank = ins[0], _rank(node.inputs[0])
        if state is None or rank is None:
            self.unsafe(ins, f"{node.op_type} '{_name(node)}' has an input of unknown rank")
            return
        axis = node.attributes.get_int("axis", -1 if self.opset >= 13 else 1) % rank
        over = state.axis == axis if self.opset >= 13 else state.axis >= axis
        if over:
            self.unsafe(ins, f"{node.op_type} '{_name(node)}' normalizes over it")
        else:
            self.out(node, state)

    def visit_transpose(self, node: ir.Node, ins: Sequence) -> None:
        state, rank = ins[0], _rank(node.inputs[0])
        if state is None or rank is None:
            self.unsafe(ins, f"Transpose '{_name(node)}' has an input of unknown rank")
            return
        perm = list(node.attributes.get_ints("perm", list(reversed(range(rank)))))
        self.out(node, ChannelState(perm.index(state.axis), state.segments))

    def visit_flatten(self, node: ir.Node, ins: Sequence) -> None:
        state, dims = ins[0], _dims(node.inputs[0])
        if state is None or dims is None:
            self.unsafe(ins, f"Flatten '{_name(node)}' has an input of unknown shape")
            return
        start = node.attributes.get_int("axis", 1) % max(len(dims), 1)
        a = state.axis
        if a == start or (a == 0 and start > 0):
            rest = dims[a + 1 :] if a == start else dims[1:start]
            if all(isinstance(d, int) for d in rest):
                factor = math.prod(rest)  # type: ignore[arg-type]
                self.out(node, _scale(ChannelState(0 if a == 0 else 1, state.segments),
                                      Fraction(factor)))  # fmt: skip
                return
        self.unsafe(ins, f"Flatten '{_name(node)}' interleaves it with other axes or has "
                         "dynamic sizes")  # fmt: skip

    def visit_squeeze(self, node: ir.Node, ins: Sequence) -> None:
        state, rank = ins[0], _rank(node.inputs[0])
        axes = self.axes(node, rank if node.op_type == "Squeeze" else _rank(node.outputs[0]))
        if state is None or rank is None or axes is None or any(ins[1:]):
            self.unsafe(ins, f"{node.op_type} '{_name(node)}' has axes the analysis cannot read")
            return
        if node.op_type == "Squeeze":
            if state.axis in axes:
                self.unsafe(ins, f"Squeeze '{_name(node)}' removes it")
                return
            axis = state.axis - sum(1 for x in axes if x < state.axis)
        else:
            axis = state.axis
            for x in sorted(axes):
                if x <= axis:
                    axis += 1
        self.out(node, ChannelState(axis, state.segments))

    def axes(self, node: ir.Node, rank: int | None) -> list[int] | None:
        if rank is None:
            return None
        if len(node.inputs) > 1 and node.inputs[1] is not None:
            const = node.inputs[1].const_value
            if const is None:
                return None
            values = const.numpy().ravel().tolist()
        elif "axes" in node.attributes:
            values = list(node.attributes.get_ints("axes", []))
        elif node.op_type == "Squeeze":
            dims = _dims(node.inputs[0])
            if dims is None or any(d is None or isinstance(d, str) for d in dims):
                return None
            values = [i for i, d in enumerate(dims) if d == 1]
        else:
            return None
        return [int(x) % rank for x in values]

    def visit_reduce(self, node: ir.Node, ins: Sequence) -> None:
        state, rank = ins[0], _rank(node.inputs[0])
        axes_given = (len(node.inputs) > 1 and node.inputs[1] is not None) or "axes" in \
            node.attributes  # fmt: skip
        axes = self.axes(node, rank) if axes_given else None
        if state is None or rank is None or any(ins[1:]) or axes is None or not axes:
            self.unsafe(ins, f"{node.op_type} '{_name(node)}' may reduce over it")
            return
        if state.axis in axes:
            self.unsafe(ins, f"{node.op_type} '{_name(node)}' reduces over it")
            return
        keep = node.attributes.get_int("keepdims", 1)
        axis = state.axis if keep else state.axis - sum(1 for x in axes if x < state.axis)
        self.out(node, ChannelState(axis, state.segments))

    def visit_concat(self, node: ir.Node, ins: Sequence) -> None:
        rank = _rank(node.outputs[0]) or next((_rank(v) for v in node.inputs if _rank(v)), None)
        if rank is None:
            self.unsafe(ins, f"Concat '{_name(node)}' has inputs of unknown rank")
            return
        axis = node.attributes.get_int("axis", 0) % rank
        stateful = [s for s in ins if s is not None]
        if all(s.axis == axis for s in stateful):
            segments: list[Segment] = []
            offset = 0
            for value, state in zip(node.inputs, ins, strict=True):
                length = _dim(value, axis) if value is not None else None
                if not isinstance(length, int):
                    self.unsafe(ins, f"Concat '{_name(node)}' has inputs of unknown size")
                    return
                if state is not None:
                    segments += [dataclasses.replace(s, offset=s.offset + offset)
                                 for s in state.segments]  # fmt: skip
                offset += length
            self.out(node, ChannelState(axis, tuple(segments)))
            return
        first = stateful[0]
        if len(stateful) != len(node.inputs) or not all(
            s.axis == first.axis and self.join(first, s) for s in stateful[1:]
        ):
            self.unsafe(ins, f"Concat '{_name(node)}' joins it with tensors not pruned with it")
            return
        self.out(node, first)

    def visit_split(self, node: ir.Node, ins: Sequence) -> None:
        state, rank = ins[0], _rank(node.inputs[0])
        if state is None or rank is None or any(ins[1:]):
            self.unsafe(ins, f"Split '{_name(node)}' has an input of unknown rank")
            return
        if node.attributes.get_int("axis", 0) % rank == state.axis:
            self.unsafe(ins, f"Split '{_name(node)}' splits it")
            return
        for index in range(len(node.outputs)):
            self.out(node, state, index)

    def visit_slice(self, node: ir.Node, ins: Sequence) -> None:
        state, rank = ins[0], _rank(node.inputs[0])
        axes_value = node.inputs[3] if len(node.inputs) > 3 else None
        if state is None or rank is None or any(ins[1:]):
            self.unsafe(ins, f"Slice '{_name(node)}' slices with computed bounds")
            return
        if axes_value is None:
            starts = node.inputs[1]
            count = starts.const_value.shape[0] if starts is not None and starts.const_value \
                else None  # fmt: skip
            axes = list(range(count)) if count is not None else None
        else:
            axes = None if axes_value.const_value is None else [
                int(x) % rank for x in axes_value.const_value.numpy().ravel()
            ]  # fmt: skip
        if axes is None or state.axis in axes:
            self.unsafe(ins, f"Slice '{_name(node)}' may slice it")
            return
        self.out(node, state)

    def visit_pad(self, node: ir.Node, ins: Sequence) -> None:
        state, rank = ins[0], _rank(node.inputs[0])
        pads_value = node.inputs[1] if len(node.inputs) > 1 else None
        if state is None or rank is None or any(ins[1:]):
            self.unsafe(ins, f"Pad '{_name(node)}' pads with computed amounts")
            return
        if pads_value is not None:
            pads = None if pads_value.const_value is None else \
                pads_value.const_value.numpy().ravel().tolist()  # fmt: skip
        else:
            pads = list(node.attributes.get_ints("pads", []))
        axes_value = node.inputs[3] if len(node.inputs) > 3 else None
        if axes_value is not None:
            if axes_value.const_value is None or pads is None:
                pads = None
            else:
                axes = [int(x) % rank for x in axes_value.const_value.numpy().ravel()]
                n = len(axes)
                full = [0] * (2 * rank)
                for k, x in enumerate(axes):
                    full[x], full[x + rank] = pads[k], pads[k + n]
                pads = full
        if pads is None or len(pads) != 2 * rank or pads[state.axis] or pads[state.axis + rank]:
            self.unsafe(ins, f"Pad '{_name(node)}' may pad it")
            return
        self.out(node, state)

    def visit_resize(self, node: ir.Node, ins: Sequence) -> None:
        state = ins[0]
        scales = node.inputs[2] if len(node.inputs) > 2 else None
        sizes = node.inputs[3] if len(node.inputs) > 3 else None
        if node.op_type == "Upsample":
            scales, sizes = node.inputs[1] if len(node.inputs) > 1 else None, None
        if state is None or any(ins[1:]) or sizes is not None or scales is None or \
                scales.const_value is None:  # fmt: skip
            self.unsafe(ins, f"{node.op_type} '{_name(node)}' may resize it")
            return
        values = scales.const_value.numpy().ravel()
        if len(values) <= state.axis or values[state.axis] != 1:
            self.unsafe(ins, f"{node.op_type} '{_name(node)}' resizes it")
            return
        self.out(node, state)

    def visit_shape(self, node: ir.Node, ins: Sequence) -> None:
        state, rank = ins[0], _rank(node.inputs[0])
        if state is None or rank is None:
            self.unsafe(ins, f"Shape '{_name(node)}' reads its size")
            return
        start = node.attributes.get_int("start", 0)
        end = node.attributes.get_int("end", rank)
        start, end = (max(0, min(rank, x + rank if x < 0 else x)) for x in (start, end))
        if start <= state.axis < end:
            self.unsafe(ins, f"Shape '{_name(node)}' reads its size")

    def visit_reshape(self, node: ir.Node, ins: Sequence) -> None:
        state = ins[0]
        if state is not None and not any(ins[1:]):
            shuffle = self.channel_shuffle(node, state)
            if shuffle is not None:
                if shuffle:
                    self.unsafe(ins, f"channel shuffle at Reshape '{_name(node)}' {shuffle}")
                return
        why = self.reshape(node, state) if state is not None and not any(ins[1:]) else \
            "its target shape is computed from it"  # fmt: skip
        if why:
            self.unsafe(ins, f"Reshape '{_name(node)}' {why}")

    def channel_shuffle(self, node: ir.Node, state: ChannelState) -> str | None:
        """ShuffleNet's channel shuffle: Reshape [.., C, ..] -> [.., g, k, ..], Transpose of the
        two, Reshape back to [.., C, ..]. None when ``node`` does not start one; "" when the
        shuffled state is recorded on the last Reshape's output; else why it cannot be."""
        a = state.axis
        split = node.outputs[0]
        in_dims, mid_dims = _dims(node.inputs[0]), _dims(split)
        entries = _target_entries(node.inputs[1])
        if in_dims is None or mid_dims is None or entries is None or \
                len(mid_dims) != len(in_dims) + 1 or len(split.uses()) != 1 or \
                split.is_graph_output():  # fmt: skip
            return None
        transpose = split.uses()[0][0]
        perm = list(range(len(mid_dims)))
        perm[a], perm[a + 1] = a + 1, a
        swapped = transpose.outputs[0]
        if transpose.op_type != "Transpose" or transpose.domain not in ("", "ai.onnx") or \
                list(transpose.attributes.get_ints("perm", [])) != perm or \
                len(swapped.uses()) != 1 or swapped.is_graph_output():  # fmt: skip
            return None
        merge = swapped.uses()[0][0]
        merged = merge.outputs[0]
        g, k, channels = mid_dims[a], mid_dims[a + 1], in_dims[a]
        others = _all_same(mid_dims[:a] + mid_dims[a + 2 :], in_dims[:a] + in_dims[a + 1 :])
        if merge.op_type != "Reshape" or merge.domain not in ("", "ai.onnx") or not others or \
                not _all_same(_dims(merged) or [], in_dims) or not isinstance(g, int) or \
                not isinstance(k, int) or g * k != channels:  # fmt: skip
            return None
        target = _target_entries(merge.inputs[1])
        if merge.inputs[1] in self.states or target is None or len(target) != len(in_dims) or \
                len(entries) != len(mid_dims) or target[a] is None or \
                target[a] == 0 or entries[a] != g or entries[a + 1] not in (k, -1):  # fmt: skip
            return "has a shape the analysis cannot read"
        segment = state.segments[0]
        whole = segment.offset == 0 and segment.block == 1 and segment.shuffle is None
        if len(state.segments) != 1 or not whole or self.channels[segment.space] != channels:
            return "mixes channels of several layers (or shuffles them twice)"
        source = node.inputs[0]
        assert source is not None
        if entries[a + 1] == k:
            self.shape_edits.append(ShapeEdit(node, a + 1, source, g))
        if target[a] == channels:
            self.shape_edits.append(ShapeEdit(merge, a))
        self.dim_edits += [DimEdit(split, a + 1, source, g), DimEdit(swapped, a, source, g)]
        self.partition(segment.space, Partition(g))  # the rows must stay equal
        shuffled = Segment(segment.space, Fraction(0), Fraction(1), (g, k))
        self.out(merge, ChannelState(a, (shuffled,)))
        return ""

    def reshape(self, node: ir.Node, state: ChannelState) -> str | None:
        src, out = node.inputs[0], node.outputs[0]
        in_dims = _dims(src)
        entries = _target_entries(node.inputs[1])
        if in_dims is None or entries is None:
            return "has a shape the analysis cannot read"
        allowzero = node.attributes.get_int("allowzero", 0)
        out_shape = _dims(out) or [None] * len(entries)
        if len(out_shape) != len(entries):
            return "has a shape the analysis cannot read"
        out_dims: list[Dim] = []
        for i, (entry, known) in enumerate(zip(entries, out_shape, strict=True)):
            if isinstance(entry, int) and entry > 0:
                out_dims.append(entry)
            elif entry == 0 and not allowzero and i < len(in_dims):
                out_dims.append(in_dims[i])
            else:
                out_dims.append(known)
        a = state.axis
        if len(entries) <= a:
            return "drops the channel axis"
        pre_in, pre_out = in_dims[:a], out_dims[:a]
        suf_in, suf_out = in_dims[a:], out_dims[a:]
        minus = [i for i, e in enumerate(entries) if e == -1]
        static_suffix = all(isinstance(d, int) for d in suf_in + suf_out)
        for i in range(a):
            if _same(pre_in[i], pre_out[i]) or (entries[i] == 0 and not allowzero):
                continue
            if entries[i] == -1 and static_suffix and math.prod(suf_in) == math.prod(suf_out):
                continue  # type: ignore[arg-type]
            return "mixes the channel axis with the axes before it"
        entry = entries[a]
        if entry is None:
            return "takes the channel count from a shape computed at run time"
        head = suf_in[0]
        if not isinstance(head, int):
            return "has a channel axis of unknown size"
        factor: Fraction | None = None  # positions of the output axis per input position
        heads = False
        inner = suf_in[1:]
        if _same(suf_out[0], head) or (entry == 0 and not allowzero):
            factor = Fraction(1)
        elif len(suf_out) == 1 and all(isinstance(d, int) for d in inner) and (
            suf_out[0] == math.prod(suf_in) or (entry == -1 and len(minus) == 1)  # type: ignore[arg-type]
        ):
            factor = Fraction(math.prod(inner))  # type: ignore[arg-type]
        else:
            for k in range(2, len(suf_in) + 1):
                merged = suf_in[1:k]
                if all(isinstance(d, int) for d in merged) and suf_out[0] == head * math.prod(
                    merged  # type: ignore[arg-type]
                ) and _all_same(suf_out[1:], suf_in[k:]):
                    factor = Fraction(math.prod(merged))  # type: ignore[arg-type]
                    break
            if factor is None and len(suf_out) >= 2:
                first, second = suf_out[0], suf_out[1]
                if isinstance(first, int) and isinstance(second, int) and first * second == \
                        head and _all_same(suf_out[2:], suf_in[1:]):  # fmt: skip
                    if entries[a + 1] is None:
                        return "takes the head size from a shape computed at run time"
                    factor = Fraction(1, second)
                    heads = True
        if factor is None:
            return "reshapes the channel axis in a way the analysis cannot follow"
        if isinstance(entry, int) and entry > 0:
            self.shape_edits.append(ShapeEdit(node, a))
        if heads:
            self.heads.update(s.space for s in state.segments)
        self.out(node, _scale(state, factor))
        return None

    # --- after the walk ---------------------------------------------------------------------
    def join_shared_members(self) -> None:
        """Spaces sharing a tensor slice are one group; overlapping slices that differ are
        unsafe; every use of a member tensor must be a recorded member."""
        by_slot: dict[tuple[ir.Value, int], list[Member]] = defaultdict(list)
        for member in self.members:
            by_slot[(member.value, member.axis)].append(member)
        for members in by_slot.values():
            for i, x in enumerate(members):
                for y in members[i + 1 :]:
                    same = (x.segment.offset, x.segment.block, x.segment.shuffle) == (
                        y.segment.offset, y.segment.block, y.segment.shuffle)  # fmt: skip
                    if same and self.channels[x.segment.space] == self.channels[y.segment.space]:
                        self.union(x.segment.space, y.segment.space)
                        continue
                    if _overlap(x.segment, self.channels[x.segment.space], y.segment,
                                self.channels[y.segment.space]):  # fmt: skip
                        reason = f"'{x.value.name}' is sliced along axis {x.axis} by channels " \
                                 "that do not line up"  # fmt: skip
                        self.reasons[x.segment.space].append(reason)
                        self.reasons[y.segment.space].append(reason)
        recorded: dict[ir.Value, set[tuple[ir.Node, int]]] = defaultdict(set)
        for member in self.members:
            recorded[member.value].add((member.node, member.index))
        for value, uses in recorded.items():
            spaces = {m.segment.space for m in self.members if m.value is value}
            problem = None
            if not value.is_initializer() or value.is_graph_input():
                problem = f"'{value.name}' is not a constant initializer (or is a graph input)"
            else:
                other = [n for n, i in value.uses() if (n, i) not in uses]
                if other:
                    problem = f"'{value.name}' is also read by {other[0].op_type} " \
                              f"'{_name(other[0])}'"  # fmt: skip
            if problem:
                for space in spaces:
                    self.reasons[space].append(problem)

    def build(self) -> ChannelAnalysis:
        roots: dict[int, list[int]] = defaultdict(list)
        for space in range(len(self.parent)):
            roots[self.find(space)].append(space)
        groups: list[ChannelGroup] = []
        space_group: dict[int, int] = {}
        members_of: dict[int, list[Member]] = defaultdict(list)
        for member in self.members:
            members_of[self.find(member.segment.space)].append(member)
        segments_of: dict[int, list[Segment]] = defaultdict(list)
        for state in self.states.values():
            for segment in state.segments:
                segments_of[self.find(segment.space)].append(segment)
        for root, spaces in roots.items():
            reasons: list[str] = []
            for space in spaces:
                reasons += [r for r in self.reasons.get(space, []) if r not in reasons]
            counts = {self.channels[s] for s in spaces}
            channels = max(counts)
            if len(counts) > 1:
                reasons.append(f"joins channel spaces of different sizes {sorted(counts)}")
            unit = 1
            seen: set[tuple] = set()
            members = []
            for m in members_of[root]:
                key = (m.value, m.axis, m.segment.offset, m.segment.block, m.node, m.index)
                if key not in seen:
                    seen.add(key)
                    members.append(m)
            shuffled = False
            for segment in [m.segment for m in members] + segments_of[root]:
                unit = math.lcm(unit, segment.block.denominator)
                shuffled = shuffled or segment.shuffle is not None
                if segment.offset.denominator != 1:
                    reasons.append("channel blocks do not line up with a reshape")
            if channels % unit:
                reasons.append(f"{channels} channels do not split into units of {unit}")
            partitions: list[Partition] = []
            for space in spaces:
                partitions += [p for p in self.partitions.get(space, []) if p not in partitions]
            if (partitions or shuffled) and unit != 1:
                reasons.append("grouped or shuffled channels split into heads")
            index = len(groups)
            for space in spaces:
                space_group[space] = index
            groups.append(ChannelGroup(
                channels=channels,
                unit=unit,
                members=members,
                producers=[self.producers[s] for s in spaces],
                heads=any(s in self.heads for s in spaces),
                reasons=reasons[:MAX_REASONS] if reasons else [],
                spaces=set(spaces),
                partitions=partitions,
            ))  # fmt: skip
        return ChannelAnalysis(groups, self.states, self.shape_edits, self.group_edits,
                               space_group, self.dim_edits)  # fmt: skip


_HANDLERS = {
    **{op: _Analyzer.visit_unary for op in UNARY_OPS},
    **{op: _Analyzer.visit_binary for op in BINARY_OPS},
    **{op: _Analyzer.visit_pool for op in POOL_OPS},
    **{op: _Analyzer.visit_reduce for op in REDUCE_OPS},
    **{op: _Analyzer.visit_softmax for op in SOFTMAX_OPS},
    "BatchNormalization": _Analyzer.visit_batchnormalization,
    "InstanceNormalization": _Analyzer.visit_instancenormalization,
    "LayerNormalization": _Analyzer.visit_layernormalization,
    "Transpose": _Analyzer.visit_transpose,
    "Flatten": _Analyzer.visit_flatten,
    "Squeeze": _Analyzer.visit_squeeze,
    "Unsqueeze": _Analyzer.visit_squeeze,
    "Concat": _Analyzer.visit_concat,
    "Split": _Analyzer.visit_split,
    "Slice": _Analyzer.visit_slice,
    "Pad": _Analyzer.visit_pad,
    "Resize": _Analyzer.visit_resize,
    "Upsample": _Analyzer.visit_resize,
    "Shape": _Analyzer.visit_shape,
    "Reshape": _Analyzer.visit_reshape,
}


def _name(node: ir.Node) -> str:
    return node.name or node.op_type


def _scale(state: ChannelState, factor: Fraction) -> ChannelState:
    return ChannelState(state.axis, tuple(
        Segment(s.space, s.offset * factor, s.block * factor, s.shuffle) for s in state.segments
    ))  # fmt: skip


def _dims(value: ir.Value | None) -> list[Dim] | None:
    if value is None:
        return None
    shape = value.shape
    if shape is None and value.const_value is not None:
        shape = value.const_value.shape
    if shape is None:
        return None
    dims: list[Dim] = []
    for d in shape:
        if isinstance(d, int):
            dims.append(d)
        else:
            dims.append(d.value if isinstance(d.value, (str, int)) else None)
    return dims


def _rank(value: ir.Value | None) -> int | None:
    dims = _dims(value)
    return None if dims is None else len(dims)


def _dim(value: ir.Value | None, axis: int) -> Dim:
    dims = _dims(value)
    if dims is None or not 0 <= axis < len(dims):
        return None
    return dims[axis]


def _broadcasts(value: ir.Value | None, axis: int) -> bool:
    return axis < 0 or _dim(value, axis) == 1


def _same(a: Dim, b: Dim) -> bool:
    return a is not None and a == b


def _all_same(a: Sequence[Dim], b: Sequence[Dim]) -> bool:
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))


def _overlap(x: Segment, cx: int, y: Segment, cy: int) -> bool:
    return x.offset < y.offset + cy * y.block and y.offset < x.offset + cx * x.block


def _target_entries(value: ir.Value | None) -> list[int | None] | None:
    """The entries of a Reshape target: ints where constant, None where computed at run time."""
    source = target_sources(value)
    if source is None:
        return None
    entries: list[int | None] = []
    for piece, index, _ in source:
        const = piece.const_value
        entries.append(None if const is None else int(const.numpy().ravel()[index]))
    return entries


def target_sources(value: ir.Value | None) -> list[tuple[ir.Value, int, int]] | None:
    """For each entry of a Reshape target, the 1-D value it comes from, its index there and
    the Concat input slot: the target itself when constant, else the pieces of the Concat
    that builds it."""
    if value is None:
        return None
    if value.const_value is not None:
        return [(value, i, 0) for i in range(int(np.prod(value.const_value.shape)))]
    producer = value.producer()
    if producer is None or producer.op_type != "Concat" or producer.domain not in ("", "ai.onnx"):
        return None
    sources = []
    for slot, piece in enumerate(producer.inputs):
        if piece is None:
            return None
        length = _dim(piece, 0)
        if piece.const_value is not None:
            length = int(np.prod(piece.const_value.shape))
        if not isinstance(length, int) or _rank(piece) not in (1, None):
            return None
        sources += [(piece, i, slot) for i in range(length)]
    return sources
