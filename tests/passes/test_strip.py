"""strip: metadata and doc strings go, the graph and its weights stay."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

import onnxcomp
from tests.conftest import MODELS, run_onnx


def _entries(model: onnx.ModelProto) -> int:
    nodes = sum(len(n.metadata_props) + bool(n.doc_string) for n in model.graph.node)
    values = sum(len(v.metadata_props) for v in model.graph.value_info)
    return nodes + values


def test_exporter_stack_traces_are_removed_and_outputs_are_identical(tmp_path: Path):
    source = MODELS / "digits_cnn.onnx"
    original = onnx.load(source)
    original.metadata_props.add(key="license", value="MIT")
    onnx.save(original, tmp_path / "in.onnx")
    assert _entries(original) > 0
    out = tmp_path / "out.onnx"
    _, report = onnxcomp.optimize(tmp_path / "in.onnx", "strip", output=out)
    stripped = onnx.load(out)
    assert _entries(stripped) == 0
    assert [(p.key, p.value) for p in stripped.metadata_props] == [("license", "MIT")]
    assert report.records[0].stats["metadata_entries_removed"] >= _entries(original)
    assert out.stat().st_size < 0.92 * source.stat().st_size
    x = np.load(MODELS / "digits_eval.npz")["input"][:8]
    np.testing.assert_array_equal(run_onnx(out, {"input": x})[0], run_onnx(source, {"input": x})[0])


def test_model_metadata_goes_too_when_asked(tmp_path: Path):
    original = onnx.load(MODELS / "digits_cnn.onnx")
    original.metadata_props.add(key="license", value="MIT")
    onnx.save(original, tmp_path / "in.onnx")
    model, _ = onnxcomp.optimize(tmp_path / "in.onnx", "strip:keep_model_metadata=false")
    assert not model.metadata_props
