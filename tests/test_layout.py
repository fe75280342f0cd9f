"""Old exporters' layouts: initializers listed as graph inputs (IR 3), -1 input dims, opset 6.

The zoo-layout tests use the two smallest light model-zoo architectures (SqueezeNet 4.9 MB,
ShuffleNet 5.7 MB) rebuilt as the zoo publishes them (tests/matrix_cases.zoo_layout);
benchmarks/zoo.py gives the figures for all nine.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnxcomp
from onnxcomp.cli import main
from onnxcomp.layout import normalize_layout
from tests import matrix_cases as mc
from tests.conftest import LOSS_ALLOWED, conv_bn_residual_model, run_onnx


@pytest.fixture(scope="module")
def squeezenet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("zoo") / "squeezenet.onnx"
    onnx.save(mc.zoo_layout("squeezenet"), path)
    return path


def _image(seed: int = 0) -> dict[str, np.ndarray]:
    x = np.random.default_rng(seed).standard_normal((1, 3, 224, 224)).astype(np.float32)
    return {"data_0": x}


def _legacy_conv_bn(path: Path, ir_version: int = 3) -> Path:
    """The conv-BN test model with every initializer also a graph input (IR version 3, or as
    torch.onnx.export(keep_initializers_as_inputs=True) writes it at a later IR version)."""
    model = conv_bn_residual_model(opset=9)
    model.graph.input.extend(
        helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
        for t in model.graph.initializer
    )
    model.ir_version = ir_version
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def test_zoo_layout_is_what_the_zoo_publishes(squeezenet: Path):
    model = onnx.load(squeezenet)
    initializers = {t.name for t in model.graph.initializer}
    assert model.ir_version == 3 and model.opset_import[0].version == 9
    assert len(initializers) == 52
    assert initializers <= {i.name for i in model.graph.input}
    assert "ConstantOfShape" not in {n.op_type for n in model.graph.node}


def test_int8_quantizes_initializer_inputs_of_a_zoo_model(squeezenet: Path, tmp_path: Path):
    out = tmp_path / "int8.onnx"
    _, report = onnxcomp.optimize(squeezenet, "int8", output=out, bound=LOSS_ALLOWED)
    assert report.records[0].stats["weights_quantized"] == 26
    assert out.stat().st_size <= 0.27 * squeezenet.stat().st_size  # measured 0.259x
    written = onnx.load(out)
    assert [i.name for i in written.graph.input] == ["data_0"]
    assert written.ir_version >= 4
    assert any("52 initializers were also listed as graph inputs" in n for n in report.notes)
    expected, got = run_onnx(squeezenet, _image())[0], run_onnx(out, _image())[0]
    assert got.shape == expected.shape == (1, 1000, 1, 1)
    cosine = np.dot(got.ravel(), expected.ravel()) / (
        np.linalg.norm(got) * np.linalg.norm(expected)
    )
    assert cosine > 0.98  # measured 0.993


def test_prune_channels_shrinks_a_zoo_model(squeezenet: Path, tmp_path: Path):
    out = tmp_path / "pruned.onnx"
    _, report = onnxcomp.optimize(
        squeezenet, "prune-channels:ratio=0.25", output=out, bound=LOSS_ALLOWED
    )
    assert report.records[0].stats["groups_pruned"] > 0
    assert out.stat().st_size < 0.8 * squeezenet.stat().st_size  # measured 0.64x
    assert run_onnx(out, _image())[0].shape == (1, 1000, 1, 1)


def test_simplify_folds_every_batchnorm_of_a_zoo_model(tmp_path: Path):
    source = tmp_path / "shufflenet.onnx"
    onnx.save(mc.zoo_layout("shufflenet"), source)
    out = tmp_path / "simple.onnx"
    _, report = onnxcomp.optimize(source, "simplify", output=out)
    assert report.records[0].stats["batchnorms_fused"] == 49
    written = onnx.load(out)
    assert "BatchNormalization" not in {n.op_type for n in written.graph.node}
    feeds = {"gpu_0/data_0": _image()["data_0"]}
    np.testing.assert_allclose(run_onnx(out, feeds)[0], run_onnx(source, feeds)[0],
                               rtol=1e-3, atol=1e-5)  # fmt: skip


def test_keep_initializer_inputs_leaves_them_overridable(tmp_path: Path):
    # ONNX Runtime lets a caller override an initializer input from IR version 4 on.
    source = _legacy_conv_bn(tmp_path / "legacy.onnx", ir_version=7)
    out = tmp_path / "kept.onnx"
    _, report = onnxcomp.optimize(source, "int8", output=out, keep_initializer_inputs=True)
    written = onnx.load(out)
    assert {i.name for i in written.graph.input} == {i.name for i in onnx.load(source).graph.input}
    assert report.records[0].stats["weights_quantized"] == 0
    assert any("also a graph input" in note for note in report.records[0].notes)
    assert any("stay so (keep_initializer_inputs)" in note for note in report.notes)
    # Still overridable: feeding the weight changes the output.
    x = np.ones((2, 1, 4, 4), np.float32)
    w2 = np.zeros((4, 4, 3, 3), np.float32)
    assert not np.allclose(run_onnx(out, {"x": x})[0], run_onnx(out, {"x": x, "w2": w2})[0])


def test_initializer_inputs_become_weights_by_default(tmp_path: Path):
    source = _legacy_conv_bn(tmp_path / "legacy.onnx")
    out = tmp_path / "folded.onnx"
    _, report = onnxcomp.optimize(source, "fold-bn", output=out)
    written = onnx.load(out)
    assert [i.name for i in written.graph.input] == ["x"]
    assert written.ir_version == 4
    assert report.records[0].stats["batchnorms_folded"] == 4
    x = np.random.default_rng(0).standard_normal((3, 1, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(run_onnx(out, {"x": x})[0], run_onnx(source, {"x": x})[0],
                               rtol=1e-4, atol=1e-5)  # fmt: skip


def test_cli_keep_initializer_inputs_flag(tmp_path: Path, capsys):
    source = _legacy_conv_bn(tmp_path / "legacy.onnx")
    out = tmp_path / "o.onnx"
    args = ["optimize", str(source), "-p", "fold-bn", "-o", str(out)]
    assert main([*args, "--keep-initializer-inputs"]) == 0
    assert "note (layout):" in capsys.readouterr().out
    assert len(onnx.load(out).graph.input) == len(onnx.load(source).graph.input)
    assert main(args) == 0
    assert len(onnx.load(out).graph.input) == 1


def _paddle_style(path: Path) -> Path:
    """A Paddle2ONNX-style classifier: input dims written as dim_value -1."""
    model = conv_bn_residual_model()
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[0].Clear()
    dims[0].dim_value = -1
    del model.graph.value_info[:]  # no inferred shapes carrying the batch dim by name
    onnx.save(model, path)
    return path


def test_minus_one_input_dims_are_dynamic(tmp_path: Path, capsys):
    """Regression: random check inputs crashed with 'negative dimensions are not allowed'."""
    source = _paddle_style(tmp_path / "paddle.onnx")
    out = tmp_path / "o.onnx"
    assert main(["optimize", str(source), "-p", "simplify", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "x=2x1x4x4" in printed and "dims of -1 on graph inputs x" in printed
    dim = onnx.load(out).graph.input[0].type.tensor_type.shape.dim[0]
    assert not dim.HasField("dim_value")


def test_opset_6_models_are_upgraded_for_onnx_runtime(tmp_path: Path):
    """ONNX Runtime has no opset-6 kernels (Conv, Gemm, BatchNormalization): the backend test
    models PyTorch exported at opset 6 are upgraded to 7, with a note."""
    source = mc.BACKEND_DIR / "pytorch-converted" / "test_Linear" / "model.onnx"
    out = tmp_path / "linear.onnx"
    _, report = onnxcomp.optimize(source, "int8", output=out, bound=LOSS_ALLOWED)
    assert any("from opset 6 to 7" in note for note in report.notes)
    inputs = [i.name for i in onnx.load(out).graph.input]
    x = np.random.default_rng(0).standard_normal((4, 10)).astype(np.float32)
    assert run_onnx(out, {inputs[0]: x})[0].shape == (4, 8)


def test_normalize_layout_changes_nothing_in_a_current_model():
    import onnx_ir as ir

    model = ir.serde.deserialize_model(conv_bn_residual_model())
    assert normalize_layout(model) == []
    assert [v.name for v in model.graph.inputs] == ["x"]


def test_scalar_graph_inputs_get_scalar_check_inputs(tmp_path: Path):
    """Regression: the default check stopped with 'len() of unsized object' when the first
    input was 0-d (onnx's test_clip, test_if, test_range_* ...)."""
    nodes = [helper.make_node("Clip", ["x", "lo", "hi"], ["y"])]
    inputs = [helper.make_tensor_value_info("lo", TensorProto.FLOAT, []),
              helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5]),
              helper.make_tensor_value_info("hi", TensorProto.FLOAT, [])]  # fmt: skip
    graph = helper.make_graph(
        nodes, "clip", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])]
    )
    path = tmp_path / "clip.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    _, report = onnxcomp.optimize(path, "simplify", output=tmp_path / "o.onnx")
    assert "lo=scalar" in report.check_inputs and "x=2x5" in report.check_inputs
    assert report.final_check[0].max_abs == 0


def test_fold_bn_says_why_it_leaves_overridable_batchnorms(tmp_path: Path):
    source = _legacy_conv_bn(tmp_path / "legacy.onnx", ir_version=7)
    _, report = onnxcomp.optimize(source, "fold-bn", keep_initializer_inputs=True)
    assert report.records[0].stats["batchnorms_folded"] == 0
    assert all("graph inputs, which a caller may override" in n for n in report.records[0].notes)


def test_a_model_onnx_runtime_cannot_run_is_one_line_on_stderr(tmp_path: Path, capfd):
    """onnx's converter cannot give opset-6 PRelu's channel broadcast an opset-7 form; ONNX
    Runtime's own ERROR log of the failing kernel used to precede onnxcomp's one line."""
    source = mc.BACKEND_DIR / "pytorch-converted" / "test_PReLU_2d_multiparam" / "model.onnx"
    assert main(["optimize", str(source), "-p", "int8", "-o", str(tmp_path / "o.onnx")]) == 1
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and err.startswith("onnxcomp: error: cannot run the input model")
