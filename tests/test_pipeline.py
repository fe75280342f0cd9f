"""The pipeline: parsing, building passes, the ledger, and failing a bad pass loudly."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import onnxcomp
import onnxcomp.errors
from onnxcomp.errors import PassFailedError, UsageError
from onnxcomp.passes import CompressionPass, CompressionResult, PassOptions, option
from onnxcomp.passes._base import _parse_value
from onnxcomp.pipeline import build_passes, parse_pipeline, run_pipeline
from onnxcomp.report import to_json
from tests.conftest import mlp_model, run_onnx


def test_parse_pipeline_splits_passes_and_options():
    assert parse_pipeline("prune:sparsity=0.8:scope=global,int4:block_size=32,simplify") == [
        ("prune", {"sparsity": "0.8", "scope": "global"}),
        ("int4", {"block_size": "32"}),
        ("simplify", {}),
    ]


@pytest.mark.parametrize("text", ["", "simplify,", ",simplify", "simplify:=3"])
def test_parse_pipeline_rejects_malformed_text(text: str):
    with pytest.raises(UsageError):
        parse_pipeline(text)


@dataclasses.dataclass(frozen=True)
class _DemoOptions(PassOptions):
    ratio: float = option(0.5, "share")
    names: tuple[str, ...] = option((), "patterns")
    mode: str = option("a", "mode")
    flag: bool = option(False, "flag")


def test_option_values_are_typed():
    options = _DemoOptions.from_strings(
        {"ratio": "0.25", "names": "conv1+fc*", "flag": "yes"}, pass_name="demo"
    )
    assert options == _DemoOptions(ratio=0.25, names=("conv1", "fc*"), mode="a", flag=True)
    assert _parse_value(int | None, "none", "x") is None
    with pytest.raises(UsageError, match="expected true or false"):
        _DemoOptions.from_strings({"flag": "maybe"}, pass_name="demo")


def test_build_passes_accepts_names_strings_and_objects():
    from onnxcomp.passes import FoldBatchNormPass, SimplifyOptions, SimplifyPass

    built = build_passes(["simplify:iterations=3", FoldBatchNormPass()])
    assert [label for label, _ in built] == ["simplify", "fold-bn"]
    assert built[0][1].options == SimplifyOptions(iterations=3)
    assert isinstance(built[0][1], SimplifyPass)


def test_pass_options_of_the_wrong_class_are_refused():
    from onnxcomp.passes import FoldBatchNormOptions, SimplifyPass

    with pytest.raises(TypeError, match="SimplifyOptions"):
        SimplifyPass(FoldBatchNormOptions())


class _ScaleWeightsPass(CompressionPass):
    """A deliberately broken 'lossless' pass: doubles every float weight."""

    summary = "test only"
    lossless = True

    def apply(self, model: ir.Model) -> CompressionResult:
        for value in model.graph.initializers.values():
            array = value.const_value.numpy()
            if array.dtype == np.float32:
                value.const_value = ir.tensor(array * 2, name=value.name)
        return CompressionResult(model, True)


class _RaisingPass(CompressionPass):
    summary = "test only"

    def apply(self, model: ir.Model) -> CompressionResult:
        raise ValueError("boom")


class _InvalidModelPass(CompressionPass):
    summary = "test only"

    def apply(self, model: ir.Model) -> CompressionResult:
        node = next(iter(model.graph))
        node.op_type = "NoSuchOp"
        return CompressionResult(model, True)


@pytest.mark.parametrize(
    ("bad_pass", "needle"),
    [
        (_ScaleWeightsPass(), "lossless pass moved output 'y'"),
        (_RaisingPass(), "ValueError: boom"),
        (_InvalidModelPass(), "fails onnx.checker"),
    ],
)
def test_a_failing_pass_writes_nothing(mlp_path: Path, tmp_path: Path, bad_pass, needle: str):
    out = tmp_path / "out.onnx"
    with pytest.raises(PassFailedError, match=needle) as error:
        onnxcomp.optimize(mlp_path, ["simplify", bad_pass], output=out)
    assert error.value.pass_name == type(bad_pass).__name__
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.onnx"]


def test_lossy_pass_is_reported_not_failed(mlp_path: Path):
    class Lossy(_ScaleWeightsPass):
        lossless = False

    _, report = onnxcomp.optimize(mlp_path, [Lossy()])
    (diff,) = report.final_check
    assert not diff.within(report.tolerance)
    assert diff.max_abs > 0.1


def test_ledger_records_each_pass_and_serialises(mlp_path: Path):
    _, report = onnxcomp.optimize(mlp_path, "simplify,fold-bn")
    assert [r.name for r in report.records] == ["simplify", "fold-bn"]
    assert report.records[0].modified and not report.records[1].modified
    assert all(r.check is not None and r.seconds >= 0 for r in report.records)
    assert report.before.nodes == 9 and report.after.nodes < report.before.nodes
    assert report.op_changes()["Identity"] == (1, 0)
    assert json.loads(to_json(report.to_dict()))["pipeline"] == "simplify,fold-bn"


def test_check_final_runs_the_comparison_once(mlp_path: Path):
    _, report = onnxcomp.optimize(mlp_path, "simplify,fold-bn", check="final")
    assert report.records[0].check is None and report.records[1].check is not None


def test_numeric_check_uses_data_when_given(mlp_path: Path, tmp_path: Path):
    data = tmp_path / "data.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((40, 8)).astype(np.float32))
    _, report = onnxcomp.optimize(mlp_path, "simplify", data=data)
    assert "--data data.npz (first 40 samples)" in report.check_inputs
    assert report.accuracy_before is None  # no labels


def test_optimize_leaves_an_in_memory_model_untouched():
    model = ir.serde.deserialize_model(mlp_model())
    nodes_before = [n.op_type for n in model.graph]
    result, _ = onnxcomp.optimize(model, "simplify")
    assert [n.op_type for n in model.graph] == nodes_before
    assert len(list(result.graph)) < len(nodes_before)


def test_pipeline_without_passes_is_a_usage_error():
    model = ir.serde.deserialize_model(mlp_model())
    with pytest.raises(UsageError, match="no passes"):
        run_pipeline(model, [])


def test_random_inputs_cover_dynamic_dims_from_shapes(mlp_path: Path):
    _, report = onnxcomp.optimize(mlp_path, "simplify", shapes={"x": (5, 8)})
    assert report.check_inputs == "random inputs x=5x8"
    with pytest.raises(UsageError, match="unknown inputs"):
        onnxcomp.optimize(mlp_path, "simplify", shapes={"z": (5, 8)})


def test_model_written_by_optimize_loads_in_onnxruntime(mlp_path: Path, tmp_path: Path):
    out = tmp_path / "o.onnx"
    _, report = onnxcomp.optimize(mlp_path, "simplify", output=out)
    onnx.checker.check_model(str(out), full_check=True)
    assert report.file_bytes_after == out.stat().st_size
    assert report.file_bytes_before == mlp_path.stat().st_size


def test_accuracy_is_reported_when_the_data_has_labels(mlp_path: Path, tmp_path: Path):
    x = np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32)
    labels = np.argmax(run_onnx(mlp_path, {"x": x})[0], axis=1)
    labels[:10] = (labels[:10] + 1) % 4  # 10 of 50 wrong
    data = tmp_path / "data.npz"
    np.savez(data, x=x, labels=labels)
    _, report = onnxcomp.optimize(mlp_path, "simplify", data=data)
    assert report.accuracy_before == pytest.approx(0.8)
    assert report.records[0].accuracy == pytest.approx(0.8)


class _PickyError(onnxcomp.errors.UnsupportedModelError):
    """An error whose constructor does not take a message, like UnsupportedOpError."""

    def __init__(self, ops: dict[str, int]) -> None:
        super().__init__(f"no kernel for {', '.join(ops)}")
        self.ops = ops


def test_errors_from_a_pass_keep_their_type_and_gain_the_pass_name(mlp_path: Path):
    """Regression: the pipeline rebuilt errors as type(e)(message), which crashed on error
    classes whose constructor takes something else (the user saw 'internal error')."""

    class Picky(CompressionPass):
        summary = "test only"

        def apply(self, model: ir.Model) -> CompressionResult:
            raise _PickyError({"Resize": 2})

    with pytest.raises(_PickyError, match=r"^pass 'Picky': no kernel for Resize$") as error:
        onnxcomp.optimize(mlp_path, [Picky()])
    assert error.value.ops == {"Resize": 2}


def test_lossless_pass_after_a_lossy_one_is_held_to_the_outputs_before_it(mlp_path: Path):
    """Regression: lossless passes were compared with the input model, so any lossless pass
    after a lossy one (e.g. int8-static,strip) failed; they are compared with the model as it
    was before them, and still caught when they do move the outputs."""

    class Lossy(_ScaleWeightsPass):
        lossless = False

    _, report = onnxcomp.optimize(mlp_path, [Lossy(), "simplify"], check="final")
    assert report.final_check[0].max_abs > 0.1  # the lossy pass's error, reported
    with pytest.raises(PassFailedError, match="lossless pass moved output 'y'"):
        onnxcomp.optimize(mlp_path, [Lossy(), _ScaleWeightsPass()], check="final")


def test_a_pass_missing_its_data_fails_before_any_pass_runs(mlp_path: Path):
    """A long pipeline must not run for minutes and then fail at a step lacking --data."""
    ran = []

    class Recorder(CompressionPass):
        summary = "test only"

        def apply(self, model: ir.Model) -> CompressionResult:
            ran.append(True)
            return CompressionResult(model, False)

    with pytest.raises(UsageError, match=r"^pass 'int8-static': .*--data"):
        onnxcomp.optimize(mlp_path, [Recorder(), "int8-static"])
    assert ran == []


def test_model_with_external_data_is_checked_from_any_working_directory(tmp_path, monkeypatch):
    """Regression: the checker resolved external data against the working directory, so every
    model with external data failed after the first pass unless run from its own folder (seen
    with dynamo exports, which write external data by default)."""
    folder, elsewhere = tmp_path / "model", tmp_path / "elsewhere"
    folder.mkdir()
    elsewhere.mkdir()
    onnx.save(mlp_model(), folder / "m.onnx", save_as_external_data=True,
              location="m.onnx.data", size_threshold=0)  # fmt: skip
    monkeypatch.chdir(elsewhere)
    _, report = onnxcomp.optimize(folder / "m.onnx", "simplify", output=folder / "out.onnx")
    assert report.records[0].modified and (folder / "out.onnx").is_file()
    onnx.checker.check_model(str(folder / "out.onnx"), full_check=True)
