"""Big models in bounded memory (issue 10, item 4), at CI size.

A ~70 MB model with external data stands in for a > 2 GB one: ``stream_above`` (the weight
bytes past which the pipeline streams) is set below its size, and the chunk size of the
quantisation math below its tensors' size, so these tests exercise what a 3 GB model goes
through (benchmarks/bigmodel.py measures that one). Memory is measured with tracemalloc
(numpy's allocations are traced): the peak held while a pass runs must stay within a few of
the model's eight 8 MB tensors, where holding the model's new weights, scores or float64
copies of several tensors goes well past it.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxcomp
from onnxcomp import instrument, io, pipeline
from onnxcomp.cli import main
from onnxcomp.errors import OnnxcompError, PassFailedError, UsageError
from onnxcomp.io import SCRATCH_KEY, SCRATCH_PREFIX, ScratchData
from onnxcomp.masks import nm
from onnxcomp.passes import _weights
from onnxcomp.passes._base import CompressionPass, CompressionResult
from onnxcomp.pipeline import run_pipeline
from onnxcomp.quant import linear
from tests.conftest import LOSS_ALLOWED, REPO

HIDDEN, FFN, VOCAB, LAYERS = 1024, 2048, 2048, 3
TENSOR_BYTES = HIDDEN * FFN * 4  # 8 MB: each MatMul weight, and the embedding table
STREAM_ABOVE = 10_000_000  # the model has ~70 MB of weights: it streams


def _big_model(folder: Path, seed: int = 0) -> Path:
    """ids -> Gather -> LAYERS x (MatMul, Relu, MatMul, Add) -> Gemm -> Conv -> mean, with
    every weight in ``m.onnx.data``."""
    rng = np.random.default_rng(seed)
    inits: list[TensorProto] = []

    def weight(name: str, shape: tuple[int, ...], fan_in: int) -> str:
        array = (rng.standard_normal(shape, dtype=np.float32) / np.sqrt(fan_in)).astype(np.float32)
        inits.append(numpy_helper.from_array(array, name))
        return name

    nodes = [helper.make_node("Gather", [weight("embed", (VOCAB, HIDDEN), 1), "ids"], ["h0"],
                              name="embed")]  # fmt: skip
    x = "h0"
    for i in range(LAYERS):
        nodes += [
            helper.make_node("MatMul", [x, weight(f"up{i}", (HIDDEN, FFN), HIDDEN)], [f"a{i}"],
                             name=f"up{i}"),
            helper.make_node("Relu", [f"a{i}"], [f"r{i}"]),
            helper.make_node("MatMul", [f"r{i}", weight(f"down{i}", (FFN, HIDDEN), FFN)],
                             [f"b{i}"], name=f"down{i}"),
            helper.make_node("Add", [x, f"b{i}"], [f"h{i + 1}"]),
        ]
        x = f"h{i + 1}"
    inits.append(numpy_helper.from_array(np.array([0, 3], np.int64), "axes03"))
    inits.append(numpy_helper.from_array(np.array([2, 3], np.int64), "axes"))
    nodes += [
        helper.make_node("Gemm", [x, weight("proj", (HIDDEN, HIDDEN), HIDDEN)], ["p"],
                         name="proj", transB=1),
        helper.make_node("Unsqueeze", ["p", "axes03"], ["p4"]),  # [1, S, H, 1]
        helper.make_node("Transpose", ["p4"], ["nchw"], perm=[0, 2, 1, 3]),  # [1, H, S, 1]
        helper.make_node("Conv", ["nchw", weight("conv", (256, HIDDEN, 3, 1), 3 * HIDDEN)],
                         ["c"], name="conv", pads=[1, 0, 1, 0]),
        helper.make_node("ReduceMean", ["c", "axes"], ["out"], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes, "big", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["seq"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 256])], inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    path = folder / "m.onnx"
    onnx.save_model(model, path, save_as_external_data=True, location="m.onnx.data",
                    size_threshold=1024)  # fmt: skip
    return path


@pytest.fixture(scope="module")
def big_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _big_model(tmp_path_factory.mktemp("big"))


def _ids(seed: int = 1) -> dict[str, np.ndarray]:
    return {"ids": np.random.default_rng(seed).integers(0, VOCAB, size=6).astype(np.int64)}


def _run(path: Path) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, _ids())[0]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1).astype(np.float64), b.reshape(-1).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("passes", ["int8", "int4", "ternary", "fp16", "prune", "prune-nm"])
def test_weight_pass_holds_a_few_tensors_not_the_model(
    big_path: Path, tmp_path: Path, passes: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The float64 chunks of the quantisation math scale with CHUNK_ELEMENTS, not the weight:
    # at this model's size its default would be as big as a tensor, so it is made smaller.
    monkeypatch.setattr(linear, "CHUNK_ELEMENTS", 1 << 16)
    monkeypatch.setattr(nm, "CHUNK_ELEMENTS", 1 << 16)  # N:M ranking, the same way
    # Likewise the size below which new tensors stay in memory (ternary codes here: 0.5 MB).
    monkeypatch.setattr(_weights, "SCRATCH_MIN_BYTES", 1 << 16)
    gc.collect()
    tracemalloc.start()
    try:
        model, report = onnxcomp.optimize(
            big_path, passes, output=tmp_path / "out.onnx", check="none",
            bound=LOSS_ALLOWED, stream_above=STREAM_ABOVE,
        )  # fmt: skip
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report.records[0].modified
    # New weights went to the scratch file (ternary: after the opset upgrade rebuilt the graph).
    assert model.graph.meta[SCRATCH_KEY].bytes > 0
    # One weight being made and the one before it being written to scratch (at most one
    # tensor: prune-nm's peak, 2.6 tensors). Holding every new weight (fp16: 4 tensors' worth,
    # int8: 2), every score (prune: 8) or float64 copies of a tensor (8 bytes per element: 2
    # tensors, on top) breaks this.
    assert peak < 3 * TENSOR_BYTES, f"{passes}: {peak / 1e6:.0f} MB held at the peak"
    # What was written from the scratch file (packed INT4/INT2 codes too) is a whole model.
    onnx.checker.check_model(str(tmp_path / "out.onnx"))
    assert np.isfinite(_run(tmp_path / "out.onnx")).all()


@pytest.mark.parametrize("passes", ["int8", "fp16"])
def test_streamed_result_passes_the_checker_and_runs(
    big_path: Path, tmp_path: Path, passes: str
) -> None:
    out = tmp_path / "out.onnx"
    model, report = onnxcomp.optimize(
        big_path, passes, output=out, bound=LOSS_ALLOWED, stream_above=STREAM_ABOVE
    )
    # The new weights were kept in a scratch folder beside the output, and went into its data.
    scratch_dir = model.graph.meta[SCRATCH_KEY].dir
    assert scratch_dir.parent == tmp_path and model.graph.meta[SCRATCH_KEY].bytes > 0
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "out.onnx", "out.onnx.data"
    ]
    onnx.checker.check_model(str(out), full_check=True)  # the path form: safe past 2 GB
    # Checked on sampled layers, each run alone; the whole model was never run by the check.
    assert "sampled layers" in report.check_inputs
    names = [d.name for d in report.final_check]
    assert names == ["embed (Gather)", "down1 (MatMul)", "proj (Gemm)", "conv (Conv)"]
    assert min(d.cosine for d in report.final_check) > 0.999
    # The written file against the input, whole, in ONNX Runtime.
    assert _cosine(_run(big_path), _run(out)) > 0.995
    del model
    gc.collect()
    assert not scratch_dir.exists()  # removed with the model


def test_sampled_check_matches_each_layer_run_in_onnx_runtime(big_path: Path) -> None:
    model = onnxcomp.load(big_path)
    sample = instrument.LayerSample(model)
    # Each layer alone, in numpy, on the sample's own inputs.
    weights = {v.name: v.const_value.numpy() for v in model.graph.initializers.values()}
    expected = {}
    for (_, feeds), name in zip(sample.layers, sample.names, strict=True):
        (x,) = feeds.values()
        if name.startswith("embed"):
            expected[name] = weights["embed"][x]
        elif name.startswith("down1"):
            expected[name] = x @ weights["down1"]
        elif name.startswith("proj"):
            expected[name] = x @ weights["proj"].T
    assert len(expected) == 3
    for index, name in enumerate(sample.names):
        if name in expected:
            np.testing.assert_allclose(sample.outputs[0][index], expected[name], rtol=1e-4,
                                       atol=1e-4)  # fmt: skip


def test_sampled_reference_runs_beside_the_first_pass(
    big_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = onnxcomp.load(big_path)
    foreground = instrument.LayerSample(model).outputs
    background = instrument.LayerSample(model, background=True).outputs
    for a, b in zip(foreground[0], background[0], strict=True):
        np.testing.assert_array_equal(a, b)
    # In the pipeline, the input's layers are built and run on the sample's thread (the pass
    # meanwhile on this one), the result's here after the pass. Held back until the pass is
    # done, they still read the input's weights, which the pass has released by then.
    built: list[str] = []
    make = instrument.runtime.session_factory
    pass_done = threading.Event()
    run_one = pipeline._run_one

    def run_and_tell(*args, **kwargs):
        try:
            return run_one(*args, **kwargs)
        finally:
            pass_done.set()

    def recording(*args, **kwargs):
        factory = make(*args, **kwargs)

        def build():
            name = threading.current_thread().name
            if name.startswith("onnxcomp-sample"):
                assert pass_done.wait(60)
            built.append(name)
            return factory()

        return build

    monkeypatch.setattr(instrument.runtime, "session_factory", recording)
    monkeypatch.setattr(pipeline, "_run_one", run_and_tell)
    _, report = onnxcomp.optimize(big_path, "int8", bound=LOSS_ALLOWED, stream_above=STREAM_ABOVE)
    layers = len(report.final_check)
    assert layers >= 3
    on_sample_thread = [name.startswith("onnxcomp-sample") for name in built]
    assert on_sample_thread == [True] * layers + [False] * layers
    assert min(d.cosine for d in report.final_check) > 0.999


def test_a_sampled_reference_that_fails_in_the_background_is_one_line(
    big_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(*args, **kwargs):
        def build():
            raise OnnxcompError("ONNX Runtime cannot load the model: no kernel for this")

        return build

    monkeypatch.setattr(instrument.runtime, "session_factory", failing)
    with pytest.raises(OnnxcompError, match="no kernel for this; --check none skips the check"):
        onnxcomp.optimize(big_path, "int8", bound=LOSS_ALLOWED, stream_above=STREAM_ABOVE)


class _ScaleOneWeight(CompressionPass):
    """A 'lossless' pass that is not: doubles the weight of ``proj``."""

    lossless = True

    def apply(self, model: ir.Model) -> CompressionResult:
        value = model.graph.initializers["proj"]
        value.const_value = ir.tensor(value.const_value.numpy() * 2, name="proj")
        return CompressionResult(model, True)


def test_sampled_check_catches_a_broken_layer(big_path: Path) -> None:
    with pytest.raises(PassFailedError, match="proj"):
        onnxcomp.optimize(big_path, [_ScaleOneWeight()], stream_above=STREAM_ABOVE)


def test_sampled_check_leaves_out_a_layer_the_result_no_longer_has(big_path: Path) -> None:
    model = onnxcomp.load(big_path)
    sample = instrument.LayerSample(model)
    node = next(n for n in model.graph if n.name == "proj")
    node.outputs[0].name = "renamed"
    diffs = sample.compare(sample.run(model))
    assert "proj (Gemm)" in sample.missing
    assert "proj (Gemm)" not in [d.name for d in diffs] and len(diffs) == len(sample.names) - 1


def test_small_models_do_not_stream(mlp_path: Path) -> None:
    model, report = onnxcomp.optimize(mlp_path, "int8")
    assert SCRATCH_KEY not in model.graph.meta
    assert "sampled" not in report.check_inputs


def test_scratch_stores_and_is_removed_when_closed(tmp_path: Path) -> None:
    scratch = ScratchData(tmp_path)
    first = scratch.store(ir.tensor(np.arange(12, dtype=np.float32).reshape(3, 4), name="w"))
    second = scratch.store(ir.tensor(np.arange(5, dtype=np.int8), name="q"))
    np.testing.assert_array_equal(first.numpy(), np.arange(12).reshape(3, 4))
    np.testing.assert_array_equal(second.numpy(), np.arange(5))
    assert first.name == "w" and second.dtype == ir.DataType.INT8
    first.release()
    second.release()
    scratch.close()
    assert not scratch.dir.exists()


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


KILLED_CHILD = """
import sys, time
from pathlib import Path
import onnxcomp
from onnxcomp import io

