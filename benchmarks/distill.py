"""Distillation: accuracy lost to compression, and won back by ``distill``, on the demo models.

For each demo model this makes, in memory with ``onnxcomp.optimize`` (distillation trains on
the training split where the demo ships one, digits_train.npz, else the calib split; 20% of it
held out to pick the best epoch): fp32; ``prune-channels:ratio=0.5``, ``binary``, ``ternary``
and ``lowrank``, each before and after ``distill``; and the full stacks
``fold-bn,prune-channels,distill,int4,strip``, ``...,int4,distill,strip`` (quantise, then train
on the grid) and ``...,ternary,distill,strip`` (``strip`` drops the exporter's stack traces).
Every variant is then measured by ``benchmarks/_runner.py`` (one timing loop, variants
interleaved run by run): top-1 on the eval split (never trained on), file bytes and ONNX
Runtime CPU latency. The targets of the distillation issue are checked against fp32 and
printed as met or missed. Run from the repository root::

    python benchmarks/distill.py --json distill.json          # a few minutes on CPU
    python benchmarks/distill.py --quick                      # smoke run: few epochs, few runs
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from _runner import bench, parser, print_summary

import onnxcomp
from onnxcomp.analysis.summary import summarize
from onnxcomp.bench import Candidate
from onnxcomp.errors import OnnxcompError
from onnxcomp.io import write_text
from onnxcomp.report import console, format_bytes, to_json

REPO = Path(__file__).resolve().parent.parent
DEMOS = {
    "digits_cnn": ("digits_cnn.onnx", "digits_train.npz", "digits_eval.npz"),
    "tiny_encoder": ("tiny_encoder.onnx", "encoder_calib.npz", "encoder_eval.npz"),
}
PRUNE = "prune-channels:ratio=0.5"
# (label, pipeline with {d} for the distill pass); None = the input model.
VARIANTS: list[tuple[str, str | None]] = [
    ("fp32", None),
    ("prune50", PRUNE),
    ("prune50+distill", PRUNE + ",{d}"),
    ("binary", "binary"),
    ("binary+distill", "binary,{d}"),
    ("ternary", "ternary"),
    ("ternary+distill", "ternary,{d}"),
    ("lowrank", "lowrank"),
    ("lowrank+distill", "lowrank,{d}"),
    # BatchNormalization folded first, so its parameters do not stay float
    ("stack: prune50,distill,int4", "fold-bn," + PRUNE + ",{d},int4,strip"),
    ("stack: prune50,int4,distill", "fold-bn," + PRUNE + ",int4,{d},strip"),
    ("stack: prune50,ternary,distill", "fold-bn," + PRUNE + ",ternary,{d},strip"),
]
# (model, variant, most top-1 points below fp32, least times smaller than fp32 or None)
TARGETS = [
    ("digits_cnn", "prune50+distill", 1.0, None),
    ("digits_cnn", "ternary+distill", 2.0, None),
    ("digits_cnn", "binary+distill", 3.0, None),
    ("digits_cnn", "best full stack", 1.0, 20.0),
]
STACKS = tuple(label for label, _ in VARIANTS if label.startswith("stack: "))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(DEMOS), help="comma-separated demo names")
    p.add_argument("--epochs", type=int, default=40, help="distill epochs (default 40)")
    p.add_argument("--lr", type=float, default=3e-3, help="distill learning rate")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 4 epochs, threads 1, batch 1, 5 runs")  # fmt: skip
    p.set_defaults(threads="1", batch="1,32", runs=50, warmup=5, samples=10**9, no_memory=True)
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.threads, args.batch, args.runs, args.warmup = 4, "1", "1", 5, 2
    return args


def make_variants(name: str, args: argparse.Namespace) -> list[Candidate]:
    """Every variant of the demo ``name``, compressed and distilled on its training data."""
    model, calib, _ = (REPO / "models" / f for f in DEMOS[name])
    distill = f"distill:epochs={args.epochs}:lr={args.lr}"
    out = console()
    candidates = []
    for label, pipeline in VARIANTS:
        if pipeline is None:
            weights = summarize(onnxcomp.load(model), count_zeros=False).weight_bytes
            candidates.append(Candidate(label, model, meta={"weight_bytes": weights}))
            continue
        text = pipeline.format(d=distill)
        started = time.perf_counter()
        try:
            compressed, _ = onnxcomp.optimize(model, text, data=calib, check="none")
        except OnnxcompError as e:
            candidates.append(Candidate(label, None, error=f"{text}: {e}"))
            continue
        seconds = time.perf_counter() - started
        out.print(f"{name}: {label} ({seconds:.1f} s)", highlight=False)
        weights = summarize(compressed, count_zeros=False).weight_bytes
        candidates.append(Candidate(label, compressed, meta={
            "seconds": seconds, "pipeline": text, "weight_bytes": weights}))  # fmt: skip
    return candidates


def check_targets(reports: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each target with the figures it was judged on and whether it was met."""
    results = []
    for model, variant, max_drop, min_ratio in TARGETS:
        if model not in reports:
            continue
        figures = _figures(reports[model])
        fp32 = figures.get("fp32")
        # "best full stack": the first stack that meets the target, else the most accurate one
        candidates = STACKS if variant == "best full stack" else (variant,)
        judged = [_judge(model, name, fp32, figures.get(name), max_drop, min_ratio)
                  for name in candidates]  # fmt: skip
        measured = [j for j in judged if "drop_points" in j] or judged
        met = [j for j in measured if j["met"]]
        results.append(met[0] if met else max(measured, key=lambda j: -j.get("drop_points", 1e9)))
    return results


