"""Weight layers and pipeline strings: how the search names a per-layer choice to the passes.

The passes take per-layer choices only through their ``exclude`` option (fnmatch patterns of
node or weight names), so "apply X to layer L alone" is ``X:exclude=<every other layer>`` and
"P without layer L" adds L to the ``exclude`` of every pass of P that has one. Layers are
named by their weight tensors, which passes keep (node names are renumbered by the pipeline);
a low-rank factor keeps its weight's name as a prefix. Names are escaped so that fnmatch reads
them literally and the pipeline parser (``,`` ``:`` ``+`` ``=``) is not confused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import onnx_ir as ir

from onnxcomp import registry
from onnxcomp.passes._weights import WEIGHT_INPUTS, find_weights
from onnxcomp.pipeline import parse_pipeline

PIPELINE_CHARS = ",:+="
# lowrank names its factors "<weight>.lowrank_left/right" (onnxcomp/passes/lowrank.py)
LOWRANK_SUFFIX = ".lowrank_*"


@dataclasses.dataclass(frozen=True)
class Layer:
    """A weight tensor and the ops that read it: the unit of per-layer choices."""

    name: str
    op_types: tuple[str, ...]
    shape: tuple[int, ...]
    params: int
    bytes: int

    @property
    def patterns(self) -> tuple[str, ...]:
        """exclude patterns that match this weight, and its low-rank factors, only."""
        literal = escape(self.name)
        return literal, literal + LOWRANK_SUFFIX


def find_layers(model: ir.Model) -> list[Layer]:
    """Every weight the passes may rewrite (Conv/Gemm/MatMul weights, embedding and position
    tables), in graph order."""
    weights, _ = find_weights(model, tuple(WEIGHT_INPUTS))
    return [
        Layer(w.name, tuple(sorted(w.op_types)), w.shape, w.size, w.nbytes)
        for w in weights
        if w.name
    ]


def escape(name: str) -> str:
    """An fnmatch pattern matching ``name`` literally, safe inside a pipeline string:
    fnmatch's ``*?[`` are bracketed, the pipeline's separators become ``?`` (any one char)."""
    out = []
    for char in name:
        if char in "*?[":
            out.append(f"[{char}]")
        elif char in PIPELINE_CHARS or char.isspace():
            out.append("?")
        else:
            out.append(char)
    return "".join(out)


def patterns_of(layers: Iterable[Layer]) -> list[str]:
    return [p for layer in layers for p in layer.patterns]


def step(name: str, **values: object) -> str:
    """One pass of a pipeline string: ``name:key=value:...``; lists joined with ``+``,
    booleans lower-case; None values left out."""
    parts = [name]
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            value = "+".join(map(str, value))
        elif isinstance(value, bool):
            value = str(value).lower()
        parts.append(f"{key}={value}")
    return ":".join(parts)


def only(technique: str, layer: Layer, layers: Sequence[Layer]) -> str:
    """``technique`` (a pass with options, e.g. ``prune:sparsity=0.5``) applied to ``layer``
    alone: every other layer is excluded."""
    others = patterns_of(other for other in layers if other.name != layer.name)
    return add_exclusions(technique, others)


def add_exclusions(pipeline: str, patterns: Sequence[str]) -> str:
    """``pipeline`` with ``patterns`` added to the ``exclude`` of every pass that has one."""
    if not patterns:
        return pipeline
    steps = []
    for name, values in parse_pipeline(pipeline):
        fields = {f.name for f in dataclasses.fields(registry.get(name).options_class())}
        if "exclude" in fields:
            existing = [p for p in values.get("exclude", "").split("+") if p]
            values = {**values, "exclude": "+".join([*existing, *patterns])}
        steps.append(":".join([name, *(f"{k}={v}" for k, v in values.items())]))
    return ",".join(steps)


def has_op(model: ir.Model, *op_types: str) -> bool:
    return any(node.op_type in op_types for node in model.graph)
