"""Pruning: fp32 vs structured channel pruning (each importance) vs unstructured magnitude pruning.

For each demo model: ``prune-channels`` at ratio 0.25 and 0.5 with importance l1, l2, bn-scale
and entropy, and ``prune`` at sparsity 0.5 and 0.8. Every pass sees the calib split (entropy
ranks channels on it); every figure is then taken by ``benchmarks/_runner.py`` (one timing
loop, variants interleaved run by run) with top-1 accuracy and output cosine against fp32 on
the eval split. No fine-tuning: accuracy recovery is distillation's job. Columns added here:
parameters, and the deflate size of the model file (zlib level 6, zip's default), which is what
unstructured pruning shrinks. Run from the repository root::

    python benchmarks/prune.py --threads 1,2 --batch 1,32 --runs 30 --json prune.json
    python benchmarks/prune.py --quick        # smoke run: threads 1, batch 1, few runs
"""

from __future__ import annotations

import argparse
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import onnx_ir as ir
from _runner import bench, parser, print_summary, wide_console

import onnxcomp
from onnxcomp.analysis.summary import summarize
from onnxcomp.bench import Candidate
from onnxcomp.errors import OnnxcompError
from onnxcomp.io import write_text
from onnxcomp.report import console, format_bytes, to_json

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "models"
DEMOS = {
    "digits_cnn": ("digits_cnn.onnx", "digits_calib.npz", "digits_eval.npz"),
    "tiny_encoder": ("tiny_encoder.onnx", "encoder_calib.npz", "encoder_eval.npz"),
}
RATIOS = (0.25, 0.5)
IMPORTANCES = ("l1", "l2", "bn-scale", "entropy")
SPARSITIES = (0.5, 0.8)
MIN_RUNS = 30
ZIP_LEVEL = 6


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(DEMOS), help="comma-separated demo names")
    p.add_argument("--quick", action="store_true", help="smoke run: threads 1, batch 1, 5 runs")
    p.set_defaults(threads="1,2", batch="1,32", runs=MIN_RUNS, warmup=5, samples=10**9)
    args = p.parse_args(argv)
    if args.quick:
        args.threads, args.batch, args.runs, args.warmup, args.no_memory = "1", "1", 5, 2, True
    elif args.runs < MIN_RUNS:
        p.error(f"--runs must be >= {MIN_RUNS} (use --quick for a smoke run)")
    unknown = set(args.models.split(",")) - set(DEMOS)
    if unknown:
        p.error(f"unknown models {sorted(unknown)}; choose from {', '.join(DEMOS)}")
    return args


def variants() -> dict[str, str]:
    """Label -> pipeline string, in table order."""
    table = {
        f"channels {ratio} {importance}": f"prune-channels:ratio={ratio}:importance={importance}"
        for ratio in RATIOS
        for importance in IMPORTANCES
    }
    table.update({f"prune {s}": f"prune:sparsity={s}" for s in SPARSITIES})
    return table


def zipped_bytes(model: ir.Model) -> int:
    return len(zlib.compress(ir.to_proto(model).SerializeToString(), ZIP_LEVEL))


def candidate(label: str, model: ir.Model, seconds: float | None = None) -> Candidate:
    meta = {"params": summarize(model, count_zeros=False).params, "zip_bytes": zipped_bytes(model)}
    if seconds is not None:
        meta["seconds"] = seconds
    return Candidate(label, model, meta=meta)


def bench_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Prune ``name`` every way (on its calib split), bench all variants together on eval."""
    model_file, calib, evaluation = (MODELS / f for f in DEMOS[name])
    out = console()
    candidates = [candidate("fp32", onnxcomp.load(model_file))]
    notes: dict[str, list[str]] = {}  # note -> the variants it applies to
    for label, pipeline in variants().items():
        out.print(f"{name}: {pipeline} ...", highlight=False)
        started = time.perf_counter()
        try:
            pruned, report = onnxcomp.optimize(model_file, pipeline, data=calib, check="none")
        except OnnxcompError as e:
            candidates.append(Candidate(label, None, error=str(e)))
            continue
        candidates.append(candidate(label, pruned, time.perf_counter() - started))
        for note in (n for r in report.records for n in r.notes):
            notes.setdefault(note, []).append(label)
    report = bench(candidates, args, data=evaluation).to_dict()
    pass_notes = [f"{', '.join(labels)}: {note}" for note, labels in notes.items()]
    report["notes"] = pass_notes + report["notes"]
    return report


META_COLUMNS = [
    ("params", "params", lambda v: "-" if v is None else f"{v:,}"),
    ("zip_bytes", "zipped", lambda v: "-" if v is None else format_bytes(v)),
    ("seconds", "prune s", lambda v: "-" if v is None else f"{v:.2f}"),
]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reports = {}
    out = wide_console()
    for name in args.models.split(","):
        reports[name] = bench_model(name, args)
        title = f"{name}: top-1 / cosine vs fp32 on {DEMOS[name][2]}; p50 = median ms, ORT CPU"
        print_summary(reports[name], out, title=title, meta=META_COLUMNS)
        for note in reports[name]["notes"]:
            out.print(f"note: {note}", highlight=False)
    if args.json:
        write_text(args.json, to_json({"kind": "onnxcomp-prune-bench", "models": reports}))
        out.print(f"wrote {args.json}", highlight=False)
    return 130 if any(r["interrupted"] for r in reports.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
