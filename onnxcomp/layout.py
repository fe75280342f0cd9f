"""Layouts older exporters wrote, brought to the form every pass expects, each with a note.

- **Initializers listed as graph inputs** (IR version 3 required it; the ONNX model zoo's
  classic CNNs and Caffe2 exports have every weight so listed). ONNX lets a caller override
  such an initializer, so passes must leave it alone, and every weight pass would be a no-op.
  By default they are weights, the convention of ONNX Runtime's tooling and onnxsim: they
  leave the graph inputs (and the IR version rises to 4, the first that allows an
  initializer that is not an input). ``keep_initializer_inputs`` keeps them overridable;
  passes then skip them and say so.
- **Graph input dims of -1** (Paddle2ONNX writes ``dim_value: -1`` for a dynamic dim): made
  dynamic dims, so shape inference and random inputs do not read -1 as a size.

- **Opsets older than ONNX Runtime runs** (:data:`MIN_RUNTIME_OPSET`; the backend test models
  PyTorch exported at opset 6 have Add, Gemm, BatchNormalization ONNX Runtime has no kernel
  for): upgraded with onnx's version converter, so the numeric check and the written model
  run. Newer old opsets stay: passes that need more upgrade the model themselves
  (:func:`onnxcomp.passes._opset.upgrade_opset`) and say so.

Nothing here reads files.
"""

from __future__ import annotations

import onnx_ir as ir

from onnxcomp.errors import UnsupportedModelError
from onnxcomp.passes._base import name_list
from onnxcomp.passes._opset import onnx_opset, upgrade_opset

# The first IR version in which an initializer need not be a graph input.
FREE_INITIALIZERS_IR_VERSION = 4
# The oldest default-domain opset ONNX Runtime has kernels for (1.2x dropped opsets 1-6).
MIN_RUNTIME_OPSET = 7


def normalize_layout(model: ir.Model, *, keep_initializer_inputs: bool = False) -> list[str]:
    """Bring ``model`` (in place) to the layout passes expect; one note per change made."""
    notes = []
    overridable = [v for v in model.graph.inputs if v.is_initializer()]
    if overridable and keep_initializer_inputs:
        notes.append(
            f"{len(overridable)} initializers are also graph inputs and stay so "
            f"(keep_initializer_inputs): a caller may override them, so passes leave them "
            f"alone: {name_list([v.name or '?' for v in overridable])}"
        )
    elif overridable:
        for value in overridable:
            model.graph.inputs.remove(value)
        ir_note = ""
        if model.ir_version < FREE_INITIALIZERS_IR_VERSION:
            ir_note = f"; IR version {model.ir_version} -> {FREE_INITIALIZERS_IR_VERSION}"
            model.ir_version = FREE_INITIALIZERS_IR_VERSION
        notes.append(
            f"{len(overridable)} initializers were also listed as graph inputs (an old "
            f"exporter's layout): treated as weights and no longer inputs of the written "
            f"model{ir_note} (keep_initializer_inputs / --keep-initializer-inputs keeps them "
            "overridable)"
        )
    opset = onnx_opset(model)
    if 0 < opset < MIN_RUNTIME_OPSET:
        try:
            notes += upgrade_opset(model, MIN_RUNTIME_OPSET, why="ONNX Runtime")
        except UnsupportedModelError as e:
            notes.append(f"left at opset {opset}, which ONNX Runtime may not run: {e}")
    negative = _free_negative_dims(model.graph.inputs)
    if negative:
        notes.append(
            f"dims of -1 on graph inputs {name_list(negative)} read as dynamic dims "
            "(as Paddle2ONNX means them)"
        )
    return notes


def _free_negative_dims(values: list[ir.Value]) -> list[str]:
    """Replace negative static dims of ``values`` by unnamed dynamic dims; the names touched."""
    changed = []
    for value in values:
        shape = value.shape
        if shape is None or not any(isinstance(d, int) and d < 0 for d in shape):
            continue
        value.shape = ir.Shape(
            [ir.SymbolicDim(None) if isinstance(d, int) and d < 0 else d for d in shape]
        )
        changed.append(value.name or "?")
    return changed
