"""The runner every benchmark script shares: make the variants, measure, print, save.

A benchmark script (quantisation, pruning, ...) names what to compare and hands it here::

    from _runner import compress, parser, run

    args = parser("weight quantisation on the digits CNN").parse_args()
    candidates = compress("models/digits_cnn.onnx", {"fp32": None, "int8": "int8", "int4": "int4"},
                          data=args.data)
    run(candidates, args)

This module times nothing itself: every figure comes from :func:`onnxcomp.bench.run_bench`
(one timing loop, :func:`onnxcomp.bench.measure`), and the table, JSON and plot are the ones
``onnxcomp bench`` prints and writes. Run it directly to compare pipelines on one model::

    python benchmarks/_runner.py models/digits_cnn.onnx --variant fp32= \\
        --variant small=simplify,fold-bn --data models/digits_eval.npz --batch 1,32
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence

import onnxcomp
from onnxcomp.bench import BenchOptions, BenchReport, Candidate, parse_provider_options, run_bench
from onnxcomp.errors import OnnxcompError
from onnxcomp.io import write_text
from onnxcomp.report import console, plot_bench, print_bench, progress_bar, to_json


def parser(description: str) -> argparse.ArgumentParser:
    """The options every benchmark script takes (the same names as ``onnxcomp bench``)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--providers", default="cpu", help="comma-separated, e.g. cpu,cuda")
    p.add_argument("--threads", default="1", help="intra-op threads, comma-separated")
    p.add_argument("--batch", default="1", help="batch sizes, comma-separated")
    p.add_argument("--data", help=".npz inputs (+ labels) for feeds and accuracy")
    p.add_argument("--runs", type=int, default=100)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--time-budget", type=float, help="seconds per setting")
    p.add_argument("--level", default="all", help="ONNX Runtime optimisation level")
    p.add_argument("--provider-option", action="append", default=[],
                   metavar="PROVIDER:KEY=VALUE")  # fmt: skip
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory probe")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--plot", help="write a PNG of latency vs size here")
    return p


def options(args: argparse.Namespace) -> BenchOptions:
    """BenchOptions from :func:`parser`'s arguments."""

    def ints(text: str) -> tuple[int, ...]:
        return tuple(int(v) for v in text.split(",") if v.strip())

    return BenchOptions(
        providers=tuple(args.providers.split(",")),
        threads=ints(args.threads),
        batches=ints(args.batch),
        runs=args.runs,
        warmup=args.warmup,
        time_budget=args.time_budget,
        level=args.level,
        provider_options=parse_provider_options(args.provider_option),
        memory=not args.no_memory,
    )


def compress(
    model: str | os.PathLike,
    variants: Mapping[str, str | None],
    *,
    data: str | os.PathLike | None = None,
) -> list[Candidate]:
    """One candidate per variant: ``None`` (or "") is the model as it is, otherwise a pipeline
    string run in memory by :func:`onnxcomp.optimize` (checked against the model, on ``data``
    when given). A pipeline that fails becomes a candidate that reports its error."""
    candidates = []
    for label, pipeline in variants.items():
        if not pipeline:
            candidates.append(Candidate(label, model))
            continue
        try:
            compressed, _ = onnxcomp.optimize(model, pipeline, data=data, check="final")
        except OnnxcompError as e:
            candidates.append(Candidate(label, None, error=f"{pipeline}: {e}"))
            continue
        candidates.append(Candidate(label, compressed))
    return candidates


def run(
    candidates: Sequence[Candidate | str | os.PathLike],
    args: argparse.Namespace,
) -> BenchReport:
    """Measure ``candidates`` as ``args`` say, print the table, write the JSON and plot."""
    out = console()
    with progress_bar() as progress:
        report = run_bench(candidates, options(args), data=args.data, progress=progress)
    data = report.to_dict()
    print_bench(data, out)
    if args.json:
        write_text(args.json, to_json(data))
        out.print(f"wrote {args.json}", highlight=False)
    if args.plot and any(c.status == "ok" for c in report.cells):
        plot_bench(data, args.plot)
        out.print(f"wrote {args.plot}", highlight=False)
    return report


def main(argv: list[str] | None = None) -> int:
    p = parser("Compare compression pipelines on one model.")
    p.add_argument("model")
    p.add_argument("--variant", action="append", default=[], metavar="LABEL=PIPELINE",
                   help="a pipeline to compare, e.g. small=simplify,fold-bn; LABEL= is the "
                   "model as it is (repeatable; default: the model and simplify)")  # fmt: skip
    args = p.parse_args(argv)
    variants = dict(v.partition("=")[::2] for v in args.variant) or {"input": "",
                                                                      "simplify": "simplify"}
    try:
        report = run(compress(args.model, variants, data=args.data), args)
    except OnnxcompError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 130 if report.interrupted else 0


if __name__ == "__main__":
    raise SystemExit(main())
