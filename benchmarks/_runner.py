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
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

import onnxcomp
from onnxcomp.bench import (
    DEFAULT_SAMPLES,
    BenchOptions,
    BenchReport,
    Candidate,
    parse_provider_options,
    run_bench,
)
from onnxcomp.errors import OnnxcompError
from onnxcomp.report import console, emit_bench, format_bytes, progress_bar
from onnxcomp.target import probe_host, resolve_target


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
    p.add_argument("--samples", type=int, default=DEFAULT_SAMPLES,
                   help="samples of --data the accuracy figures use")  # fmt: skip
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
        samples=getattr(args, "samples", DEFAULT_SAMPLES),
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


def bench(
    candidates: Sequence[Candidate | str | os.PathLike],
    args: argparse.Namespace,
    *,
    data: str | os.PathLike | None = None,
) -> BenchReport:
    """Measure ``candidates`` as ``args`` say (on ``data``, else ``args.data``), with a progress
    bar; prints and writes nothing. For scripts that bench several models in one run."""
    with progress_bar() as progress:
        return run_bench(candidates, options(args), data=data or args.data, progress=progress)


def run(
    candidates: Sequence[Candidate | str | os.PathLike],
    args: argparse.Namespace,
) -> BenchReport:
    """Measure ``candidates`` as ``args`` say, print the table, write the JSON and plot."""
    report = bench(candidates, args)
    emit_bench(report, console(), json_path=args.json, plot_path=args.plot)
    return report


MetaColumn = tuple[str, str, Callable[[Any], str]]  # (key in a model's meta, header, format)


def print_summary(
    data: dict[str, Any],
    out: Console,
    *,
    title: str,
    meta: Sequence[MetaColumn] = (),
) -> None:
    """One row per model of a bench report (``BenchReport.to_dict()``): size, top-1 and cosine
    against the first model (from the first setting that measured them), p50 latency under each
    setting with its ratio to the first model, and the ``meta`` columns the script names."""
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    settings = data["settings"]
    headers = ["model", "size", "top-1", "cosine"]
    headers += [f"p50 ms t{s['threads'] or 'def'} b{s['batch']}" for s in settings]
    headers += [header for _, header, _ in meta]
    rows = []
    first_bytes = data["models"][0]["file_bytes"] if data["models"] else None
    for model in data["models"]:
        cells = [r for r in data["results"] if r["model"] == model["label"]]
        scored = next((r for r in cells if r["cosine"] is not None or r["accuracy"] is not None),
                      {})  # fmt: skip
        size = format_bytes(model["file_bytes"])
        if model["file_bytes"] and first_bytes:
            size += f" ({model['file_bytes'] / first_bytes:.2f}x)"
        row = [model["label"], size, _maybe(scored.get("accuracy"), "{:.2%}"),
               _maybe(scored.get("cosine"), "{:.5f}")]  # fmt: skip
        for setting in settings:
            key = (setting["provider"], setting["threads"], setting["batch"])
            cell = next((r for r in cells if (r["provider"], r["threads"], r["batch"]) == key),
                        None)  # fmt: skip
            if cell is None or cell["latency"] is None:
                row.append("-")
                continue
            ratio = cell["ratios"].get("p50")
            text = f"{cell['latency']['p50']:.3f}"
            row.append(text + (f" ({ratio:.2f}x)" if ratio and model is not data["models"][0]
                               else ""))  # fmt: skip
        row += [fmt(model["meta"].get(key)) for key, _, fmt in meta]
        errors = [r["note"] for r in cells if r["status"] == "error"]
        rows.append((row, model["error"] or (errors[0] if errors else "")))
    if any(note for _, note in rows):
        headers.append("note")
    for header in headers:
        left = header in ("model", "note")
        table.add_column(header, justify="left" if left else "right", no_wrap=header == "model",
                         overflow="fold")  # fmt: skip
    for row, note in rows:
        table.add_row(*row, *([note] if "note" in headers else []))
    out.print(table)


def wide_console(width: int = 180) -> Console:
    """The report's console, wide enough for one line per variant when output is not a tty."""
    out = console()
    return out if out.is_terminal else Console(width=max(out.width, width))


def _maybe(value: float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def cpu_header() -> str:
    """The CPU this runs on and the flags that decide int8 layouts and speed."""
    import onnxruntime

    cpu = probe_host()
    flags = {"AVX2": "avx2" in cpu.flags, "AVX512-VNNI": "avx512_vnni" in cpu.flags,
             "AVX-VNNI": "avx_vnni" in cpu.flags, "AMX-INT8": cpu.amx}  # fmt: skip
    listed = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in flags.items())
    host = resolve_target("host", cpu=cpu)
    return (
        f"CPU: {cpu.model} ({cpu.arch}); {listed}; --target host = {host.kind} (int8-static "
        f"layout {host.layout.name}); onnxruntime {onnxruntime.__version__}"
    )


def main(argv: list[str] | None = None) -> int:
    p = parser("Compare compression pipelines on one model.")
    p.add_argument("model")
    p.add_argument("--variant", action="append", default=[], metavar="LABEL=PIPELINE",
                   help="a pipeline to compare, e.g. small=simplify,fold-bn; LABEL= is the "
                   "model as it is (repeatable; default: the model and simplify)")  # fmt: skip
    args = p.parse_args(argv)
    variants = dict(v.partition("=")[::2] for v in args.variant) or {
        "input": "",
        "simplify": "simplify",
    }
    try:
        report = run(compress(args.model, variants, data=args.data), args)
    except OnnxcompError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 130 if report.interrupted else 0


if __name__ == "__main__":
    raise SystemExit(main())
