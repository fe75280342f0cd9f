"""``onnxcomp distill``: an ONNX student or a ``module:Class`` torch student trained against a
teacher and written out; one-line errors with the usual exit codes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnxcomp
from onnxcomp.cli import main
from tests.conftest import MODELS, run_onnx

torch = pytest.importorskip("torch")

DIGITS = MODELS / "digits_cnn.onnx"
CALIB = MODELS / "digits_calib.npz"
ENCODER_DATA = MODELS / "encoder_calib.npz"
QUICK = ["--steps", "4", "--batch-size", "32"]
STUDENT_SOURCE = '''
from torch import nn


class Small(nn.Module):
    def __init__(self, width: int = 8):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(64, width), nn.ReLU(), nn.Linear(width, 10)
        )

    def forward(self, x):
        return self.net(x)
'''


@pytest.fixture
def student_path(tmp_path):
    model, _ = onnxcomp.optimize(DIGITS, "prune-channels:ratio=0.5", check="none")
    path = tmp_path / "student.onnx"
    onnxcomp.save(model, path)
    return path


def _error(capsys) -> str:
    return capsys.readouterr().err.strip()


def test_onnx_student_is_trained_and_written(tmp_path, student_path, capsys):
    out = tmp_path / "out.onnx"
    code = main(["distill", str(DIGITS), "--student", str(student_path), "--data", str(CALIB),
                 "-o", str(out), "--holdout", "0", *QUICK])  # fmt: skip
    assert code == 0, _error(capsys)
    assert "holdout_accuracy" not in capsys.readouterr().out  # holdout 0: nothing held out
    before, after = onnx.load(student_path), onnx.load(out)
    assert [i.name for i in after.graph.initializer] == [i.name for i in before.graph.initializer]
    feeds = {"input": np.load(CALIB)["input"][:8]}
    assert np.abs(run_onnx(after, feeds)[0] - run_onnx(before, feeds)[0]).max() > 1e-3


def test_module_student_is_trained_and_exported(tmp_path, capsys, monkeypatch):
    (tmp_path / "tiny_student.py").write_text(STUDENT_SOURCE)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out.onnx"
    code = main(["distill", str(DIGITS), "--student", "tiny_student:Small", "--student-args",
                 '{"width": 16}', "--data", str(CALIB), "-o", str(out), *QUICK])  # fmt: skip
    assert code == 0, _error(capsys)
    assert "parameters: 1210" in capsys.readouterr().out
    model = onnx.load(out)
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["logits"]
    (logits,) = run_onnx(model, {"input": np.load(CALIB)["input"][:3]})
    assert logits.shape == (3, 10)


def test_missing_data_is_a_usage_error(tmp_path, student_path, capsys):
    code = main(["distill", str(DIGITS), "--student", str(student_path),
                 "-o", str(tmp_path / "o.onnx")])  # fmt: skip
    assert code == 2
    assert _error(capsys) == (
        "onnxcomp: error: distill needs --data FILE.npz: the inputs to train on"
    )


def test_data_without_the_teachers_inputs_is_an_error(tmp_path, student_path, capsys):
    code = main(["distill", str(DIGITS), "--student", str(student_path), "--data",
                 str(ENCODER_DATA), "-o", str(tmp_path / "o.onnx")])  # fmt: skip
    assert code == 1
    assert "does not match the model's inputs (missing input" in _error(capsys)


def test_student_with_other_outputs_is_an_error(tmp_path, capsys):
    model = onnx.load(DIGITS)
    model.graph.output[0].name = "scores"
    model.graph.node[-1].output[0] = "scores"
    path = tmp_path / "renamed.onnx"
    onnx.save(model, path)
    code = main(["distill", str(DIGITS), "--student", str(path), "--data", str(CALIB),
                 "-o", str(tmp_path / "o.onnx")])  # fmt: skip
    assert code == 1
    assert "the student's outputs (scores) are not the teacher's (logits)" in _error(capsys)


def test_student_with_an_unsupported_op_is_an_error(tmp_path, capsys):
    model = onnx.load(DIGITS)
    last = model.graph.node[-1]
    last.output[0] = "pre"
    model.graph.node.append(onnx.helper.make_node("RandomNormalLike", ["pre"], ["logits"]))
    path = tmp_path / "random.onnx"
    onnx.save(model, path)
    code = main(["distill", str(DIGITS), "--student", str(path), "--data", str(CALIB),
                 "-o", str(tmp_path / "o.onnx"), *QUICK])  # fmt: skip
    assert code == 1
    error = _error(capsys)
    assert "no torch implementation for 1 op types: RandomNormalLike (1)" in error
    assert len(error.splitlines()) == 1


def test_bad_student_module_and_args_are_usage_errors(tmp_path, capsys):
    for student, args, message in [
        ("no_such_module_xyz:Small", None, "cannot import the student module"),
        ("json:Nope", None, "json has no 'Nope'"),
        ("collections:OrderedDict", "[1, 2", "--student-args is not JSON"),
    ]:
        argv = ["distill", str(DIGITS), "--student", student, "--data", str(CALIB),
                "-o", str(tmp_path / "o.onnx"), *(["--student-args", args] if args else [])]
        assert main(argv) == 2
        assert message in _error(capsys)
