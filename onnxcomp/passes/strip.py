"""Remove what a model carries that inference never reads: doc strings and metadata.

Exporters attach provenance to every node and value (PyTorch's exporter writes the Python
stack trace of each op into ``metadata_props``): on small models it can be half the file.
The model-level ``metadata_props`` (licence, version, author) are kept unless asked. Lossless:
the graph and its weights are untouched.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir
from onnx_ir.passes import common as common_passes

from onnxcomp.passes._base import CompressionPass, CompressionResult, PassOptions, option


@dataclasses.dataclass(frozen=True)
class StripOptions(PassOptions):
    keep_model_metadata: bool = option(
        True, "keep the model-level metadata_props (licence, version, author)"
    )


class StripPass(CompressionPass):
    """Clear doc strings and metadata_props of nodes, values, graphs and functions."""

    summary = "lossless: drop doc strings and per-node/value metadata (exporter stack traces)"
    options_class = StripOptions
    options: StripOptions
    lossless = True
    min_opset = 0

    def apply(self, model: ir.Model) -> CompressionResult:
        entries = _metadata_entries(model)
        common_passes.ClearMetadataAndDocStringPass()(model)
        for graph in model.graphs():
            for value in _values(graph):
                value.metadata_props.clear()
                value.doc_string = None
        if not self.options.keep_model_metadata:
            model.metadata_props.clear()
        model.doc_string = None
        removed = entries - _metadata_entries(model)
        return CompressionResult(model, removed > 0, stats={"metadata_entries_removed": removed})


def _values(graph: ir.Graph):
    yield from graph.inputs
    yield from graph.initializers.values()
    for node in graph:
        yield from node.outputs


def _metadata_entries(model: ir.Model) -> int:
    """Metadata entries and doc strings in the model (what this pass can remove)."""
    count = len(model.metadata_props) + bool(model.doc_string)
    for graph in [*model.graphs(), *model.functions.values()]:
        count += len(graph.metadata_props) + bool(graph.doc_string)
        for node in graph:
            count += len(node.metadata_props) + bool(node.doc_string)
        if isinstance(graph, ir.Graph):
            count += sum(len(v.metadata_props) + bool(v.doc_string) for v in _values(graph))
    return count
