"""Short pass names for the command line, mapped explicitly to pass classes and presets.

Classes are imported only when a pass is built or described, so heavy dependencies (torch for
distillation) load only when that pass runs. Adding a pass means adding one line here.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from onnxcomp.errors import UsageError

if TYPE_CHECKING:
    from onnxcomp.data import Dataset
    from onnxcomp.passes._base import CompressionPass, PassOptions
    from onnxcomp.target import Target


@dataclasses.dataclass(frozen=True)
class PassSpec:
    """A command-line name for a pass class, with option presets (e.g. ``int4`` = bits 4)."""

    name: str
    target: str  # "module:ClassName"
    presets: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def load(self) -> type[CompressionPass]:
        module, _, cls = self.target.partition(":")
        return getattr(importlib.import_module(module), cls)

    @property
    def summary(self) -> str:
        return self.load().summary

    def options_class(self) -> type[PassOptions]:
        return self.load().options_class

    def build(
        self,
        values: Mapping[str, str] | None = None,
        *,
        data: Dataset | None = None,
        target: Target | None = None,
    ) -> CompressionPass:
        """The pass with presets, then ``values`` (option text from the command line), applied."""
        cls = self.load()
        options = cls.options_class.from_strings(
            values or {}, pass_name=self.name, defaults=self.presets
        )
        return cls(options, data=data, target=target)


PASSES: dict[str, PassSpec] = {
    spec.name: spec
    for spec in (
        PassSpec("simplify", "onnxcomp.passes.simplify:SimplifyPass"),
        PassSpec("fold-bn", "onnxcomp.passes.fold_bn:FoldBatchNormPass"),
        PassSpec("strip", "onnxcomp.passes.strip:StripPass"),
        PassSpec("prune", "onnxcomp.passes.prune:MagnitudePrunePass"),
        PassSpec("prune-nm", "onnxcomp.passes.prune:NMPrunePass"),
        PassSpec("lowrank", "onnxcomp.passes.lowrank:LowRankPass"),
        PassSpec("prune-channels", "onnxcomp.passes.prune_channels:ChannelPrunePass"),
        PassSpec("int8", "onnxcomp.passes.quantize:WeightQuantizePass", {"bits": 8}),
        PassSpec(
            "int4", "onnxcomp.passes.quantize:WeightQuantizePass", {"bits": 4, "block_size": 32}
        ),
        PassSpec(
            "ternary",
            "onnxcomp.passes.quantize:WeightQuantizePass",
            {"bits": 2, "scheme": "ternary"},
        ),
        PassSpec(
            "binary", "onnxcomp.passes.quantize:WeightQuantizePass", {"bits": 2, "scheme": "binary"}
        ),
        PassSpec("int8-static", "onnxcomp.passes.quantize_static:StaticQuantizePass"),
        PassSpec("int8-dynamic", "onnxcomp.passes.quantize_dynamic:DynamicQuantizePass"),
        PassSpec("fp16", "onnxcomp.passes.fp16:Float16Pass"),
        PassSpec("distill", "onnxcomp.passes.distill:DistillPass"),
    )
}


def get(name: str) -> PassSpec:
    try:
        return PASSES[name]
    except KeyError:
        raise UsageError(f"unknown pass '{name}' (available: {', '.join(PASSES)})") from None
