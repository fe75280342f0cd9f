"""onnxcomp's passes. Each module holds one technique; classes load on first access."""

from __future__ import annotations

import importlib
from typing import Any

from onnxcomp.passes._base import CompressionPass, CompressionResult, PassOptions, option

_LAZY = {
    "SimplifyPass": "onnxcomp.passes.simplify",
    "SimplifyOptions": "onnxcomp.passes.simplify",
    "FoldBatchNormPass": "onnxcomp.passes.fold_bn",
    "FoldBatchNormOptions": "onnxcomp.passes.fold_bn",
    "StripPass": "onnxcomp.passes.strip",
    "StripOptions": "onnxcomp.passes.strip",
    "MagnitudePrunePass": "onnxcomp.passes.prune",
    "MagnitudePruneOptions": "onnxcomp.passes.prune",
    "NMPrunePass": "onnxcomp.passes.prune",
    "NMPruneOptions": "onnxcomp.passes.prune",
    "LowRankPass": "onnxcomp.passes.lowrank",
    "LowRankOptions": "onnxcomp.passes.lowrank",
    "ChannelPrunePass": "onnxcomp.passes.prune_channels",
    "ChannelPruneOptions": "onnxcomp.passes.prune_channels",
    "WeightQuantizePass": "onnxcomp.passes.quantize",
    "WeightQuantizeOptions": "onnxcomp.passes.quantize",
    "StaticQuantizePass": "onnxcomp.passes.quantize_static",
    "StaticQuantizeOptions": "onnxcomp.passes.quantize_static",
    "DynamicQuantizePass": "onnxcomp.passes.quantize_dynamic",
    "DynamicQuantizeOptions": "onnxcomp.passes.quantize_dynamic",
    "Float16Pass": "onnxcomp.passes.fp16",
    "Float16Options": "onnxcomp.passes.fp16",
    "DistillPass": "onnxcomp.passes.distill",
    "DistillOptions": "onnxcomp.passes.distill",
}

__all__ = ["CompressionPass", "CompressionResult", "PassOptions", "option", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'onnxcomp.passes' has no attribute '{name}'")
