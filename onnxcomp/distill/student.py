"""A PyTorch student given as ``module:Class`` (with JSON constructor arguments), and its export.

``onnxcomp distill teacher.onnx --student pkg.models:Small --student-args '{"width": 16}'``
imports ``pkg.models`` (or a file, ``path/to/file.py:Small``), builds ``Small(width=16)`` and,
after training, exports it with ``torch.onnx.export(dynamo=True)`` under the teacher's input
and output names, dynamic wherever the teacher's dimensions are.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch
from torch import nn

from onnxcomp.errors import OnnxcompError, UsageError


def is_module_spec(text: str) -> bool:
    """``module:Class`` rather than a model file (a path that exists, or ends in .onnx)."""
    if text.endswith(".onnx") or Path(text).is_file():
        return False
    module, sep, name = text.rpartition(":")
    return bool(sep and module and name.isidentifier())


def load_student(spec: str, args: str | None = None) -> nn.Module:
    """Build the ``module:Class`` student; ``args`` is a JSON object (keyword arguments) or
    array (positional arguments) for its constructor."""
    module_name, _, class_name = spec.rpartition(":")
    try:
        parsed = json.loads(args) if args else {}
    except ValueError as e:
        raise UsageError(f"--student-args is not JSON ({e})") from None
    if not isinstance(parsed, (dict, list)):
        raise UsageError("--student-args must be a JSON object (keywords) or array (positional)")
    module = _import(module_name)
    cls = getattr(module, class_name, None)
    if cls is None:
        raise UsageError(f"{module_name} has no '{class_name}'")
    try:
        student = cls(**parsed) if isinstance(parsed, dict) else cls(*parsed)
    except Exception as e:
        raise UsageError(f"cannot build {spec} with --student-args {args or '{}'}: {e}") from None
    if not isinstance(student, nn.Module):
        raise UsageError(f"{spec} is not a torch.nn.Module (got {type(student).__name__})")
    return student


def _import(name: str):
    if name.endswith(".py"):
        path = Path(name)
        if not path.is_file():
            raise UsageError(f"no such student file: {path}")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` would: modules beside the caller
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise UsageError(f"cannot import the student module '{name}': {e}") from None


def export_student(
    student: nn.Module, teacher: ir.Model, examples: Sequence[np.ndarray]
) -> ir.Model:
    """The trained ``student`` as an onnx_ir model with the teacher's input and output names;
    dimensions that are symbolic in the teacher's inputs stay dynamic."""
    inputs = [v for v in teacher.graph.inputs if not v.is_initializer()]
    tensors = tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in examples)
    dynamic = tuple(
        {
            axis: torch.export.Dim.DYNAMIC
            for axis, dim in enumerate(value.shape or ())
            if not isinstance(dim, int)
        }
        for value in inputs
    )
    student = student.cpu().eval()
    with tempfile.TemporaryDirectory(prefix="onnxcomp-export-") as tmp:
        path = Path(tmp) / "student.onnx"
        try:
            torch.onnx.export(
                student,
                tensors,
                str(path),
                dynamo=True,
                input_names=[v.name for v in inputs],
                output_names=[v.name for v in teacher.graph.outputs],
                dynamic_shapes=dynamic,
                external_data=False,
                verbose=False,
            )
        except Exception as e:
            text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise OnnxcompError(f"torch.onnx.export failed on the student: {text[:400]}") from None
        model = ir.load(path)
        ir.external_data.load_to_model(model)  # free of the temporary folder
    return model
