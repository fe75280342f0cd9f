"""Control flow: If, Loop and Scan run their bodies, compiled by the module as sub-modules.

The module hands each op its bodies in ``attrs`` (by attribute name; each has ``run(values,
captured)`` returning the body's outputs) and appends the outer values the bodies read to
the node's inputs; ``attrs['_arity']`` says where the node's own inputs end and
``attrs['_captured']`` names the rest. Conditions and trip counts are read on the host, so a
loop's length may depend on data; gradients flow through every iteration.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import torch

from onnxcomp.distill.ops._common import Attrs, Inputs, OpFn, Tensor, optional


class Body(Protocol):
    """A compiled subgraph."""

    input_names: list[str]

    def run(self, values: Sequence[Tensor | None], captured: Mapping[str, Tensor]
            ) -> list[Tensor]: ...  # fmt: skip


def _split(inputs: Inputs, attrs: Attrs) -> tuple[list[Tensor | None], dict[str, Tensor]]:
    arity = attrs["_arity"]
    own = [optional(inputs, i) for i in range(arity)]
    return own, dict(zip(attrs["_captured"], inputs[arity:], strict=True))


def _if(inputs: Inputs, attrs: Attrs) -> tuple[Tensor, ...]:
    own, captured = _split(inputs, attrs)
    branch = attrs["then_branch"] if bool(own[0].reshape(-1)[0]) else attrs["else_branch"]
    return tuple(branch.run([], captured))


def _stack(values: list[Tensor], like: Tensor | None) -> Tensor:
    if values:
        return torch.stack(values)
    return torch.zeros(0) if like is None else like.new_zeros((0,))


def _loop(inputs: Inputs, attrs: Attrs) -> tuple[Tensor, ...]:
    own, captured = _split(inputs, attrs)
    body: Body = attrs["body"]
    trips, condition, carried = own[0], own[1], list(own[2:])
    limit = int(trips.reshape(-1)[0]) if trips is not None else None
    go = condition if condition is not None else torch.tensor(True)
    device = carried[0].device if carried and carried[0] is not None else None
    scans: list[list[Tensor]] = []
    step = 0
    while bool(go.reshape(-1)[0]) and (limit is None or step < limit):
        counter = torch.tensor(step, dtype=torch.int64, device=device)
        outputs = body.run([counter, go, *carried], captured)
        go, carried = outputs[0], list(outputs[1 : 1 + len(carried)])
        extra = outputs[1 + len(carried) :]
        if not scans:
            scans = [[] for _ in extra]
        for collected, value in zip(scans, extra, strict=True):
            collected.append(value)
        step += 1
    count = attrs["_outputs"] - len(carried)
    stacked = [_stack(s, carried[0] if carried else None) for s in scans] or [
        torch.zeros(0) for _ in range(count)
    ]
    return (*carried, *stacked)


def _scan(inputs: Inputs, attrs: Attrs) -> tuple[Tensor, ...]:
    own, captured = _split(inputs, attrs)
    if attrs["_opset"] < 9:
        return _scan8(own, captured, attrs)
    return _scan_steps(own, captured, attrs)


def _scan_steps(own: list[Tensor | None], captured: dict[str, Tensor], attrs: Attrs
                ) -> tuple[Tensor, ...]:  # fmt: skip
    body: Body = attrs["body"]
    count = attrs["num_scan_inputs"]
    states, sequences = list(own[: len(own) - count]), own[len(own) - count :]
    in_axes = list(attrs.get("scan_input_axes") or [0] * count)
    in_dirs = list(attrs.get("scan_input_directions") or [0] * count)
    length = sequences[0].shape[in_axes[0] % sequences[0].dim()]
    collected: list[list[Tensor]] = []
    for t in range(length):
        slices = [
            s.select(a % s.dim(), length - 1 - t if d else t)
            for s, a, d in zip(sequences, in_axes, in_dirs, strict=True)
        ]
        outputs = body.run([*states, *slices], captured)
        states, extra = list(outputs[: len(states)]), outputs[len(states) :]
        if not collected:
            collected = [[] for _ in extra]
        for c, value in zip(collected, extra, strict=True):
            c.append(value)
    out_axes = list(attrs.get("scan_output_axes") or [0] * len(collected))
    out_dirs = list(attrs.get("scan_output_directions") or [0] * len(collected))
    results = []
    for values, axis, direction in zip(collected, out_axes, out_dirs, strict=True):
        if direction:
            values = values[::-1]
        results.append(torch.stack(values, dim=axis % (values[0].dim() + 1)))
    return (*states, *results)


def _scan8(own: list[Tensor | None], captured: dict[str, Tensor], attrs: Attrs
           ) -> tuple[Tensor, ...]:  # fmt: skip
    """Opset 8: a leading batch axis on every input, optional sequence lengths first."""
    lengths, rest = own[0], own[1:]
    batch = rest[0].shape[0]
    if lengths is not None and bool((lengths != rest[-1].shape[1]).any()):
        raise NotImplementedError("Scan-8 with sequence_lens shorter than the sequences")
    directions = attrs.get("directions")
    per_batch = []
    for b in range(batch):
        step_attrs = {**attrs, "scan_input_directions": directions}
        per_batch.append(_scan_steps([x[b] for x in rest], captured, step_attrs))
    return tuple(torch.stack(list(values)) for values in zip(*per_batch, strict=True))


OPS: dict[str, OpFn] = {"If": _if, "Loop": _loop, "Scan": _scan}