def _judge(
    model: str,
    variant: str,
    fp32: dict[str, Any] | None,
    got: dict[str, Any] | None,
    max_drop: float,
    min_ratio: float | None,
) -> dict[str, Any]:
    """One variant against one target: the top-1 drop from fp32 and how many times smaller."""
    if not fp32 or not got or got["accuracy"] is None or fp32["accuracy"] is None:
        return {"model": model, "variant": variant, "met": False, "why": "not measured"}
    drop = 100 * (fp32["accuracy"] - got["accuracy"])
    ratio = fp32["bytes"] / got["bytes"] if got["bytes"] else None
    weight_ratio = fp32["weights"] / got["weights"] if got["weights"] else None
    met = drop <= max_drop and (min_ratio is None or (ratio or 0) >= min_ratio)
    return {"model": model, "variant": variant, "drop_points": round(drop, 2),
            "max_drop": max_drop, "smaller_x": ratio and round(ratio, 1),
            "weights_smaller_x": weight_ratio and round(weight_ratio, 1),
            "min_smaller_x": min_ratio, "met": met}  # fmt: skip


def _figures(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per variant: top-1 (first setting that measured it) and file bytes."""
    figures = {}
    for model in report["models"]:
        cells = [r for r in report["results"] if r["model"] == model["label"]]
        accuracy = next((r["accuracy"] for r in cells if r["accuracy"] is not None), None)
        figures[model["label"]] = {"accuracy": accuracy, "bytes": model["file_bytes"],
                                   "weights": model["meta"].get("weight_bytes")}  # fmt: skip
    return figures


META = [
    ("weight_bytes", "weight bytes", lambda v: "-" if v is None else format_bytes(v)),
    ("seconds", "compress s", lambda v: "-" if v is None else f"{v:.1f}"),
]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reports = {}
    out = console()
    for name in filter(None, (n.strip() for n in args.models.split(","))):
        if name not in DEMOS:
            print(f"error: unknown demo '{name}' (choose from {', '.join(DEMOS)})",
                  file=sys.stderr)  # fmt: skip
            return 2
        candidates = make_variants(name, args)
        evaluation = REPO / "models" / DEMOS[name][2]
        reports[name] = bench(candidates, args, data=evaluation).to_dict()
        print_summary(reports[name], out, meta=META,
                      title=f"{name}: top-1 on {evaluation.name}; distill {args.epochs} epochs "
                      f"on {DEMOS[name][1]}; p50 = median latency, ORT CPU")  # fmt: skip
    targets = check_targets(reports)
    for t in targets:
        if "drop_points" not in t:
            line = f"{t['model']} {t['variant']}: {t['why']}"
        else:
            size = ""
            if t["min_smaller_x"]:
                size = (f", file {t['smaller_x']}x smaller (target >= {t['min_smaller_x']}x), "
                        f"weights {t['weights_smaller_x']}x smaller")  # fmt: skip
            line = (f"{t['model']} {t['variant']}: top-1 drop {t['drop_points']:+.2f} pt vs "
                    f"fp32 (target <= {t['max_drop']}){size}")  # fmt: skip
        out.print(f"target {'MET' if t['met'] else 'MISSED'}: {line}", highlight=False)
    for name, report in reports.items():
        fp32_bytes = report["models"][0]["file_bytes"]
        out.print(f"{name}: fp32 file {format_bytes(fp32_bytes)}", highlight=False)
    if args.json:
        write_text(args.json, to_json({"kind": "onnxcomp-distill-bench", "epochs": args.epochs,
                                       "models": reports, "targets": targets}))  # fmt: skip
        out.print(f"wrote {args.json}", highlight=False)
    return 130 if any(r["interrupted"] for r in reports.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
