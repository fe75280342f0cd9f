"""``onnxcomp bench`` and ``onnxcomp report``: every model and setting reported, ratios to the
first model, a missing provider noted, bad models reported without stopping the others, JSON
and PNG written. Runs are few (5 after 1 warm-up): these tests check structure, not speed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import onnxcomp
from onnxcomp import bench
from onnxcomp.bench import BenchOptions, Candidate, make_feeds, measure, run_bench
from onnxcomp.cli import main
from onnxcomp.errors import UsageError
from tests.conftest import MODELS, conv_bn_residual_model, mlp_model

FAST = ["--runs", "5", "--warmup", "1", "--no-memory"]
QUICK = BenchOptions(runs=5, warmup=1, memory=False)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    """The CNN and its simplify,fold-bn output (same inputs and outputs, fewer nodes)."""
    base, small = tmp_path / "base.onnx", tmp_path / "small.onnx"
    onnx.save(conv_bn_residual_model(), base)
    onnxcomp.optimize(base, "simplify,fold-bn", output=small)
    return base, small


@pytest.fixture
def labelled_data(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "eval.npz"
    np.savez(path, x=rng.standard_normal((10, 1, 4, 4)).astype(np.float32),
             labels=rng.integers(0, 6, 10))  # fmt: skip
    return path


def _bench_json(capsys, args: list[str], tmp_path: Path, code: int = 0) -> tuple[dict, str]:
    out = tmp_path / "bench.json"
    assert main(["bench", *args, *FAST, "--json", str(out)]) == code
    printed = capsys.readouterr().out
    return json.loads(out.read_text()), printed


def test_measure_interleaves_models_with_a_rotating_start():
    order: list[int] = []
    calls = [lambda i=i: order.append(i) for i in range(3)]
    samples = measure(calls, runs=3, warmup=1)
    assert [len(s) for s in samples] == [3, 3, 3]
    warmup, measured = order[:3], order[3:]
    assert warmup == [0, 1, 2] and measured == [0, 1, 2, 1, 2, 0, 2, 0, 1]


def test_measure_stops_at_the_time_budget_with_equal_counts():
    import time

    samples = measure([lambda: time.sleep(0.01), lambda: None], runs=10_000, time_budget=0.05)
    assert 1 <= len(samples[0]) < 10 and len(samples[0]) == len(samples[1])
    assert min(samples[0]) >= 0.009


def test_table_and_json_have_every_model_and_setting(capsys, pair, tmp_path: Path):
    base, small = pair
    data, printed = _bench_json(
        capsys, [str(base), str(small), "--threads", "1,2", "--batch", "1,3"], tmp_path
    )
    assert [m["label"] for m in data["models"]] == ["base", "small"]
    cells = {(r["model"], r["threads"], r["batch"]): r for r in data["results"]}
    assert set(cells) == {(m, t, b) for m in ("base", "small") for t in (1, 2) for b in (1, 3)}
    assert all(r["status"] == "ok" and r["latency"]["runs"] == 5 for r in cells.values())
    for setting in ("cpu t1 b1", "cpu t1 b3", "cpu t2 b1", "cpu t2 b3"):
        assert setting in printed
    assert printed.count("base") >= 4 and printed.count("small") >= 4
    config = data["config"]
    assert config["level"] == "all" and config["runs"] == 5 and config["warmup"] == 1
    assert "interleaved" in config["timing"] and "inter_op_num_threads = 1" in config["threads"]
    assert config["environment"]["onnxruntime"] == ort.__version__


def test_ratios_are_against_the_first_model(tmp_path: Path):
    report = run_bench(
        [Candidate("a", onnxcomp.load(_save_tmp(conv_bn_residual_model(), tmp_path))),
         Candidate("b", _mlp_with_cnn_inputs(tmp_path))],
        BenchOptions(runs=5, warmup=1, memory=False, batches=(1, 4)),
    )  # fmt: skip
    for setting in report.settings:
        first, second = report.cell("a", setting), report.cell("b", setting)
        assert first is not None and second is not None
        assert set(first.ratios.values()) == {1.0}
        assert second.ratios["p50"] == pytest.approx(second.latency.p50 / first.latency.p50)
        assert second.ratios["throughput"] == pytest.approx(second.throughput / first.throughput)
        assert second.throughput == pytest.approx(setting.batch / (second.latency.p50 * 1e-3))
        sizes = {m.label: m.file_bytes for m in report.models}
        assert second.ratios["file_bytes"] == pytest.approx(sizes["b"] / sizes["a"])


@pytest.mark.skipif(HAS_CUDA, reason="CUDA is present: the missing-provider path cannot run")
def test_missing_cuda_is_a_note_not_an_error(capsys, pair, tmp_path: Path):
    base, small = pair
    data, printed = _bench_json(capsys, [str(base), str(small), "--providers", "cpu,cuda"],
                                tmp_path)  # fmt: skip
    by_provider = {(r["model"], r["provider"]): r["status"] for r in data["results"]}
    assert by_provider == {
        ("base", "CPUExecutionProvider"): "ok",
        ("small", "CPUExecutionProvider"): "ok",
        ("base", "CUDAExecutionProvider"): "unavailable",
        ("small", "CUDAExecutionProvider"): "unavailable",
    }
    assert any("CUDAExecutionProvider is not available" in n and "onnxruntime-gpu" in n
               for n in data["notes"])  # fmt: skip
    assert "cuda t1 b1" in printed and "not available" in printed


def test_a_model_that_fails_to_load_does_not_stop_the_others(capsys, pair, tmp_path: Path):
    base, small = pair
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(base.read_bytes()[:200])
    data, printed = _bench_json(capsys, [str(base), str(corrupt), str(small)], tmp_path)
    models = {m["label"]: m for m in data["models"]}
    assert "not an ONNX model" in models["corrupt"]["error"]
    status = {r["model"]: r["status"] for r in data["results"]}
    assert status == {"base": "ok", "corrupt": "error", "small": "ok"}
    assert "not an ONNX model" in printed


def test_every_model_failing_exits_1(capsys, tmp_path: Path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    assert main(["bench", str(bad), str(tmp_path / "missing.onnx"), *FAST]) == 1
    captured = capsys.readouterr()
    assert "no such file" in captured.out
    assert captured.err.strip() == "onnxcomp: error: every model failed (see the table)"


def test_data_that_does_not_match_one_model_is_reported_for_that_model(
    capsys, pair, labelled_data: Path, tmp_path: Path
):
    base, _ = pair
    mlp = tmp_path / "mlp.onnx"
    onnx.save(mlp_model(), mlp)  # input x is [N, 8]; the data has [N, 1, 4, 4]
    data, _ = _bench_json(capsys, [str(base), str(mlp), "--data", str(labelled_data)], tmp_path)
    models = {m["label"]: m for m in data["models"]}
    assert models["mlp"]["error"].endswith("'x' has rank 4, the model expects 2")
    row = next(r for r in data["results"] if r["model"] == "base")
    assert row["status"] == "ok" and row["accuracy"] is not None


def test_accuracy_and_agreement_with_the_first_model(pair, labelled_data: Path):
    base, small = pair
    report = run_bench([base, small], BenchOptions(runs=5, warmup=1, memory=False,
                                                   batches=(1, 4)), data=labelled_data)  # fmt: skip
    feeds = dict(np.load(labelled_data))
    labels = feeds.pop("labels")
    scores = ort.InferenceSession(str(base), providers=["CPUExecutionProvider"]).run(None, feeds)
    expected = float(np.mean(scores[0].argmax(1) == labels))
    for cell in report.cells:
        assert cell.accuracy == pytest.approx(expected)
        assert cell.agreement == 1.0 and cell.cosine > 0.99999
    assert report.config["accuracy_samples"] == 10


def test_static_batch_gives_na_for_other_batches(tmp_path: Path):
    model = mlp_model()
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = 2
    path = tmp_path / "static.onnx"
    onnx.save(model, path)
    report = run_bench([path], BenchOptions(runs=5, warmup=1, memory=False, batches=(1, 2)))
    status = {c.batch: (c.status, c.note) for c in report.cells}
    assert status[1] == ("n/a", "n/a (static batch 2)")
    assert status[2][0] == "ok"


def test_random_feeds_take_the_batch_and_shapes(tmp_path: Path):
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["ids"], ["y"], keepdims=0)],
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", "L"])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, [])],
    )
    model = onnxcomp.load(_save_tmp(helper.make_model(graph), tmp_path))
    assert make_feeds(model, 8)["ids"].shape == (8, 32)
    assert make_feeds(model, 3, shapes={"ids": (1, 128)})["ids"].shape == (3, 128)


def test_peak_memory_grows_with_the_weights(tmp_path: Path):
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("peak memory is measured through /proc (Linux)")
    small = _matmul_model(tmp_path / "small.onnx", 16)
    big = _matmul_model(tmp_path / "big.onnx", 4096)  # 16 MiB of weights
    report = run_bench([small, big], BenchOptions(runs=2, warmup=1))
    peaks = {c.model: c.peak_memory_bytes for c in report.cells}
    assert peaks["big"] >= 16 * 2**20 > peaks["small"] > 0
    assert "VmHWM" in report.config["memory"]


def test_ctrl_c_prints_what_was_measured_and_exits_130(capsys, pair, tmp_path: Path,
                                                       monkeypatch):  # fmt: skip
    base, small = pair
    real_runner = bench._runner
    calls = {"n": 0}

    def interrupting_runner(session, feeds):
        run = real_runner(session, feeds)

        def call():
            calls["n"] += 1
            if calls["n"] > 2 * (1 + 5) + 2 * 3:  # setting 1 whole, setting 2 after 2 runs
                raise KeyboardInterrupt
            return run()

        return call

    monkeypatch.setattr(bench, "_runner", interrupting_runner)
    out = tmp_path / "bench.json"
    args = ["bench", str(base), str(small), "--batch", "1,2,3", *FAST, "--json", str(out)]
    assert main(args) == 130
    captured = capsys.readouterr()
    data = json.loads(out.read_text())
    assert data["interrupted"] is True
    runs = {(r["model"], r["batch"]): r["latency"]["runs"] for r in data["results"]}
    assert runs == {("base", 1): 5, ("small", 1): 5, ("base", 2): 2, ("small", 2): 2}
    assert "cpu t1 b2" in captured.out and "interrupted after 2 runs" in captured.out
    assert "not measured: cpu · threads 1 · batch 3" in data["notes"][-1]
    assert captured.err.strip() == (
        "onnxcomp: error: interrupted; the table shows what was measured so far"
    )


def test_plot_is_a_png(capsys, pair, labelled_data: Path, tmp_path: Path):
    pytest.importorskip("matplotlib")
    base, small = pair
    png = tmp_path / "bench.png"
    args = [str(base), str(small), "--batch", "1,4", "--data", str(labelled_data),
            "--plot", str(png)]  # fmt: skip
    _bench_json(capsys, args, tmp_path)
    assert png.read_bytes().startswith(PNG_MAGIC) and png.stat().st_size > 20_000


def test_report_renders_an_optimize_report_and_its_trail(capsys, cnn_path: Path, tmp_path: Path):
    pytest.importorskip("matplotlib")
    ledger, png = tmp_path / "report.json", tmp_path / "trail.png"
    args = ["optimize", str(cnn_path), "-p", "simplify,fold-bn", "-o", str(tmp_path / "o.onnx"),
            "--report", str(ledger)]  # fmt: skip
    assert main(args) == 0
    optimized = capsys.readouterr().out
    assert main(["report", str(ledger), "--plot", str(png)]) == 0
    rendered = capsys.readouterr().out
    start = optimized.index("before -> after")
    assert rendered.startswith(optimized[start: optimized.index("wrote")])
    assert png.read_bytes().startswith(PNG_MAGIC) and png.stat().st_size > 20_000


def test_report_renders_a_bench_json_as_bench_printed_it(capsys, pair, tmp_path: Path):
    base, small = pair
    _, printed = _bench_json(capsys, [str(base), str(small)], tmp_path)
    assert main(["report", str(tmp_path / "bench.json")]) == 0
    assert capsys.readouterr().out == printed[: printed.index("wrote")]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--threads", "one"], "bad --threads 'one'"),
        (["--batch", "0"], "batch >= 1"),
        (["--providers", "gpu"], "unknown provider 'gpu'"),
        (["--provider-option", "cuda"], "expected PROVIDER:KEY=VALUE"),
        (["--data", "missing.npz"], "no such data file"),
        (["--runs", "0"], "runs and samples must be >= 1"),
    ],
)
def test_bad_bench_arguments_are_usage_errors(capsys, pair, args: list[str], needle: str):
    base, _ = pair
    assert main(["bench", str(base), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


def test_report_of_a_file_that_is_not_a_report(capsys, tmp_path: Path):
    path = tmp_path / "x.json"
    path.write_text('{"a": 1}')
    assert main(["report", str(path)]) == 1
    assert "neither an 'onnxcomp optimize --report'" in capsys.readouterr().err


def test_provider_options_pass_through():
    assert bench.parse_provider_options(["cuda:device_id=1:arena_extend_strategy=kSameAsRequested"]
                                        ) == {"CUDAExecutionProvider": {
        "device_id": "1", "arena_extend_strategy": "kSameAsRequested"}}  # fmt: skip
    assert bench._providers("CUDAExecutionProvider", {"CUDAExecutionProvider": {"device_id": "1"}}
                            ) == [("CUDAExecutionProvider", {"device_id": "1"}),
                                  "CPUExecutionProvider"]  # fmt: skip
    with pytest.raises(UsageError):
        bench.parse_provider_options(["cuda:device_id"])


def test_demo_models_bench_end_to_end(capsys, tmp_path: Path):
    small = tmp_path / "digits_small.onnx"
    onnxcomp.optimize(MODELS / "digits_cnn.onnx", "simplify,fold-bn", output=small)
    args = [str(MODELS / "digits_cnn.onnx"), str(small), "--batch", "1,32",
            "--data", str(MODELS / "digits_eval.npz")]  # fmt: skip
    data, _ = _bench_json(capsys, args, tmp_path)
    assert [r["accuracy"] for r in data["results"]] == [pytest.approx(0.9889, abs=1e-4)] * 4
    assert data["models"][1]["file_bytes"] < data["models"][0]["file_bytes"]


def _save_tmp(model: onnx.ModelProto, directory: Path) -> Path:
    path = directory / f"{model.graph.name or 'model'}.onnx"
    onnx.save(model, path)
    return path


def _mlp_with_cnn_inputs(directory: Path):
    """A second model with the CNN's input x [N,1,4,4] and output y [N,6]: Flatten + MatMul."""
    rng = np.random.default_rng(1)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("MatMul", ["f", "w"], ["y"])],
        "flat_mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])],
        [onnx.numpy_helper.from_array(rng.standard_normal((16, 6)).astype(np.float32), "w")],
    )
    return onnxcomp.load(_save_tmp(helper.make_model(graph), directory))


def _matmul_model(path: Path, n: int) -> Path:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n])],
        [onnx.numpy_helper.from_array(np.ones((n, n), np.float32), "w")],
    )
    onnx.save(helper.make_model(graph), path)
    return path
