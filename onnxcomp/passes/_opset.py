"""The model's ONNX opset, and upgrading it in place when a pass needs a newer one.

Quantised forms need recent opsets (per-axis DequantizeLinear 13, float16 scales 19, blocked
scales and INT4 21, INT2 25). :func:`upgrade_opset` runs onnx's version converter and puts the
converted graph back into the same ``ir.Model`` (passes are in-place), keeping the original
weight tensors (no copies, external data stays where it is) and the node and value metadata
the converter drops, and raising the IR version as far as the new opset requires. It returns
a note for the pass's report, and raises :class:`UnsupportedModelError` when the converter
cannot upgrade the model: never a silent no-op.
"""

from __future__ import annotations

import contextlib

import onnx
import onnx_ir as ir
from onnx_ir.passes import common as common_passes

from onnxcomp.errors import UnsupportedModelError


def onnx_opset(model: ir.Model) -> int:
    """The default-domain opset the model imports (0 when it imports none)."""
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))


def min_ir_version(opset: int) -> int:
    """The lowest IR version that may declare ``opset`` (what onnx.checker requires)."""
    return onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", opset)])


def upgrade_opset(model: ir.Model, target: int, *, why: str) -> list[str]:
    """Upgrade ``model`` in place to default-domain opset ``target``; notes saying what was done.

    ``why`` names what needs the opset (for the note and the error). Does nothing when the
    model is already at ``target`` or newer.
    """
    current = onnx_opset(model)
    if current >= target:
        return []
    notes = []
    if model.functions:
        # onnx's converter does not convert model-local functions; inline them so nothing
        # keeps running at the old opset.
        common_passes.InlinePass()(model)
        notes.append(f"inlined {len(model.functions)} model-local functions to upgrade the opset")
    try:
        converted = onnx.version_converter.convert_version(ir.serde.serialize_model(model), target)
    except Exception as e:  # the converter raises RuntimeError / ValueError / C++ assertions
        raise UnsupportedModelError(
            f"cannot upgrade the model from opset {current} to {target}, which {why} needs: "
            f"onnx's version converter says: {_reason(e)}"
        ) from None
    # The converter keeps intermediate value types it made stale (Dropout's mask is float
    # before opset 10 and bool after); ONNX Runtime rejects the model over them. Infer anew.
    del converted.graph.value_info[:]
    with contextlib.suppress(Exception):  # else types stay unknown; ONNX Runtime infers them
        converted = onnx.shape_inference.infer_shapes(converted)
    new_graph = ir.serde.deserialize_model(converted).graph
    for name, value in new_graph.initializers.items():
        old = model.graph.initializers.get(name)
        if _same_tensor_type(old, value):
            value.const_value = old.const_value  # type: ignore[union-attr]
    _restore_metadata(model.graph, new_graph)
    new_graph.meta.update(model.graph.meta)  # e.g. the pipeline's scratch data
    model.graph = new_graph
    ir_before = model.ir_version
    model.ir_version = max(model.ir_version, min_ir_version(target))
    ir_note = (
        f", IR version {ir_before} -> {model.ir_version}" if model.ir_version != ir_before else ""
    )
    notes.append(
        f"upgraded the model from opset {current} to {target} with onnx's version converter "
        f"({why} needs opset {target}){ir_note}"
    )
    return notes


def _restore_metadata(old: ir.Graph, new: ir.Graph) -> None:
    """Copy node and value metadata_props the converter drops, matching by name."""
    old_nodes = {n.name: n for n in ir.traversal.RecursiveGraphIterator(old) if n.name}
    old_values = {v.name: v for n in old_nodes.values() for v in n.outputs if v.name}
    old_values.update((v.name, v) for v in (*old.inputs, *old.initializers.values()) if v.name)
    for node in ir.traversal.RecursiveGraphIterator(new):
        source = old_nodes.get(node.name or "")
        if source is not None and source.op_type == node.op_type:
            node.metadata_props.update(source.metadata_props)
        for value in node.outputs:
            if value.name in old_values:
                value.metadata_props.update(old_values[value.name].metadata_props)
    for value in (*new.inputs, *new.initializers.values()):
        if value.name in old_values:
            value.metadata_props.update(old_values[value.name].metadata_props)


def _same_tensor_type(old: ir.Value | None, new: ir.Value) -> bool:
    if old is None or old.const_value is None or new.const_value is None:
        return False
    a, b = old.const_value, new.const_value
    return a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape)


def _reason(error: Exception) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    # C++ assertions read "path/File.h:66: fn: Assertion `false` failed: No Adapter From ..."
    return text.rsplit("failed: ", 1)[-1][:300]
