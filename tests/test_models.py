"""End to end on the shipped demo models (models/): the README's main job and its numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxcomp
from tests.conftest import MODELS, run_onnx


def _accuracy(model: Path, data: dict) -> float:
    feeds = {k: v for k, v in data.items() if k != "labels"}
    return float(np.mean(np.argmax(run_onnx(model, feeds)[0], axis=1) == data["labels"]))


def test_digits_cnn_simplify_fold_bn_removes_batchnorm_keeps_accuracy(tmp_path: Path):
    out = tmp_path / "digits_small.onnx"
    _, report = onnxcomp.optimize(
        MODELS / "digits_cnn.onnx",
        "simplify,fold-bn",
        data=MODELS / "digits_eval.npz",
        output=out,
    )
    assert report.before.op_counts["BatchNormalization"] == 5
    assert "BatchNormalization" not in report.after.op_counts
    assert report.after.params < report.before.params
    assert report.file_bytes_after < report.file_bytes_before
    (diff,) = report.final_check
    assert diff.max_abs < 1e-4 and diff.cosine > 0.999999
    eval_data = dict(np.load(MODELS / "digits_eval.npz"))
    assert _accuracy(out, eval_data) == _accuracy(MODELS / "digits_cnn.onnx", eval_data)
    assert report.accuracy_before == report.records[-1].accuracy > 0.97


def test_tiny_encoder_survives_the_pipeline_at_other_shapes(tmp_path: Path):
    out = tmp_path / "encoder_small.onnx"
    onnxcomp.optimize(
        MODELS / "tiny_encoder.onnx", "simplify,fold-bn", data=MODELS / "encoder_eval.npz",
        output=out,
    )  # fmt: skip
    onnx.checker.check_model(str(out), full_check=True)
    data = np.load(MODELS / "encoder_eval.npz")
    for batch, length in [(1, 32), (7, 19)]:
        feeds = {k: data[k][:batch, :length] for k in ("input_ids", "attention_mask")}
        np.testing.assert_allclose(
            run_onnx(out, feeds)[0], run_onnx(MODELS / "tiny_encoder.onnx", feeds)[0],
            rtol=1e-4, atol=1e-4,
        )  # fmt: skip


@pytest.mark.parametrize("name", ["digits", "encoder"])
def test_demo_data_files_match_their_models(name: str):
    model = {"digits": "digits_cnn.onnx", "encoder": "tiny_encoder.onnx"}[name]
    for split in ("calib", "eval"):
        data = onnxcomp.load_data(MODELS / f"{name}_{split}.npz", onnxcomp.load(MODELS / model))
        assert data.labels is not None and data.num_samples >= 100
