"""Compression by goal: ``onnxcomp auto`` on the demo models, next to ONNX Runtime's quantiser.

For each demo this runs, in one process:

- ``onnxcomp.auto`` with ``--max-drop 1`` (top-1 points on the eval split, which no pass ever
  sees: passes calibrate and train on the training/calib split) and a time budget: the CNN
  with ``--objective size``, the encoder with ``--objective latency``;
- ONNX Runtime's quantiser (``quantize_static`` QDQ per channel for the CNN,
  ``quantize_dynamic`` QInt8 for the encoder) with ``nodes_to_exclude`` = the nodes of the
  layers that per-layer sensitivity (``onnxcomp.sensitivity``, int8 weights / int8
  activations) finds above half the drop budget;

then measures fp32, the search's winner and ORT's model together with ``benchmarks/_runner.py``
(one timing loop, models interleaved run by run): file bytes, top-1 on the eval split and
ONNX Runtime CPU latency at batch 1 and 32, and checks the issue's targets (CNN >= 20x
smaller, encoder >= 1.5x faster, both within 1 point). The latency search times its trials
at ``--search-batch`` (default 32: served in batches, where int8 and pruning pay off; at
batch 1 the encoder's 0.15 ms is mostly ONNX Runtime's per-node overhead); the speed-up is
judged at that batch and the other is printed beside it. Run from the repository root::

    python benchmarks/auto.py --json auto.json            # ~10 minutes per model on 2 cores
    python benchmarks/auto.py --models tiny_encoder --search-batch 1   # search for batch 1
    python benchmarks/auto.py --models digits_cnn --budget 120 --epochs 5   # shorter
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _runner import bench, parser, print_summary
from quantize import _npz_reader

import onnxcomp
from onnxcomp.bench import Candidate
from onnxcomp.errors import LossBoundError, OnnxcompError
from onnxcomp.io import write_text
from onnxcomp.report import console, format_bytes, print_auto, to_json
from onnxcomp.search import Timing

REPO = Path(__file__).resolve().parent.parent
# name: (model, fit data, eval data, objective, target: least x smaller or faster)
DEMOS: dict[str, tuple[str, str, str, str, float]] = {
    "digits_cnn": ("digits_cnn.onnx", "digits_train.npz", "digits_eval.npz", "size", 20.0),
    "tiny_encoder": ("tiny_encoder.onnx", "encoder_train.npz", "encoder_eval.npz", "latency",
                     1.5),
}
MAX_DROP = 1.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(DEMOS), help="comma-separated demo names")
    p.add_argument("--budget", type=float, default=480.0,
                   help="seconds of search per model (default 480)")
    p.add_argument("--trials", type=int, default=200, help="most trials per model")
    p.add_argument("--epochs", default="0,20", help="distill epoch choices (default 0,20)")
    p.add_argument("--workers", type=int, default=2, help="sensitivity worker processes")
    p.add_argument("--search-batch", type=int, default=32,
                   help="batch the latency search times trials at (default 32)")
    p.set_defaults(threads="1", batch="1,32", runs=300, warmup=20, samples=10**9,
                   no_memory=True)  # fmt: skip
    return p.parse_args(argv)


def search(name: str, args: argparse.Namespace) -> tuple[onnxcomp.search.AutoResult, Path]:
    model, fit, evaluation, objective, _ = DEMOS[name]
    out = Path(tempfile.mkdtemp(prefix="onnxcomp-auto-")) / f"{name}.auto.onnx"
    epochs = tuple(int(e) for e in args.epochs.split(",") if e.strip())
    batch = args.search_batch if objective == "latency" else 1
    started = time.perf_counter()
    with _progress() as progress:
        result = onnxcomp.auto(
            REPO / "models" / model, REPO / "models" / fit, eval_data=REPO / "models" / evaluation,
            max_drop=MAX_DROP, objective=objective, output=out, trials=args.trials,
            time_budget=args.budget, distill_epochs=epochs, distill_options="lr=0.003",
            timing=Timing(batch=batch, threads=1, seconds=1.0), workers=args.workers,
            progress=progress,
        )  # fmt: skip
    result.space["search_seconds"] = round(time.perf_counter() - started, 1)
    return result, out


def ort_with_exclusions(name: str, workers: int) -> tuple[Candidate, list[str]]:
    """ONNX Runtime's quantiser with the nodes of the layers sensitivity excludes."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    model, fit, evaluation, objective, _ = DEMOS[name]
    path = REPO / "models" / model
    technique = "int8-act" if objective == "size" else "int8-dynamic"
    report = onnxcomp.sensitivity(path, REPO / "models" / fit,
                                  eval_data=REPO / "models" / evaluation,
                                  techniques=f"int8,{technique}", workers=workers)  # fmt: skip
    fragile = set(report.excluded("int8", MAX_DROP / 2)) | set(
        report.excluded(technique, MAX_DROP / 2))
    graph = onnxcomp.load(path).graph
    nodes = [n.name for n in graph for v in n.inputs if v is not None and v.name in fragile]
    out = Path(tempfile.mkdtemp(prefix="onnxcomp-ort-")) / f"{name}.ort.onnx"
    if objective == "size":
        quantize_static(path, out, _npz_reader(str(REPO / "models" / fit)),
                        quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=nodes)  # fmt: skip
        label = "ort quantize_static QDQ"
    else:
        quantize_dynamic(path, out, weight_type=QuantType.QInt8, nodes_to_exclude=nodes)
        label = "ort quantize_dynamic QInt8"
    return Candidate(f"{label} (excl. {len(nodes)})", out,
                     meta={"pipeline": f"excluded nodes: {', '.join(nodes) or 'none'}"}), nodes


