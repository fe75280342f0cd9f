"""The command line: the main job end to end, and every kind of bad input.

Bad input must give one line on stderr, exit code 2 (usage) or 1 (model), no traceback, leave
the input byte-identical and leave no output (or temporary) file behind.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxcomp.cli import main
from tests.conftest import conv_bn_residual_model, run_onnx


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""


def _run_bad(capsys, tmp_path: Path, args: list[str], code: int, needle: str) -> None:
    """Run the CLI, expect one error line containing ``needle`` and no files left behind."""
    before = {p: _digest(p) for p in tmp_path.rglob("*")}
    assert main(args) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("onnxcomp: error:")
    assert needle in err[0], err[0]
    assert "Traceback" not in err[0]
    after = {p: _digest(p) for p in tmp_path.rglob("*")}
    assert after == before, "input changed or an output/temporary file was left"


def _opt(model: Path | str, out: Path | str, passes: str = "simplify", *extra: str) -> list[str]:
    return ["optimize", str(model), "-p", passes, "-o", str(out), *extra]


def test_optimize_writes_checked_model_and_report(capsys, cnn_path: Path, tmp_path: Path):
    out, report = tmp_path / "small.onnx", tmp_path / "report.json"
    digest = _digest(cnn_path)
    args = [
        "optimize",
        str(cnn_path),
        "--passes",
        "simplify,fold-bn",
        "-o",
        str(out),
        "--report",
        str(report),
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "BatchNormalization" in printed and "numeric check" in printed
    assert _digest(cnn_path) == digest
    onnx.checker.check_model(str(out), full_check=True)
    assert not any(n.op_type == "BatchNormalization" for n in onnx.load(out).graph.node)
    x = np.random.default_rng(1).standard_normal((5, 1, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(
        run_onnx(out, {"x": x})[0], run_onnx(cnn_path, {"x": x})[0], rtol=1e-4, atol=1e-5
    )
    ledger = json.loads(report.read_text())
    assert [r["name"] for r in ledger["records"]] == ["simplify", "fold-bn"]
    assert ledger["records"][-1]["check"][0]["cosine"] > 0.99999
    assert ledger["before"]["op_counts"]["BatchNormalization"] == 4


def test_missing_file(capsys, tmp_path: Path):
    args = _opt(tmp_path / "nope.onnx", tmp_path / "o.onnx")
    _run_bad(capsys, tmp_path, args, 1, "no such file")


def test_directory_as_model(capsys, tmp_path: Path):
    (tmp_path / "d").mkdir()
    _run_bad(capsys, tmp_path, _opt(tmp_path / "d", tmp_path / "o.onnx"), 1, "is a directory")


def test_truncated_model(capsys, tmp_path: Path):
    data = conv_bn_residual_model().SerializeToString()
    path = tmp_path / "truncated.onnx"
    path.write_bytes(data[: len(data) // 2])
    _run_bad(capsys, tmp_path, _opt(path, tmp_path / "o.onnx"), 1, "not an ONNX model")


@pytest.mark.parametrize("command", ["inspect", "optimize"])
def test_tensor_data_that_does_not_match_its_shape(capsys, tmp_path: Path, command: str):
    """Found by fuzzing: one flipped byte in a dims field left 64 floats declared as [1, 4];
    onnx.checker accepts that and inspect crashed reading the tensor."""
    model = conv_bn_residual_model()
    model.graph.initializer[0].dims[0] += 1
    path = tmp_path / "mismatch.onnx"
    path.write_bytes(model.SerializeToString())
    args = ["inspect", str(path)] if command == "inspect" else _opt(path, tmp_path / "o.onnx")
    name = model.graph.initializer[0].name
    _run_bad(capsys, tmp_path, args, 1, f"tensor '{name}' holds")


def test_random_bytes(capsys, tmp_path: Path):
    path = tmp_path / "random.onnx"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    _run_bad(capsys, tmp_path, ["inspect", str(path)], 1, "not an ONNX model")


def test_protobuf_that_is_not_a_model(capsys, tmp_path: Path):
    path = tmp_path / "value_info.onnx"
    path.write_bytes(helper.make_tensor_value_info("x", TensorProto.FLOAT, [1]).SerializeToString())
    _run_bad(capsys, tmp_path, _opt(path, tmp_path / "o.onnx"), 1, "no graph")


@pytest.mark.parametrize(
    ("passes", "needle"),
    [
        ("simplify,shrinkify", "unknown pass 'shrinkify' (available: simplify, fold-bn"),
        ("simplify:speed=11", "unknown option 'speed' for pass 'simplify' (valid: iterations"),
        ("simplify:iterations=many", "bad value 'many' for simplify:iterations"),
        ("simplify:iterations=0", "iterations must be >= 1"),
        ("simplify:iterations", "expected key=value"),
    ],
)
def test_bad_pipeline(capsys, cnn_path: Path, passes: str, needle: str):
    _run_bad(capsys, cnn_path.parent, _opt(cnn_path, cnn_path.parent / "o.onnx", passes), 2, needle)


def test_output_equal_to_input(capsys, cnn_path: Path):
    args = _opt(cnn_path, cnn_path)
    _run_bad(capsys, cnn_path.parent, args, 2, "would overwrite the input model")


def test_output_directory_missing(capsys, cnn_path: Path):
    out = cnn_path.parent / "no" / "such" / "dir" / "o.onnx"
    _run_bad(capsys, cnn_path.parent, _opt(cnn_path, out), 2, "does not exist")


def test_output_directory_not_writable(capsys, cnn_path: Path):
    # /proc refuses new files even for root, unlike a chmod-ed temp dir.
    args = _opt(cnn_path, "/proc/onnxcomp-test.onnx")
    _run_bad(capsys, cnn_path.parent, args, 2, "cannot write")
    assert not Path("/proc/onnxcomp-test.onnx").exists()


def test_opset_a_pass_cannot_handle(capsys, tmp_path: Path):
    # BatchNormalization-8 with spatial=0 (per-element statistics) has no opset-9 form, so
    # fold-bn cannot upgrade the model to fold it.
    model = conv_bn_residual_model(opset=8)
    for node in model.graph.node:
        if node.op_type == "BatchNormalization":
            node.attribute.append(onnx.helper.make_attribute("spatial", 0))
    path = tmp_path / "old.onnx"
    onnx.save(model, path)
    args = _opt(path, tmp_path / "o.onnx", "fold-bn")
    _run_bad(capsys, tmp_path, args, 1, "cannot upgrade the model from opset 8 to 9")


def test_data_that_does_not_match_the_model(capsys, cnn_path: Path):
    data = cnn_path.parent / "data.npz"
    np.savez(data, image=np.zeros((4, 1, 4, 4), np.float32))
    args = _opt(cnn_path, cnn_path.parent / "o.onnx", "simplify", "--data", str(data))
    _run_bad(capsys, cnn_path.parent, args, 1, "missing x; unexpected image")


def test_passes_lists_every_pass_with_options(capsys):
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert "simplify" in out and "fold-bn" in out
    assert "iterations" in out and "int" in out
    # list options show their item type and a default in pipeline syntax (a+b), not a repr
    assert "list[str]" in out and "Conv+Gemm+MatMul" in out


def test_inspect_reports_params_and_ops(capsys, cnn_path: Path):
    assert main(["inspect", str(cnn_path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["op_counts"]["BatchNormalization"] == 4
    model = onnx.load(cnn_path)
    expected = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    assert summary["params"] == expected
    assert summary["inputs"] == [["x", "float", "[N, 1, 4, 4]"]]


def test_console_script_and_module_entry_point(cnn_path: Path, tmp_path: Path):
    out = tmp_path / "o.onnx"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "onnxcomp",
            "optimize",
            str(cnn_path),
            "-p",
            "fold-bn",
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert out.is_file()
    done = subprocess.run(
        [sys.executable, "-m", "onnxcomp", "inspect", str(tmp_path / "missing.onnx")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0 and "no such file" in done.stderr


def test_torchrun_worker_ranks_write_and_print_nothing(capsys, monkeypatch, cnn_path: Path):
    out = cnn_path.parent / "o.onnx"
    monkeypatch.setenv("RANK", "1")
    assert main(_opt(cnn_path, out, "fold-bn")) == 0
    assert not out.exists() and capsys.readouterr().out == ""
    monkeypatch.setenv("RANK", "0")
    assert main(_opt(cnn_path, out, "fold-bn")) == 0
    assert out.is_file()


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--report", "{dir}/in.weights"], "--report"),  # the input's external data
        (["--report", "{dir}/o.onnx"], "would overwrite the file -o writes"),
        (["--report", "{dir}/o.onnx.data"], "would overwrite the file -o writes"),
        (["--data", "{dir}/d.npz", "--report", "{dir}/d.npz"], "would overwrite --data"),
    ],
)
def test_outputs_never_land_on_inputs_or_on_each_other(capsys, tmp_path: Path, extra, needle):
    """Regression: only -o was compared with the input model; --report could replace the
    input's external data, the --data file or the model just written."""
    onnx.save(conv_bn_residual_model(), tmp_path / "in.onnx", save_as_external_data=True,
              location="in.weights", size_threshold=0)  # fmt: skip
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 1, 4, 4), np.float32))
    args = _opt(tmp_path / "in.onnx", tmp_path / "o.onnx", "fold-bn",
                *(e.format(dir=tmp_path) for e in extra))  # fmt: skip
    _run_bad(capsys, tmp_path, args, 2, needle)


