"""The loss bound: a pipeline whose result collapses fails with one line naming the pass where
the metric fell most and writes nothing; --allow-loss writes it; ordinary lossy passes pass.

Ternary weights without fine-tuning are the collapse here: on the demo CNN they take top-1
from 98.9% to ~26% and the logits' cosine to ~0.57, on any CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import onnxcomp
from onnxcomp.cli import main
from onnxcomp.errors import LossBoundError, UsageError
from onnxcomp.instrument import LossBound
from tests.conftest import MODELS

DIGITS = MODELS / "digits_cnn.onnx"
EVAL = MODELS / "digits_eval.npz"


def test_collapse_with_labels_names_the_pass_and_writes_nothing(tmp_path: Path):
    output = tmp_path / "out.onnx"
    with pytest.raises(LossBoundError) as caught:
        onnxcomp.optimize(DIGITS, "fold-bn,ternary,strip", data=EVAL, output=output)
    message = str(caught.value)
    assert caught.value.pass_name == "ternary" and "\n" not in message
    assert "top-1 fell" in message and "--max-drop 5" in message
    assert "pass 'ternary'" in message and "nothing written" in message
    assert not output.exists() and list(tmp_path.iterdir()) == []


def test_collapse_without_labels_is_caught_by_output_cosine():
    """Random inputs, no labels: the default cosine bound (0.9) applies."""
    with pytest.raises(LossBoundError, match=r"output cosine 0\.\d+ \(--min-cosine 0\.9\)"):
        onnxcomp.optimize(DIGITS, "simplify,ternary")


def test_allow_loss_writes_and_records_the_verdict(tmp_path: Path):
    output = tmp_path / "out.onnx"
    _, report = onnxcomp.optimize(
        DIGITS, "ternary", data=EVAL, output=output, bound=LossBound(allow_loss=True)
    )
    assert output.is_file()
    guard = report.guard
    assert guard is not None and not guard["passed"] and guard["allowed"]
    assert guard["worst_pass"] == "ternary" and guard["accuracy_drop_pt"] > 5


def test_ordinary_lossy_passes_are_within_the_default_bound():
    _, report = onnxcomp.optimize(DIGITS, "int8,int4", data=EVAL)
    assert report.guard is not None and report.guard["passed"]
    assert report.guard["accuracy_drop_pt"] <= 1


def test_explicit_bounds_are_applied_and_can_be_turned_off():
    # int4 moves logits a little (cosine ~0.995): a demanding cosine bound refuses it ...
    with pytest.raises(LossBoundError, match=r"--min-cosine 0\.9999"):
        onnxcomp.optimize(DIGITS, "int4", data=EVAL, bound=LossBound(min_cosine=0.9999))
    # ... and with both bounds off even the collapse passes.
    _, report = onnxcomp.optimize(
        DIGITS, "ternary", data=EVAL, bound=LossBound(max_drop=None, min_cosine=-1)
    )
    assert report.guard is not None and report.guard["passed"]


def test_check_final_names_the_span_of_passes():
    with pytest.raises(LossBoundError, match=r"across passes 'fold-bn' \.\. 'ternary'"):
        onnxcomp.optimize(DIGITS, "fold-bn,ternary", data=EVAL, check="final")


@pytest.mark.parametrize(
    ("bound", "needle"),
    [({"max_drop": -2.0}, "--max-drop"), ({"min_cosine": 1.5}, "--min-cosine")],
)
def test_bounds_out_of_range_are_usage_errors(bound, needle):
    with pytest.raises(UsageError, match=needle):
        LossBound(**bound)


def test_cli_collapse_exits_1_with_one_line_and_allow_loss_writes(capsys, tmp_path: Path):
    output, report = tmp_path / "out.onnx", tmp_path / "report.json"
    args = ["optimize", str(DIGITS), "-p", "fold-bn,ternary", "--data", str(EVAL),
            "-o", str(output), "--report", str(report)]  # fmt: skip
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pass 'ternary'" in err[0] and "Traceback" not in err[0]
    assert list(tmp_path.iterdir()) == []
    assert main([*args, "--allow-loss"]) == 0
    assert "NOT met" in capsys.readouterr().out
    written = json.loads(report.read_text())
    assert output.is_file() and written["guard"]["allowed"] is True
    assert main([*args[:-4], "-o", str(tmp_path / "b.onnx"), "--max-drop", "-1"]) == 0
