"""``onnxcomp distill`` under ``torchrun --nproc_per_node 2`` (gloo on CPU): both processes
train with DistributedDataParallel, rank 0 writes a valid model holding what it trained."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

import onnxcomp  # noqa: E402
from onnxcomp.distill import OnnxModule  # noqa: E402
from tests.conftest import MODELS, REPO  # noqa: E402

DIGITS = MODELS / "digits_cnn.onnx"
CALIB = MODELS / "digits_calib.npz"


def test_two_processes_train_and_rank_zero_writes_what_it_trained(tmp_path):
    student, _ = onnxcomp.optimize(DIGITS, "prune-channels:ratio=0.5", check="none")
    student_path, out, checkpoint = tmp_path / "s.onnx", tmp_path / "out.onnx", tmp_path / "c.pt"
    onnxcomp.save(student, student_path)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "onnxcomp", "distill", str(DIGITS), "--student", str(student_path),
        "--data", str(CALIB), "-o", str(out), "--epochs", "2", "--batch-size", "16",
        "--holdout", "0", "--checkpoint", str(checkpoint), "--device", "cpu",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=120, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "processes: 2" in done.stdout and done.stdout.count("wrote ") == 1  # rank 0 only
    onnx.checker.check_model(str(out), full_check=True)

    state = torch.load(checkpoint, weights_only=True)
    assert state["epoch"] == 2 and state["total_steps"] == 2 * 6  # 180 samples / 2 ranks / 16
    module = OnnxModule(onnxcomp.load(student_path))
    written = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(out).graph.initializer}
    for key, name in module.onnx_names.items():
        np.testing.assert_allclose(written[name], state["student"][f"weights.{key}"].numpy(),
                                   atol=1e-6)  # fmt: skip