def test_model_output_onto_the_data_file_is_refused(capsys, cnn_path: Path):
    data = cnn_path.parent / "d.npz"
    np.savez(data, x=np.zeros((4, 1, 4, 4), np.float32))
    args = _opt(cnn_path, data, "fold-bn", "--data", str(data))
    _run_bad(capsys, cnn_path.parent, args, 2, "-o")


def test_bench_json_onto_the_data_file_is_refused(capsys, cnn_path: Path):
    data = cnn_path.parent / "d.npz"
    np.savez(data, x=np.zeros((4, 1, 4, 4), np.float32))
    args = ["bench", str(cnn_path), "--data", str(data), "--json", str(data)]
    _run_bad(capsys, cnn_path.parent, args, 2, "would overwrite --data")


def test_report_into_a_missing_directory_fails_before_anything_is_written(capsys, cnn_path):
    args = _opt(cnn_path, cnn_path.parent / "o.onnx", "fold-bn",
                "--report", str(cnn_path.parent / "no" / "r.json"))  # fmt: skip
    _run_bad(capsys, cnn_path.parent, args, 2, "does not exist")


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--check-samples", "0"], "check_samples must be >= 1"),
        (["--atol", "-1"], "tolerances must be >= 0"),
        (["--rtol", "nan"], "tolerances must be >= 0"),
    ],
)
def test_numeric_check_settings_are_validated(capsys, cnn_path: Path, extra, needle):
    args = _opt(cnn_path, cnn_path.parent / "o.onnx", "fold-bn", *extra)
    _run_bad(capsys, cnn_path.parent, args, 2, needle)


def test_inspect_table_shows_shapes(capsys, cnn_path: Path):
    """Regression: rich read "[N, 1, 4, 4]" as markup and printed an empty shape column."""
    assert main(["inspect", str(cnn_path)]) == 0
    assert "[N, 1, 4, 4]" in capsys.readouterr().out
