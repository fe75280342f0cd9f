"""Search over pipelines, above the pipeline: ``sensitivity`` and ``auto``.

Both build pipeline strings from the registry and run them through :func:`onnxcomp.optimize`;
the metric is judged on held-out data no pass calibrated or trained on (``eval_data``, else a
fixed-seed ``holdout`` share of ``data``). Optuna is imported only by :mod:`.auto`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import onnx_ir as ir

from onnxcomp.data import Dataset, load_data
from onnxcomp.errors import LossBoundError, UsageError
from onnxcomp.io import check_writable, external_files, load, save
from onnxcomp.search.auto import AutoResult, Objective, TrialRecord, run_auto, save_npz
from onnxcomp.search.evaluate import DEFAULT_TIMING, Outcome, Timing
from onnxcomp.search.metrics import DEFAULT_HOLDOUT, MetricFunction, resolve_metric, split_holdout
from onnxcomp.search.sensitivity import (
    DEFAULT_TECHNIQUES,
    TECHNIQUES,
    SensitivityReport,
    parse_techniques,
    run_sensitivity,
)
from onnxcomp.target import Target, resolve_target

__all__ = [
    "DEFAULT_TECHNIQUES",
    "TECHNIQUES",
    "AutoResult",
    "Outcome",
    "SensitivityReport",
    "Timing",
    "TrialRecord",
    "auto",
    "fit_data_path",
    "parse_techniques",
    "sensitivity",
    "split_holdout",
]
Progress = Callable[[str, int, int], None]


def sensitivity(
    model: ir.Model | str | os.PathLike,
    data: Dataset | str | os.PathLike,
    *,
    eval_data: Dataset | str | os.PathLike | None = None,
    holdout: float = DEFAULT_HOLDOUT,
    techniques: str | Sequence[str] | None = None,
    passes: str | None = None,
    metric: str | MetricFunction | None = None,
    target: Target | str | None = None,
    latency: bool = False,
    timing: Timing = DEFAULT_TIMING,
    workers: int = 1,
    progress: Progress | None = None,
) -> SensitivityReport:
    """Per layer and technique (``int8,int4,int2,int8-act,prune-channels,prune`` by default),
    the metric drop when the technique is applied to that layer alone, bytes saved and, with
    ``latency``, the speed-up; layers ranked most sensitive first. With ``passes``, each
    layer's share of the error that pipeline causes (leave-one-layer-out recovery) instead.
    ``metric``: ``top1`` (needs labels), ``cosine``, ``module:function`` or a callable
    ``f(outputs, arrays) -> float``, higher is better. ``workers`` processes score layers."""
    chosen = parse_techniques(techniques) if passes is None else []
    ir_model, label = _model(model)
    fit, held_out, metric_ = _data(ir_model, data, eval_data, holdout, metric)
    return run_sensitivity(
        ir_model, fit, held_out, metric=metric_, target=resolve_target(target),
        techniques=chosen, passes=passes, latency=latency, timing=timing, workers=workers,
        label=label, progress=progress,
    )  # fmt: skip


def auto(
    model: ir.Model | str | os.PathLike,
    data: Dataset | str | os.PathLike,
    *,
    max_drop: float = 1.0,
    output: str | os.PathLike | None = None,
    objective: Objective = "size",
    eval_data: Dataset | str | os.PathLike | None = None,
    holdout: float = DEFAULT_HOLDOUT,
    metric: str | MetricFunction | None = None,
    target: Target | str | None = None,
    trials: int = 30,
    time_budget: float | None = None,
    storage: str | None = None,
    resume: bool = False,
    study_name: str | None = None,
    distill_epochs: Sequence[int] | None = None,
    distill_options: str = "",
    timing: Timing = DEFAULT_TIMING,
    workers: int = 1,
    seed: int = 0,
    progress: Progress | None = None,
) -> AutoResult:
    """Search pruning x quantisation x distillation for the smallest (``objective="size"``),
    fastest (``"latency"``) or both (``"balanced"``) model whose metric on held-out data is at
    most ``max_drop`` below the input model's; return every trial of the study and the winner.

    With ``output``, the winner is re-run from its pipeline string, checked on the held-out
    data again and written atomically (and, when ``data`` was split, the part passes saw is
    written beside it as ``<output>.fit.npz`` so ``onnxcomp optimize`` reproduces it); when no
    trial meets the bound nothing is written and :class:`LossBoundError` names the closest.
    ``storage`` (a journal file or a database URL) keeps the study: ``resume`` continues it,
    and processes given the same storage and ``study_name`` share it."""
    ir_model, label = _model(model)
    protect: tuple[Path, ...] = ()
    if output is not None:
        check_writable(output)
        if isinstance(model, (str, os.PathLike)):
            if os.path.realpath(model) == os.path.realpath(output):
                raise UsageError(f"refusing to overwrite the input model {model}; "
                                 "choose another -o")
            protect = (Path(model), *external_files(ir_model))
    fit, held_out, metric_ = _data(ir_model, data, eval_data, holdout, metric)
    result = run_auto(
        ir_model, fit, held_out, metric=metric_, target=resolve_target(target),
        max_drop=max_drop, objective=objective, trials=trials, time_budget=time_budget,
        storage=storage, resume=resume, study_name=study_name, distill_epochs=distill_epochs,
        distill_options=distill_options, timing=timing, workers=workers, seed=seed,
        label=label, progress=progress,
    )  # fmt: skip
    if output is None:
        return result
    if result.best is None:
        raise _no_winner(result)
    _write_winner(result, ir_model, fit, held_out, metric_, target, output, protect,
                  split=eval_data is None)  # fmt: skip
    return result


def _write_winner(result, model, fit, held_out, metric, target, output, protect, *, split):
    """Re-run the best trials' pipelines (best first) and write the first that meets the bound
    again on the held-out data (passes are deterministic; this guards against one that is not)."""
    from onnxcomp.search.evaluate import Evaluator

    evaluator = Evaluator(model, fit, held_out, metric, target=resolve_target(target))
    ranked = [result.best] + [t for t in result.trials if t.feasible and t is not result.best]
    for trial in ranked[:3]:
        compressed, _ = evaluator.compress(trial.outcome.pipeline)
        final = Outcome(trial.outcome.pipeline)
        evaluator.score_into(final, compressed, latency=False)
        if final.drop is not None and final.drop <= result.max_drop + 1e-9:
            save(compressed, output, protect=protect)
            if split:
                save_npz(fit, fit_data_path(output))
            result.best, result.final, result.output = trial, final, str(output)
            return
    raise _no_winner(result, rerun=True)


def fit_data_path(output: str | os.PathLike) -> Path:
    """Where the fit split is written beside ``output``: ``small.onnx`` -> ``small.fit.npz``."""
    path = Path(output)
    return path.with_name(path.stem + ".fit.npz")


def _no_winner(result: AutoResult, rerun: bool = False) -> LossBoundError:
    bound = f"a drop of at most {result.max_drop:g} {result.unit or 'in ' + result.metric}"
    if rerun:
        message = f"no trial's pipeline met {bound} again when re-run; nothing written"
    elif result.closest is None:
        message = f"no trial completed ({len(result.trials)} tried); nothing written"
    else:
        c = result.closest
        message = (f"no trial met {bound} on the held-out data; the closest, trial "
                   f"{c.number} ({c.outcome.pipeline}), dropped {c.outcome.drop:.2f}; "
                   "nothing written")  # fmt: skip
    error = LossBoundError(message, None)
    error.result = result  # type: ignore[attr-defined]
    return error


def _model(model: ir.Model | str | os.PathLike) -> tuple[ir.Model, str]:
    if isinstance(model, ir.Model):
        return model, model.graph.name or "model"
    return load(model), Path(model).stem


def _data(model, data, eval_data, holdout, metric):
    def dataset(value, flag):
        if isinstance(value, Dataset):
            return value
        dataset = load_data(value, model, extras=True)
        dataset.description = f"{flag} {Path(value).name}"
        return dataset

    if data is None:
        raise UsageError("--data is required: the search scores models on real data")
    full = dataset(data, "--data")
    evaluation = None if eval_data is None else dataset(eval_data, "--eval-data")
    fit, held_out = split_holdout(full, evaluation, holdout)
    return fit, held_out, resolve_metric(metric, held_out)