source, output, marker = sys.argv[1:4]
real_store = io.ScratchData.store

def store(self, tensor):
    stored = real_store(self, tensor)
    Path(marker).touch()
    time.sleep(60)  # killed here, with one new weight in the scratch file
    return stored

io.ScratchData.store = store
onnxcomp.optimize(source, "int8", output=output, stream_above=10_000_000, check="none")
"""


def test_a_killed_streaming_run_leaves_no_output_and_its_scratch_goes_next_time(
    big_path: Path, tmp_path: Path
) -> None:
    out, marker = tmp_path / "out.onnx", tmp_path / "marker"
    before = _digests(big_path.parent)
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_CHILD, str(big_path), str(out), str(marker)],
        env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert child.poll() is None and time.monotonic() < deadline, "no weight was stored"
            time.sleep(0.02)
    finally:
        child.kill()
        child.wait()
    left = [p for p in tmp_path.iterdir() if p.name.startswith(SCRATCH_PREFIX)]
    assert len(left) == 1 and not out.exists()
    assert _digests(big_path.parent) == before  # the input is intact
    onnxcomp.optimize(big_path, "int8", output=out, stream_above=STREAM_ABOVE, check="none")
    assert not left[0].exists() and out.exists()


def test_cli_stream_above(big_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    args = ["optimize", str(big_path), "-p", "int8", "-o", str(out), "--report", str(report)]
    assert main([*args, "--stream-above", "0.01"]) == 0
    assert "sampled layers" in json.loads(report.read_text())["check_inputs"]
    assert main([*args, "--stream-above", "-1"]) == 2
    assert "stream_above must be >= 0" in capsys.readouterr().err


def test_sampled_check_feeds_every_layer_kind(tmp_path: Path) -> None:
    """Grouped and dilated Conv, ConvTranspose, batched MatMul, Gemm with transA, Gather on
    axis 1: each gets inputs of a shape its weight accepts, and runs."""
    rng = np.random.default_rng(0)

    def w(name: str, *shape: int) -> TensorProto:
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    f = TensorProto.FLOAT
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "wc"], ["c"], name="conv", group=2, dilations=[2, 1]),
            helper.make_node("ConvTranspose", ["c", "wt"], ["t"], name="deconv"),
            helper.make_node("MatMul", ["t", "wm"], ["m"], name="batched"),
            helper.make_node("Gemm", ["g_in", "wg"], ["g"], name="gemm", transA=1),
            helper.make_node("Gather", ["wa", "idx"], ["a"], name="table", axis=1),
        ],
        "kinds",
        [helper.make_tensor_value_info("x", f, [1, 4, 9, 9]),
         helper.make_tensor_value_info("g_in", f, [5, 3]),
         helper.make_tensor_value_info("idx", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info(n, f, [None]) for n in ("m", "g", "a")],
        [w("wc", 6, 2, 3, 3), w("wt", 6, 3, 2, 2), w("wm", 3, 10, 7), w("wg", 5, 8),
         w("wa", 4, 11)],
    )  # fmt: skip
    path = tmp_path / "kinds.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), path)
    sample = instrument.LayerSample(onnxcomp.load(path), count=10)
    shapes = dict(zip(sample.names, (o.shape for o in sample.outputs[0]), strict=True))
    assert shapes == {
        "conv (Conv)": (1, 6, 4, 4),  # 8x6 inputs: 3 more than the dilated kernel
        "deconv (ConvTranspose)": (1, 3, 4, 4),
        "batched (MatMul)": (3, 2, 7),
        "gemm (Gemm)": (2, 8),
        "table (Gather)": (4, 2, 3),
    }


def _streamed(big_path: Path, tmp_path: Path, passes: str) -> ir.Model:
    """``passes`` run on the big model as the pipeline streams it (scratch beside tmp_path)."""
    model = onnxcomp.load(big_path)
    run_pipeline(model, passes, check="none", bound=LOSS_ALLOWED, stream_above=STREAM_ABOVE,
                 scratch_dir=tmp_path)  # fmt: skip
    return model


def _same_weights(model: ir.Model, path: Path) -> None:
    written = onnxcomp.load(path)
    for name, value in model.graph.initializers.items():
        np.testing.assert_array_equal(
            written.graph.initializers[name].const_value.numpy(), value.const_value.numpy()
        )


def test_the_scratch_file_becomes_the_output_data_without_a_copy(
    big_path: Path, tmp_path: Path
) -> None:
    model = _streamed(big_path, tmp_path, "int8")
    scratch = model.graph.meta[SCRATCH_KEY]
    first_file, inode = scratch.path, scratch.path.stat().st_ino
    out = tmp_path / "out.onnx"
    io.save(model, out)
    data = tmp_path / "out.onnx.data"
    # The same file, moved: one link (onnx.checker refuses a data file with two).
    assert data.stat().st_ino == inode and data.stat().st_nlink == 1
    onnx.checker.check_model(str(out), full_check=True)
    # The model now reads its new weights from the output, as if loaded from it...
    assert not first_file.exists() and tmp_path / "out.onnx.data" in io.external_files(model)
    _same_weights(model, out)
    with pytest.raises(UsageError, match="refusing to overwrite"):
        io.save(model, out)  # so it cannot be written over it
    assert np.isfinite(_run(out)).all()
    # ...and what it stores later goes to a new scratch file, not into the written output.
    size = data.stat().st_size
    scratch.store(ir.tensor(np.ones(1 << 20, np.float32), name="later"))
    assert scratch.path != first_file and data.stat().st_size == size


def test_a_scratch_file_holding_replaced_weights_is_copied_not_kept(
    big_path: Path, tmp_path: Path
) -> None:
    # fp16 keeps its half-precision weights in the scratch file, int8 then replaces them: most
    # of the file is weights the model no longer reads, which the output must not carry.
    model = _streamed(big_path, tmp_path, "fp16,int8")
    scratch_bytes = model.graph.meta[SCRATCH_KEY].path.stat().st_size
    io.save(model, tmp_path / "out.onnx")
    data = tmp_path / "out.onnx.data"
    assert data.stat().st_size < 0.5 * scratch_bytes
    assert data not in io.external_files(model)
    _same_weights(model, tmp_path / "out.onnx")


def test_a_failed_write_gives_the_scratch_file_back(
    big_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _streamed(big_path, tmp_path, "int8")
    scratch_file = model.graph.meta[SCRATCH_KEY].path
    expected = {n: v.const_value.numpy().copy() for n, v in model.graph.initializers.items()}
    real_replace = os.replace

    def replace(src, dst):  # the data file is renamed in, the model file is not
        if str(dst).endswith("out.onnx"):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(io.os, "replace", replace)
    with pytest.raises(UsageError, match="No space left"):
        io.save(model, tmp_path / "out.onnx")
    monkeypatch.undo()
    assert not (tmp_path / "out.onnx").exists() and not (tmp_path / "out.onnx.data").exists()
    assert scratch_file.is_file() and scratch_file in io.external_files(model)
    for name, value in model.graph.initializers.items():
        np.testing.assert_array_equal(value.const_value.numpy(), expected[name])
    io.save(model, tmp_path / "out.onnx")  # and a second try writes it
    _same_weights(model, tmp_path / "out.onnx")


def test_an_output_on_another_file_system_gets_a_copy(
    big_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _streamed(big_path, tmp_path, "int8")
    scratch_file = model.graph.meta[SCRATCH_KEY].path

    def rename(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(io.os, "rename", rename)
    io.save(model, tmp_path / "out.onnx")
    assert scratch_file.is_file() and scratch_file in io.external_files(model)
    onnx.checker.check_model(str(tmp_path / "out.onnx"))
    _same_weights(model, tmp_path / "out.onnx")


def test_sampled_layers_stay_within_the_byte_budget(big_path: Path) -> None:
    model = onnxcomp.load(big_path)
    mib = 1 << 20
    # One of each op type always (the smallest: proj 4 MiB, conv 3 MiB; the 8 MiB MatMuls
    # tie, so the middle one), then more only while the sample stays within the budget.
    sample = instrument.LayerSample(model, count=10, max_weight_bytes=32 * mib)
    assert sample.names == ["embed (Gather)", "up0 (MatMul)", "down1 (MatMul)", "proj (Gemm)",
                            "conv (Conv)"]  # fmt: skip
    assert len(instrument.LayerSample(model, count=10).names) == 9  # every layer fits 256 MiB
    assert instrument.LayerSample(model, count=2).names == ["embed (Gather)", "down1 (MatMul)"]


def test_a_stored_weight_read_at_once_waits_for_its_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = io._write_at

    def slow_write(*args) -> None:
        time.sleep(0.2)  # still writing when the tensor is read
        real_write(*args)

    monkeypatch.setattr(io, "_write_at", slow_write)
    scratch = ScratchData(tmp_path)
    values = np.arange(1 << 18, dtype=np.float32)
    stored = scratch.store(ir.tensor(values, name="w"))
    np.testing.assert_array_equal(stored.numpy(), values)
    with open(tmp_path / "copy.bin", "wb") as f:  # and what save copies is whole too
        scratch.store(ir.tensor(values * 2, name="w2")).tofile(f)
    np.testing.assert_array_equal(np.fromfile(tmp_path / "copy.bin", np.float32), values * 2)
    stored.release()
    scratch.close()


def test_a_failed_scratch_write_fails_the_pass_in_one_line(
    big_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full_disk(*args) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io, "_write_at", full_disk)
    with pytest.raises(PassFailedError, match="No space left on device"):
        onnxcomp.optimize(big_path, "int8", output=tmp_path / "out.onnx", check="none",
                          stream_above=STREAM_ABOVE)  # fmt: skip
    assert not (tmp_path / "out.onnx").exists()
