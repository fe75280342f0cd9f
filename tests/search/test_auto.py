"""onnxcomp auto: the bound on held-out data, reproduction, resume, shared storage, metrics."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import onnx_ir as ir
import optuna
import pytest

import onnxcomp
from onnxcomp.cli import main
from onnxcomp.errors import LossBoundError
from onnxcomp.search import fit_data_path, split_holdout
from tests.conftest import REPO, run_onnx
from tests.search.conftest import negative_max_error

FAST = {"distill_epochs": (0,), "trials": 6}


def _held_out_accuracy(model_path, data_path) -> float:
    full = onnxcomp.load_data(data_path, onnxcomp.load(model_path))
    _, held_out = split_holdout(full, None)
    logits = run_onnx(onnx.load(model_path), held_out.inputs)[0]
    return 100.0 * float(np.mean(logits.argmax(1) == held_out.labels))


def test_auto_meets_the_bound_on_held_out_data_and_the_pipeline_reproduces_it(fragile, tmp_path):
    out = tmp_path / "small.onnx"
    result = onnxcomp.auto(fragile["model"], fragile["data"], max_drop=1.0, output=out, **FAST)
    assert result.best is not None and result.final is not None
    assert result.final.drop <= 1.0
    # judged again here, in plain ONNX Runtime, on the held-out samples
    assert _held_out_accuracy(fragile["model"], fragile["data"]) == 100.0
    assert _held_out_accuracy(out, fragile["data"]) >= 99.0
    assert out.stat().st_size < fragile["model"].stat().st_size
    written = {t.name: t.data_type for t in onnx.load(out).graph.initializer}
    assert written["w2"] == onnx.TensorProto.FLOAT  # the fragile layer stays float
    assert "w1" not in written or written["w1"] != onnx.TensorProto.FLOAT  # the others do not
    assert all(t.outcome.pipeline for t in result.trials)
    assert any(not t.feasible for t in result.trials)  # quantising w2 breaks the bound
    # the printed pipeline, on the written fit split, gives the same model
    again, _ = onnxcomp.optimize(fragile["model"], result.pipeline, check="none",
                                 data=fit_data_path(out), bound=onnxcomp.LossBound(allow_loss=True))
    x = np.load(fragile["data"])["x"]
    rebuilt = run_onnx(ir.to_proto(again), {"x": x})[0]
    np.testing.assert_array_equal(rebuilt, run_onnx(onnx.load(out), {"x": x})[0])


def test_resume_continues_the_study(fragile, tmp_path):
    storage = str(tmp_path / "study.log")
    first = onnxcomp.auto(fragile["model"], fragile["data"], storage=storage,
                          distill_epochs=(0,), trials=3)  # fmt: skip
    assert len(first.trials) == 3
    with pytest.raises(onnxcomp.UsageError, match="--resume"):
        onnxcomp.auto(fragile["model"], fragile["data"], storage=storage, distill_epochs=(0,),
                      trials=5)  # fmt: skip
    second = onnxcomp.auto(fragile["model"], fragile["data"], storage=storage, resume=True,
                           distill_epochs=(0,), trials=5)  # fmt: skip
    assert [t.number for t in second.trials] == [0, 1, 2, 3, 4]
    for old, new in zip(first.trials, second.trials[:3], strict=True):
        assert new.outcome == old.outcome  # kept, not run again (same seconds too)
    new_pipelines = {t.outcome.pipeline for t in second.trials[3:]}
    assert not new_pipelines & {t.outcome.pipeline for t in first.trials}


def test_two_processes_share_one_study(fragile, tmp_path):
    storage = tmp_path / "shared.log"
    args = [sys.executable, "-m", "onnxcomp", "auto", str(fragile["model"]), "--data",
            str(fragile["data"]), "--storage", str(storage), "--resume", "--trials", "6",
            "--distill-epochs", "0"]  # fmt: skip
    procs = [subprocess.Popen([*args, "-o", str(tmp_path / f"out{i}.onnx")], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]  # fmt: skip
    for proc in procs:
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err
    from optuna.storages.journal import JournalFileBackend

    journal = optuna.storages.JournalStorage(JournalFileBackend(str(storage)))
    (summary,) = optuna.get_all_study_summaries(journal)
    trials = optuna.load_study(study_name=summary.study_name, storage=journal).trials
    finished = [t for t in trials if t.state.is_finished()]
    # one study: 6 trials (one more when both start their last at once), not 6 each
    assert 6 <= len(finished) <= 7
    assert len({t.number for t in trials}) == len(trials)


def test_a_custom_metric_is_used(fragile):
    result = onnxcomp.auto(fragile["model"], fragile["targets"], metric=negative_max_error,
                           max_drop=1.0, **FAST)  # fmt: skip
    assert result.metric.endswith("negative_max_error")
    assert result.base_score == pytest.approx(0.0, abs=1e-4)
    scored = [t for t in result.trials if t.outcome.score is not None]
    assert scored and all(t.outcome.score <= 1e-4 for t in scored)
    assert any(t.outcome.drop > 1.0 and not t.feasible for t in scored)  # w2 quantised
    assert result.best is not None and 0 < result.best.outcome.drop <= 1.0


def test_latency_is_timed_at_the_batch_asked_for(capsys, fragile, tmp_path, monkeypatch):
    import onnxcomp.search.evaluate as evaluate

    timed = []  # the shapes of the feeds of every timed call, input model and trials alike
    real_call = evaluate._call

    def spy(session, feeds):
        timed.append({name: array.shape for name, array in feeds.items()})
        return real_call(session, feeds)

    monkeypatch.setattr(evaluate, "_call", spy)
    storage, report = tmp_path / "study.log", tmp_path / "trials.json"
    args = ["auto", str(fragile["model"]), "--data", str(fragile["data"]), "--distill-epochs",
            "0", "--trials", "2", "--storage", str(storage), "--json", str(report)]  # fmt: skip
    assert main([*args, "-o", str(tmp_path / "small.onnx"), "--batch", "7"]) == 0
    assert len(timed) >= 4 and all(shapes == {"x": (7, 16)} for shapes in timed)
    assert json.loads(report.read_text())["timing"] == {"batch": 7, "threads": 1}
    assert "batch 7" in capsys.readouterr().out
    # latencies at batch 1 are not comparable with the study's: it refuses to continue
    assert main([*args, "-o", str(tmp_path / "again.onnx"), "--resume"]) == 2
    assert "timing differ" in capsys.readouterr().err


def test_no_trial_within_the_bound_writes_nothing_and_names_the_closest(fragile, tmp_path):
    out = tmp_path / "small.onnx"
    with pytest.raises(LossBoundError, match="the closest, trial"):
        onnxcomp.auto(fragile["model"], fragile["targets"], output=out, max_drop=0.0,
                      metric="tests.search.conftest:negative_max_error", distill_epochs=(0,),
                      trials=3)  # fmt: skip
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("extra", "code", "needle"),
    [
        (["--metric", "top1", "--data-unlabelled"], 2, "needs 'labels'"),
        (["--storage", "nosuchdb://x"], 2, "cannot open --storage"),
        (["--storage", "/no/such/dir/study.log"], 2, "does not exist"),
        (["--metric", "nosuchmodule:f"], 2, "cannot load --metric"),
        (["--batch", "0"], 2, "--batch must be >= 1"),
    ],
)
def test_bad_input_is_one_line(capsys, fragile, tmp_path, extra, code, needle):
    data = fragile["data"]
    if "--data-unlabelled" in extra:
        extra = [e for e in extra if e != "--data-unlabelled"]
        data = fragile["unlabelled"]
    args = ["auto", str(fragile["model"]), "--data", str(data), "-o", str(tmp_path / "o.onnx"),
            "--distill-epochs", "0", *extra]  # fmt: skip
    assert main(args) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("onnxcomp: error:") and needle in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_sensitivity_cli_writes_table_json_and_heatmap(capsys, fragile, tmp_path):
    args = ["sensitivity", str(fragile["model"]), "--data", str(fragile["data"]),
            "--techniques", "int8", "--json", str(tmp_path / "s.json"),
            "--plot", str(tmp_path / "s.png")]  # fmt: skip
    assert main(args) == 0
    assert "w2" in capsys.readouterr().out
    data = json.loads((tmp_path / "s.json").read_text())
    assert data["layers"][0]["name"] == "w2"
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["sensitivity", str(fragile["model"]), "--data", str(fragile["data"]),
                 "--techniques", "int3"]) == 2  # fmt: skip
    assert "unknown technique" in capsys.readouterr().err


def test_latency_space_prunes_hidden_units_with_or_without_attention_heads():
    from onnxcomp.search.auto import build_space, candidates
    from onnxcomp.search.sensitivity import SensitivityReport

    none = SensitivityReport("", "", "", 0.0, 0, "", "", 0, [], [])
    encoder = onnxcomp.load(REPO / "models" / "tiny_encoder.onnx")
    space = build_space(encoder, none, 1.0, distill_epochs=(0,))
    assert space.describe()["prune_heads"] == [False, True]
    queued = [space.pipeline(c) for c in candidates(space, none, 1.0, "latency")]
    ffn_only = next(p for p in queued if "heads=false" in p)
    # simplify first: the encoder computes GELU with Erf (put in the form ONNX Runtime fuses)
    assert ffn_only.startswith("simplify,prune-channels:ratio=0.5:heads=false,int8-dynamic")
    shapes = {}
    for text in (ffn_only, ffn_only.replace(":heads=false", "")):
        model, _ = onnxcomp.optimize(encoder, text.split(",int8-dynamic")[0], check="none",
                                     bound=onnxcomp.LossBound(allow_loss=True))  # fmt: skip
        shapes[text] = {n: v.shape.dims for n, v in model.graph.initializers.items()}
    kept, cut = shapes.values()
    assert kept["layers.0.attn.q_proj.weight.T"] == (64, 64)  # all 4 heads kept
    assert cut["layers.0.attn.q_proj.weight.T"] == (64, 32)  # 2 of 4 heads removed
    assert kept["layers.0.fc1.weight.T"] == cut["layers.0.fc1.weight.T"] == (64, 64)
    cnn = build_space(onnxcomp.load(REPO / "models" / "digits_cnn.onnx"), none, 1.0,
                      distill_epochs=(0,))  # fmt: skip
    assert "prune_heads" not in cnn.describe()  # no attention: no such choice


def test_search_trains_on_one_torch_thread_unless_told_otherwise():
    pytest.importorskip("torch")
    from onnxcomp.search.auto import build_space, candidates
    from onnxcomp.search.sensitivity import SensitivityReport

    none = SensitivityReport("", "", "", 0.0, 0, "", "", 0, [], [])
    encoder = onnxcomp.load(REPO / "models" / "tiny_encoder.onnx")
    for options, expected in (("lr=0.003", "distill:epochs=5:threads=1:lr=0.003"),
                              ("threads=2", "distill:epochs=5:threads=2,")):  # fmt: skip
        space = build_space(encoder, none, 1.0, distill_epochs=(5,), distill_options=options)
        trained = [p for c in candidates(space, none, 1.0, "latency")
                   if "distill" in (p := space.pipeline(c))]  # fmt: skip
        assert trained and all(expected in p for p in trained)


def test_trial_clock_leaves_out_a_kind_of_trial_that_would_pass_the_deadline():
    from onnxcomp.search.auto import TrialClock

    now = [0.0]
    clock = TrialClock(deadline=100.0, now=lambda: now[0])
    distilled, plain = "int8,distill:epochs=20", "int8"
    assert clock.fits(distilled) and clock.fits(plain)  # nothing timed yet: always tried
    clock.record(distilled, 40.0)
    clock.record(plain, 2.0)
    now[0] = 59.0
    assert clock.fits(distilled)  # 59 + 40 <= 100
    now[0] = 61.0
    assert not clock.fits(distilled) and clock.fits(plain)  # 101 > 100, 63 <= 100
    assert TrialClock(deadline=None).fits(distilled)  # no budget, no limit


def test_trials_left_out_for_time_are_pruned_and_the_search_still_answers(fragile, monkeypatch):
    auto_module = sys.modules["onnxcomp.search.auto"]  # the package's `auto` is the function
    calls = []

    def first_only(self, pipeline):
        calls.append(pipeline)
        return len(calls) == 1

    monkeypatch.setattr(auto_module.TrialClock, "fits", first_only)
    result = onnxcomp.auto(fragile["model"], fragile["data"], max_drop=1.0, time_budget=600,
                           distill_epochs=(0,), trials=4)  # fmt: skip
    assert len(calls) >= 2  # asked before each trial that was not cached
    assert len(result.trials) == 1 and result.trials[0].state == "COMPLETE"


def test_latency_finalists_are_timed_again_together_before_the_winner_is_chosen(
    fragile, monkeypatch
):
    # every trial's own loop says the first feasible trial is by far the fastest (a load spike
    # on the input model); timed again together, the finalists rank the other way round
    from onnxcomp.search.evaluate import Evaluator

    order = []

    def spiked(self, model):
        order.append(model)
        return (1.0, 10.0 if len(order) == 1 else 1.1)

    def together(self, models, seconds=None):
        return [(1.0, 1.0 + i) for i in range(len(models))]  # the later kept, the faster

    monkeypatch.setattr(Evaluator, "latency", spiked)
    monkeypatch.setattr(Evaluator, "latencies", together)
    # int8 near the fragile layer costs points: a loose bound leaves several trials feasible
    result = onnxcomp.auto(fragile["model"], fragile["data"], max_drop=50.0, objective="latency",
                           distill_epochs=(0,), trials=6)  # fmt: skip
    assert len(result.retimed) >= 2
    retimed = [t for t in result.trials if t.number in result.retimed]
    assert result.best in retimed and result.best.outcome.speedup == max(
        t.outcome.speedup for t in retimed)
    assert result.best.outcome.speedup != 10.0  # the spiked figure did not choose it
    assert "retimed" in result.to_dict()