def _progress():
    from onnxcomp.report import progress_bar

    return progress_bar("searching")


META = [("pipeline", "how", lambda v: "-" if v is None else str(v))]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = console()
    reports: dict[str, Any] = {}
    verdicts = []
    for name in filter(None, (n.strip() for n in args.models.split(","))):
        if name not in DEMOS:
            print(f"error: unknown demo '{name}' (choose from {', '.join(DEMOS)})",
                  file=sys.stderr)  # fmt: skip
            return 2
        model, _, evaluation, objective, goal = DEMOS[name]
        candidates = [Candidate("fp32", REPO / "models" / model)]
        try:
            result, written = search(name, args)
            print_auto(result.to_dict(), out)
            candidates.append(Candidate(f"auto --objective {objective}", written,
                                        meta={"pipeline": result.pipeline}))  # fmt: skip
        except LossBoundError as e:
            result = getattr(e, "result", None)
            candidates.append(Candidate(f"auto --objective {objective}", None, error=str(e)))
        except OnnxcompError as e:
            result = None
            candidates.append(Candidate(f"auto --objective {objective}", None, error=str(e)))
        ort, _ = ort_with_exclusions(name, args.workers)
        candidates.append(ort)
        data = bench(candidates, args, data=REPO / "models" / evaluation).to_dict()
        print_summary(data, out, meta=META,
                      title=f"{name}: top-1 on {evaluation} (held out); p50 latency, ORT CPU, "
                      f"threads {args.threads}, batch {args.batch}")  # fmt: skip
        batch = args.search_batch if objective == "latency" else None
        reports[name] = {"bench": data, "auto": result.to_dict() if result else None}
        verdicts.append(_verdict(name, data, objective, goal, batch))
    for line in verdicts:
        out.print(line, highlight=False)
    if args.json:
        write_text(args.json, to_json({"kind": "onnxcomp-auto-bench", "models": reports}))
        out.print(f"wrote {args.json}", highlight=False)
    return 0


def _verdict(name: str, data: dict[str, Any], objective: str, goal: float,
             batch: int | None) -> str:  # fmt: skip
    """The issue's target for ``name``, judged on the bench's own measurements (the speed-up
    at the search's ``batch``; the other batches' beside it)."""
    models = {m["label"]: m for m in data["models"]}
    cells: dict[tuple[str, int], dict[str, Any]] = {
        (r["model"], r["batch"]): r for r in data["results"] if r["status"] == "ok"}
    batches = sorted({b for _, b in cells})
    auto = next((label for label in models if label.startswith("auto")), None)
    judged = batch if batch in batches else (batches[0] if batches else None)

    def p50(key: tuple[str, int]) -> float:
        return cells[key]["latency"]["p50"]

    fp32, got = cells.get(("fp32", judged)), cells.get((auto, judged))
    if fp32 is None or got is None:
        return f"target MISSED: {name}: the search's model was not measured"
    drop = 100 * ((fp32["accuracy"] or 0) - (got["accuracy"] or 0))
    if objective == "size":
        ratio = models["fp32"]["file_bytes"] / models[auto]["file_bytes"]
        what = f"{ratio:.1f}x smaller than fp32 (target >= {goal:g}x)"
    else:
        ratio = fp32["latency"]["p50"] / got["latency"]["p50"]
        others = [f"{p50(('fp32', b)) / p50((auto, b)):.2f}x at batch {b}" for b in batches
                  if b != judged and ("fp32", b) in cells and (auto, b) in cells]  # fmt: skip
        what = (f"{ratio:.2f}x faster than fp32 at batch {judged} (target >= {goal:g}x)"
                + "".join(f"; {o}" for o in others))
    met = ratio >= goal and drop <= MAX_DROP
    return (f"target {'MET' if met else 'MISSED'}: {name}: {what}, top-1 drop {drop:+.2f} pt "
            f"(target <= {MAX_DROP:g}); file {format_bytes(models[auto]['file_bytes'])}")


if __name__ == "__main__":
    raise SystemExit(main())
