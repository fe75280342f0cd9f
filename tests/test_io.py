"""Model files: atomic writes, external data kept or chosen, never overwriting what we read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxcomp
from onnxcomp import io
from onnxcomp.errors import UsageError
from tests.conftest import conv_bn_residual_model, run_onnx


def _save_external(model: onnx.ModelProto, path: Path, location: str) -> None:
    onnx.save(model, path, save_as_external_data=True, location=location, size_threshold=0)


def test_external_data_input_gives_external_data_output(tmp_path: Path):
    source = tmp_path / "in.onnx"
    _save_external(conv_bn_residual_model(), source, "in.weights")
    out = tmp_path / "out.onnx"
    written = io.save(io.load(source), out)
    assert (tmp_path / "out.onnx.data").is_file()
    assert written == out.stat().st_size + (tmp_path / "out.onnx.data").stat().st_size
    x = np.ones((2, 1, 4, 4), np.float32)
    np.testing.assert_array_equal(run_onnx(out, {"x": x})[0], run_onnx(source, {"x": x})[0])


def test_refuses_to_write_over_the_data_file_it_reads(tmp_path: Path):
    source = tmp_path / "in.onnx"
    _save_external(conv_bn_residual_model(), source, "out.onnx.data")
    data_before = (tmp_path / "out.onnx.data").read_bytes()
    with pytest.raises(UsageError, match="refusing to overwrite"):
        onnxcomp.optimize(source, "fold-bn", output=tmp_path / "out.onnx")
    assert (tmp_path / "out.onnx.data").read_bytes() == data_before
    assert not (tmp_path / "out.onnx").exists()


def test_big_weights_go_to_external_data(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD_BYTES", 100)
    model = io.load(_saved(tmp_path))
    io.save(model, tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").is_file()
    onnx.checker.check_model(str(tmp_path / "big.onnx"))


def test_inline_save_of_external_model_is_self_contained(tmp_path: Path):
    source = tmp_path / "in.onnx"
    _save_external(conv_bn_residual_model(), source, "in.weights")
    (tmp_path / "sub").mkdir()
    io.save(io.load(source), tmp_path / "sub" / "inline.onnx", external_data=False)
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["inline.onnx"]
    x = np.ones((1, 1, 4, 4), np.float32)
    np.testing.assert_array_equal(
        run_onnx(tmp_path / "sub" / "inline.onnx", {"x": x})[0], run_onnx(source, {"x": x})[0]
    )


def test_failed_write_leaves_no_partial_file(tmp_path: Path, monkeypatch):
    model = io.load(_saved(tmp_path))

    def broken_save(*args, **kwargs):
        Path(args[1]).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io.ir, "save", broken_save)
    with pytest.raises(UsageError, match="No space left"):
        io.save(model, tmp_path / "out.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_existing_output_is_replaced_whole(tmp_path: Path):
    model = io.load(_saved(tmp_path))
    out = tmp_path / "out.onnx"
    out.write_bytes(b"old")
    io.save(model, out)
    onnx.checker.check_model(str(out))


def test_write_text_is_atomic_and_readable(tmp_path: Path):
    path = tmp_path / "r.json"
    io.write_text(path, "{}\n")
    assert path.read_text() == "{}\n"
    assert path.stat().st_mode & 0o044  # not left private like mkstemp's files
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def _saved(tmp_path: Path) -> Path:
    path = tmp_path / "m.onnx"
    onnx.save(conv_bn_residual_model(), path)
    return path


def test_external_data_in_a_subfolder_passes_the_check_from_any_folder(tmp_path: Path):
    """Regression: onnx.checker looked for small external tensors relative to the working
    directory, so every pass on a model with external data failed its check."""
    (tmp_path / "weights").mkdir()
    source = tmp_path / "m.onnx"
    _save_external(conv_bn_residual_model(), source, "weights/m.bin")
    out = tmp_path / "out.onnx"
    _, report = onnxcomp.optimize(source, "strip", output=out)
    assert report.records[0].check is not None
    assert (tmp_path / "out.onnx.data").is_file()
    x = np.ones((2, 1, 4, 4), np.float32)
    np.testing.assert_array_equal(run_onnx(out, {"x": x})[0], run_onnx(source, {"x": x})[0])
