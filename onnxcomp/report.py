"""Render reports for people (rich tables) and for programs (JSON).

Nothing here computes anything about a model: it formats what the pipeline and the analyses
measured.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from onnxcomp.analysis.summary import ModelSummary
from onnxcomp.errors import OnnxcompError, UsageError
from onnxcomp.io import write_text
from onnxcomp.pipeline import PipelineReport

if TYPE_CHECKING:
    from onnxcomp.bench import BenchReport


def console() -> Console:
    """A console that keeps tables readable when output goes to a file or a pipe."""
    out = Console()
    return out if out.is_terminal else Console(width=max(out.width, 140))


def format_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:,} B" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return str(n)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"


def _ratio(before: float | None, after: float | None) -> str:
    if not before or after is None:
        return ""
    return f"{after / before:.3f}x"


def print_pipeline(report: PipelineReport, console: Console) -> None:
    """The before/after table, one line per pass, the numeric check, and the notes."""
    summary = Table(title="before -> after", title_justify="left")
    for column in ("", "before", "after", "ratio"):
        summary.add_column(column, justify="right" if column else "left")
    before, after = report.before, report.after
    rows = [
        ("file bytes", report.file_bytes_before, report.file_bytes_after, format_bytes),
        ("weight bytes", before.weight_bytes, after.weight_bytes, format_bytes),
        ("parameters", before.params, after.params, lambda n: f"{n:,}"),
        ("nodes", before.nodes, after.nodes, lambda n: f"{n:,}"),
    ]
    if report.accuracy_before is not None:
        accuracy_after = report.records[-1].accuracy if report.records else None
        rows.append(("accuracy (top-1)", report.accuracy_before, accuracy_after, _percent))
    for label, b, a, fmt in rows:
        summary.add_row(label, fmt(b), fmt(a), _ratio(b, a))
    for op, (b, a) in report.op_changes().items():
        summary.add_row(f"  {op}", str(b), str(a), "")
    console.print(summary)

    passes = Table(title="passes", title_justify="left")
    columns = ["pass", "seconds", "changed", "what it did", "nodes", "weight bytes",
               "max abs err", "min cosine"]  # fmt: skip
    if report.accuracy_before is not None:
        columns.append("accuracy")
    for column in columns:
        passes.add_column(column, justify="left" if column in ("pass", "what it did") else "right")
    for record in report.records:
        worst = _worst(record.check)
        accuracy = [_percent(record.accuracy)] if report.accuracy_before is not None else []
        passes.add_row(
            record.name,
            f"{record.seconds:.2f}",
            "yes" if record.modified else "no",
            "\n".join(f"{k}: {_fmt(v)}" for k, v in record.stats.items()),
            f"{record.after.nodes:,}",
            format_bytes(record.after.weight_bytes),
            worst[0],
            worst[1],
            *accuracy,
        )
    console.print(passes)

    if report.final_check is not None:
        check = Table(title="numeric check vs input model", title_justify="left")
        for column in ("output", "max abs err", "max |ref|", "cosine", "new NaN/Inf", "within"):
            check.add_column(column, justify="left" if column == "output" else "right")
        for diff in report.final_check:
            check.add_row(
                diff.name,
                diff.shape_mismatch or f"{diff.max_abs:.3g}",
                f"{diff.ref_scale:.3g}",
                f"{diff.cosine:.6f}",
                str(diff.new_nonfinite),
                "yes" if diff.within(report.tolerance) else "no",
            )
        console.print(check)
        console.print(f"inputs: {report.check_inputs}; tolerance: {report.tolerance}",
                      highlight=False)
    if report.target:
        console.print(f"target: {report.target}", highlight=False)
    if report.guard is not None:
        guard = report.guard
        if guard["passed"]:
            console.print(f"loss bound ({guard['bound']}): met", highlight=False)
        else:
            console.print(
                f"[bold red]loss bound ({escape(guard['bound'])}): NOT met[/bold red], written "
                f"anyway (--allow-loss): {escape(guard['message'].split('; nothing written')[0])}"
            )
    for note in report.notes:
        console.print(f"note (layout): {note}", highlight=False)
    for record in report.records:
        for note in record.notes:
            console.print(f"note ({record.name}): {note}", highlight=False)


def print_machine(report: dict[str, Any], console: Console) -> None:
    """``onnxcomp doctor``: the CPU, ONNX Runtime, and what each quantisation pass does here."""
    cpu = report["cpu"]
    console.print(f"[bold]CPU[/bold]  {escape(cpu['model'])} ({cpu['arch']})", highlight=False)
    console.print(f"  instruction sets: {escape(cpu['flags'])}", highlight=False)
    console.print(
        f"[bold]target[/bold]  {escape(report['target'])}: u8·s8 kernels "
        f"{'may saturate (16-bit pair sums)' if report['saturates'] else 'exact'}; "
        f"int8 vs float: {escape(report['int8_speed'])}",
        highlight=False,
    )
    runtime = report["onnxruntime"]
    console.print(
        f"[bold]ONNX Runtime[/bold]  {runtime['version']}, providers: "
        f"{', '.join(runtime['providers'])}",
        highlight=False,
    )
    table = Table(title="quantisation passes for this target", title_justify="left")
    for column in ("pass", "layout", "what it does here"):
        table.add_column(column)
    for row in report["passes"]:
        table.add_row(row["pass"], row["layout"], escape(row["effect"]))
    console.print(table)


def _worst(diffs) -> tuple[str, str]:
    if not diffs:
        return "-", "-"
    max_abs = max(d.max_abs for d in diffs)
    return f"{max_abs:.3g}", f"{min(d.cosine for d in diffs):.6f}"


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def print_summary(summary: ModelSummary, console: Console, *, path: str,
                  file_bytes: int) -> None:
    """``onnxcomp inspect``: signature, ops, parameters by dtype, sparsity, QDQ, external data."""
    opsets = ", ".join(f"{d or 'ai.onnx'}={v}" for d, v in sorted(summary.opsets.items()))
    console.print(f"[bold]{path}[/bold]  {format_bytes(file_bytes)}  ir_version "
                  f"{summary.ir_version}  opsets: {opsets}", highlight=False)
    io_table = Table(title="inputs and outputs", title_justify="left")
    for column in ("", "name", "dtype", "shape"):
        io_table.add_column(column)
    for kind, values in (("input", summary.inputs), ("output", summary.outputs)):
        for name, dtype, shape in values:
            io_table.add_row(kind, escape(name), dtype, escape(shape))  # "[N, 3]" is not markup
    console.print(io_table)

    params = Table(title="parameters by dtype", title_justify="left")
    for column in ("dtype", "parameters", "bytes"):
        params.add_column(column, justify="left" if column == "dtype" else "right")
    for dtype, (count, nbytes) in summary.bytes_by_dtype().items():
        params.add_row(dtype, f"{count:,}", format_bytes(nbytes))
    params.add_row("total", f"{summary.params:,}", format_bytes(summary.weight_bytes))
    console.print(params)

    ops = Table(title=f"ops ({summary.nodes:,} nodes)", title_justify="left")
    ops.add_column("op")
    ops.add_column("count", justify="right")
    for op, count in summary.op_counts.most_common():
        ops.add_row(op, str(count))
    console.print(ops)

    in_constants = sum(1 for t in summary.tensors if t.in_constant_node)
    sparse = [t for t in summary.tensors if t.zeros is not None and t.zeros]
    console.print(f"weight sparsity (exact zeros, float tensors of rank >= 2): "
                  f"{summary.sparsity():.2%}; tensors with zeros: {len(sparse)}")
    console.print(f"QDQ nodes: {summary.qdq_nodes}; quantised weight tensors: "
                  f"{summary.quantized_weights}; weights held in Constant nodes: {in_constants}; "
                  f"subgraphs: {summary.subgraphs}")
    files = summary.external_files()
    if files:
        for name, nbytes in files.items():
            console.print(f"external data: {name} ({format_bytes(nbytes)})")
    else:
        console.print("external data: none")


def summary_dict(summary: ModelSummary, *, path: str, file_bytes: int) -> dict[str, Any]:
    return {
        "path": path,
        "file_bytes": file_bytes,
        "ir_version": summary.ir_version,
        "opsets": summary.opsets,
        "inputs": summary.inputs,
        "outputs": summary.outputs,
        "nodes": summary.nodes,
        "op_counts": dict(summary.op_counts),
        "params": summary.params,
        "weight_bytes": summary.weight_bytes,
        "bytes_by_dtype": summary.bytes_by_dtype(),
        "sparsity": summary.sparsity(),
        "qdq_nodes": summary.qdq_nodes,
        "quantized_weights": summary.quantized_weights,
        "external_files": summary.external_files(),
    }


def to_json(data: dict[str, Any]) -> str:
    """JSON with non-finite floats written as strings ("inf", "nan"), so any parser reads it."""
    return json.dumps(_finite(data), indent=2) + "\n"


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------
# Bench reports and plots. Everything below works on the JSON form (dicts), so a report read
# back from a file renders exactly like one just measured.


def print_bench(data: dict[str, Any], console: Console) -> None:
    """``onnxcomp bench``: the models, then one line per model and setting, each figure with its
    ratio to the first model under the same setting; notes and how it was measured."""
    models = Table(title="models", title_justify="left")
    for column in ("model", "file", "size", "external data", "status"):
        right = column in ("size", "external data")
        models.add_column(column, justify="right" if right else "left")
    first_bytes = data["models"][0]["file_bytes"] if data["models"] else None
    for model in data["models"]:
        size = format_bytes(model["file_bytes"])
        if model["file_bytes"] is not None and first_bytes:
            size += f" ({model['file_bytes'] / first_bytes:.2f}x)"
        models.add_row(
            model["label"],
            model["path"] or "(in memory)",
            size,
            format_bytes(model["external_data_bytes"]) if model["external_data_bytes"] else "-",
            f"[red]error: {model['error']}[/red]" if model["error"] else "ok",
        )
    console.print(models)

    results = data["results"]
    first = data["models"][0]["label"] if data["models"] else None
    failed = {m["label"] for m in data["models"] if m["error"]}
    columns = ["setting", "model", "session ms", "p50 ms", "p90 ms", "p99 ms", "samples/s",
               "peak memory"]  # fmt: skip
    extra = [(key, header) for key, header in
             (("accuracy", "top-1"), ("agreement", "agree"), ("cosine", "cosine"),
              ("prefill_ms", "prefill ms"), ("decode_tokens_per_s", "decode tok/s"))
             if any(r.get(key) is not None for r in results)]  # fmt: skip
    columns += [header for _, header in extra] + ["note"]
    table = Table(title="bench: each figure with its ratio to the first model "
                  f"({first}) under the same setting", title_justify="left",
                  box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False)  # fmt: skip
    for name in columns:
        left = name in ("setting", "model", "note")
        table.add_column(name, justify="left" if left else "right", no_wrap=name != "note",
                         overflow="fold", min_width=20 if name == "note" else None)  # fmt: skip
    for setting in data["settings"]:
        key = (setting["provider"], setting["threads"], setting["batch"])
        rows = [r for r in results if (r["provider"], r["threads"], r["batch"]) == key]
        loaded = [r for r in rows if r["model"] not in failed]
        notes = {r["note"] for r in loaded}
        if loaded and len(notes) == 1 and all(r["status"] == "unavailable" for r in loaded):
            table.add_row(_short_setting(setting), "all", *["-"] * (len(columns) - 3),
                          f"[yellow]{notes.pop()}[/yellow]", end_section=True)  # fmt: skip
            continue
        for index, row in enumerate(rows):
            latency, ratios = row["latency"] or {}, row["ratios"]
            if row["model"] == first:
                ratios = {}
            figures = [
                _with_ratio(row["session_seconds"] and row["session_seconds"] * 1e3,
                            ratios.get("session_seconds"), digits=3),
                _with_ratio(latency.get("p50"), ratios.get("p50")),
                _with_ratio(latency.get("p90"), ratios.get("p90")),
                _with_ratio(latency.get("p99"), ratios.get("p99")),
                _with_ratio(row["throughput"], ratios.get("throughput"), fmt="{:,.0f}".format),
                _with_ratio(row["peak_memory_bytes"], ratios.get("peak_memory_bytes"),
                            fmt=format_bytes),
            ]  # fmt: skip
            for field, _ in extra:
                value = row[field]
                figures.append("-" if value is None else _metric_text(field, value))
            note = row["note"]
            if row["model"] in failed:
                note = "[red]failed (see models)[/red]"
            elif row["status"] == "error":
                note = f"[red]error: {note}[/red]"
            elif row["status"] in ("unavailable", "n/a"):
                note = f"[yellow]{note}[/yellow]"
            table.add_row(_short_setting(setting) if index == 0 else "", row["model"], *figures,
                          note, end_section=index == len(rows) - 1)  # fmt: skip
    console.print(table)
    config = data["config"]
    budget = f" or {config['time_budget_s']} s" if config.get("time_budget_s") else ""
    memory = "child-process peak RSS over pre-session RSS, host only" if config[
        "memory"] != "not measured" else "not measured"  # fmt: skip
    console.print(
        f"timing: {config['runs']} runs{budget} after {config['warmup']} warm-up, models "
        f"interleaved run by run; ONNX Runtime {config['environment']['onnxruntime']}, level "
        f"{config['level']}, inter-op threads 1; peak memory: {memory} (how: JSON config)",
        highlight=False,
    )
    if config.get("data"):
        console.print(f"accuracy: first {config['accuracy_samples']} samples of {config['data']}",
                      highlight=False)
    for note in data["notes"]:
        console.print(f"note: {note}", highlight=False)


@contextlib.contextmanager
def progress_bar(first: str = "loading models") -> Iterator[Callable[[str, int, int], None]]:
    """A progress bar on stderr (drawn only on a terminal) and the ``progress(what, done,
    total)`` callback that :func:`onnxcomp.bench.run_bench` takes."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    stderr = Console(stderr=True)
    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=stderr, transient=True,
                  disable=not stderr.is_terminal) as bar:  # fmt: skip
        task = bar.add_task(first, total=None)

        def update(what: str, done: int, total: int) -> None:
            bar.update(task, description=what, completed=done, total=total)

        yield update


def _with_ratio(value: float | None, ratio: float | None, *, digits: int = 4,
                fmt: Any = None) -> str:  # fmt: skip
    if value is None:
        return "-"
    text = fmt(value) if fmt else f"{value:.{digits}g}"
    return text if ratio is None else f"{text}\n[dim]×{ratio:.2f}[/dim]"


def _short_setting(setting: dict[str, Any]) -> str:
    """``cpu t1 b32``: provider, intra-op threads (0 = ONNX Runtime's default), batch."""
    label = setting["label"].split(" ")[0]
    return f"{label} t{setting['threads'] or 'def'} b{setting['batch']}"


def plot_bench(data: dict[str, Any], path: str) -> None:
    """Latency p50 against file size, one point (marker) per model, one panel per setting;
    colour is top-1 accuracy (else agreement or cosine with the first model). Each panel lists
    its figures and ratios to the first model, so points that overlap stay readable."""
    figure_class, canvas_class = _matplotlib()
    settings = [s for s in data["settings"] if _ok_rows(data, s)]
    if not settings:
        raise OnnxcompError("nothing was measured, so there is nothing to plot")
    models = [m["label"] for m in data["models"]]
    sizes = {m["label"]: m["file_bytes"] for m in data["models"]}
    unit, unit_name = _size_unit(max(v for v in sizes.values() if v is not None))
    metric = next((k for k in ("accuracy", "agreement", "cosine")
                   if any(r.get(k) is not None for r in data["results"])), None)  # fmt: skip
    values = [r[metric] for r in data["results"] if metric and r.get(metric) is not None]
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    if high - low < 1e-9:
        low, high = low - 0.005, high + 0.005
    colour_map = _colour_map()
    markers = "osD^vPX*hp<>"
    columns = 2 if len(settings) == 4 else min(len(settings), 3)
    rows = -(-len(settings) // columns)
    figure = figure_class(figsize=(5.6 * columns + 1.4, 4.6 * rows + 0.8), layout="constrained")
    canvas_class(figure)
    axes = figure.subplots(rows, columns, squeeze=False)
    for ax, setting in zip(axes.flat, settings, strict=False):
        here = _ok_rows(data, setting)
        lines = []
        for r in here:
            index = models.index(r["model"])
            p50 = r["latency"]["p50"]
            value = r.get(metric) if metric else None
            colour = colour_map((value - low) / (high - low)) if value is not None else "tab:blue"
            ax.scatter([sizes[r["model"]] / unit], [p50], s=110, marker=markers[index % 12],
                       color=colour, edgecolors="black", linewidths=0.8, zorder=3)  # fmt: skip
            size_ratio, ratio = r["ratios"].get("file_bytes"), r["ratios"].get("p50")
            line = f"{r['model'][:16]:<16} " + (f"{size_ratio:5.2f}x" if size_ratio else " " * 6)
            line += f" {p50:8.4g} ms" + (f" {ratio:5.2f}x" if ratio is not None else " " * 7)
            if value is not None:
                line += f"  {_metric_text(metric, value)}"
            lines.append(line)
        header = f"{'model':<16} {'size':>6} {'p50':>11} {'ratio':>6}" + (
            f"  {_metric_label(metric)}" if values else "")
        ax.text(0.02, 0.02, "\n".join([header, *lines]), transform=ax.transAxes,
                family="monospace", fontsize=7.5, va="bottom",
                bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.85})  # fmt: skip
        ax.set_title(setting["label"], fontsize=10)
        ax.set_xlabel(f"file size ({unit_name})")
        ax.set_ylabel("latency p50 (ms)")
        ax.set_xlim(0, max(sizes[r["model"]] for r in here) / unit * 1.15)
        # Headroom for the text box under the points.
        ax.set_ylim(0, max(r["latency"]["p50"] for r in here) * (1.35 + 0.12 * len(here)))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(settings):]:
        ax.set_visible(False)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker=markers[i % 12], linestyle="", markersize=9,
                      markerfacecolor="lightgray", markeredgecolor="black")
               for i in range(len(models))]  # fmt: skip
    figure.legend(handles, [f"{m} ({format_bytes(sizes[m])})" for m in models],
                  loc="outside lower center", ncols=min(len(models), 4), fontsize=9)  # fmt: skip
    if values:
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize

        mappable = ScalarMappable(norm=Normalize(low, high), cmap=colour_map)
        bar = figure.colorbar(mappable, ax=axes, label=_metric_label(metric), shrink=0.8)
        if metric != "cosine":
            bar.formatter = _percent_formatter()
            bar.update_ticks()
    figure.suptitle("onnxcomp bench: latency vs file size, one point per model "
                    "(lower left is better)")  # fmt: skip
    _save_figure(figure, path)


def _ok_rows(data: dict[str, Any], setting: dict[str, Any]) -> list[dict[str, Any]]:
    key = (setting["provider"], setting["threads"], setting["batch"])
    return [r for r in data["results"]
            if (r["provider"], r["threads"], r["batch"]) == key and r["status"] == "ok"]


def _size_unit(largest: int) -> tuple[int, str]:
    for unit, name in ((1024**3, "GB"), (1024**2, "MB"), (1024, "KB")):
        if largest >= unit:
            return unit, name
    return 1, "bytes"


def plot_trail(data: dict[str, Any], path: str) -> None:
    """An ``optimize --report`` ledger: weight bytes and nodes after each pass, and top-1
    accuracy (with labels) or the lowest output cosine against the input model."""
    figure_class, canvas_class = _matplotlib()
    records = data["records"]
    names = ["input"] + [r["name"] for r in records]
    sizes = [data["before"]["weight_bytes"]] + [r["after"]["weight_bytes"] for r in records]
    nodes = [data["before"]["nodes"]] + [r["after"]["nodes"] for r in records]
    figure = figure_class(figsize=(max(6.0, 1.4 * len(names) + 2), 7.5), layout="constrained")
    canvas_class(figure)
    top, bottom = figure.subplots(2, 1, sharex=True)
    positions = list(range(len(names)))
    unit, unit_name = _size_unit(max([*sizes, 1]))
    bars = top.bar(positions, [v / unit for v in sizes], color="tab:blue", alpha=0.8,
                   label="weight bytes")  # fmt: skip
    for bar, size in zip(bars, sizes, strict=True):
        label = format_bytes(size) + (f"\n{size / sizes[0]:.2f}x" if sizes[0] else "")
        top.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), xytext=(0, 3),
                     textcoords="offset points", ha="center", va="bottom", fontsize=8,
                     bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.8})  # fmt: skip
    top.set_ylabel(f"weight bytes ({unit_name})")
    top.set_ylim(0, max([*sizes, 1]) / unit * 1.35)
    twin = top.twinx()
    twin.plot(positions, nodes, "o--", color="tab:gray", label="nodes")
    twin.set_ylabel("nodes")
    twin.set_ylim(0, max([*nodes, 1]) * 1.6)
    top.legend(handles=[bars, *twin.get_lines()], loc="upper right", fontsize=8)
    top.set_title(f"pipeline {data['pipeline']}: size after each pass")
    if data.get("accuracy_before") is not None:
        accuracy = [data["accuracy_before"]] + [r.get("accuracy") for r in records]
        points = [(i, a) for i, a in enumerate(accuracy) if a is not None]
        bottom.plot([p for p, _ in points], [a * 100 for _, a in points], "o-", color="tab:green")
        for p, a in points:
            bottom.annotate(f"{a:.2%}", (p, a * 100), xytext=(0, 6), textcoords="offset points",
                            ha="center", fontsize=8)  # fmt: skip
        bottom.set_ylabel("top-1 accuracy %")
        bottom.set_title("top-1 accuracy after each pass")
        low = min(a for _, a in points) * 100
        bottom.set_ylim(max(0.0, low - 5), min(100.0, max(a for _, a in points) * 100 + 2) + 0.5)
    else:
        points = [(i + 1, min(d["cosine"] for d in r["check"]))
                  for i, r in enumerate(records) if r.get("check")]  # fmt: skip
        if points:
            points.insert(0, (0, 1.0))
            bottom.plot([p for p, _ in points], [c for _, c in points], "o-", color="tab:purple")
            for p, c in points:
                bottom.annotate(f"{c:.6f}", (p, c), xytext=(0, 6), textcoords="offset points",
                                ha="center", fontsize=8)  # fmt: skip
            bottom.set_title("lowest output cosine vs the input model after each pass")
        else:
            bottom.set_title("no numeric check in this report (--check none)")
        bottom.set_ylabel("cosine")
    bottom.set_xticks(positions, names, rotation=20 if len(names) > 4 else 0)
    bottom.grid(alpha=0.3)
    if data.get("accuracy_before") is None:
        bottom.margins(y=0.25)
    _save_figure(figure, path)


def pipeline_report_from_dict(data: dict[str, Any]) -> PipelineReport:
    """Rebuild a PipelineReport from ``optimize --report`` JSON, to render it again."""
    from onnxcomp.instrument import OutputDiff, Tolerance
    from onnxcomp.pipeline import PassRecord, Snapshot

    def diffs(items: list[dict[str, Any]] | None) -> list[OutputDiff] | None:
        if items is None:
            return None
        return [OutputDiff(**{k: _float(v) if k in ("max_abs", "cosine", "ref_scale") else v
                              for k, v in d.items()}) for d in items]  # fmt: skip

    try:
        records = [
            PassRecord(**{**r, "after": Snapshot(**r["after"]), "check": diffs(r["check"])})
            for r in data["records"]
        ]
        return PipelineReport(**{
            **data,
            "before": Snapshot(**data["before"]),
            "records": records,
            "tolerance": Tolerance(**data["tolerance"]),
        })  # fmt: skip
    except (KeyError, TypeError) as e:
        raise OnnxcompError(f"not an 'onnxcomp optimize --report' file ({e})") from None


def _float(value: Any) -> float:
    return float(value)  # "inf" / "nan" were written as strings by to_json


def _metric_label(metric: str | None) -> str:
    labels = {"accuracy": "top-1", "agreement": "agreement with first", "cosine": "cosine vs first"}
    return labels.get(metric or "", "")


def _metric_text(metric: str | None, value: float) -> str:
    if metric in ("prefill_ms", "decode_tokens_per_s"):  # bench --decode
        return f"{value:,.1f}"
    return f"{value:.6f}" if metric == "cosine" else f"{value:.2%}"


def check_plot_support() -> None:
    """Fail before any work when ``--plot`` is asked for and matplotlib is missing."""
    _matplotlib()


def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'onnxcomp[plot]'") from None
    return Figure, FigureCanvasAgg


def _percent_formatter():
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda value, _: f"{value:.1%}")


def _colour_map():
    from matplotlib import colormaps

    return colormaps["viridis"]


def _bytes_formatter():
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda value, _: format_bytes(int(value)))


def _save_figure(figure: Any, path: str) -> None:
    """Write a PNG atomically (temporary file beside it, then rename)."""
    target = Path(path)
    directory = target.parent if str(target.parent) else Path(".")
    if not directory.is_dir():
        raise UsageError(f"directory {directory} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".png", dir=directory)
    os.close(fd)
    try:
        figure.savefig(tmp, dpi=120, format="png")
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def emit_bench(
    report: BenchReport,
    out: Console,
    *,
    json_path: str | os.PathLike | None = None,
    plot_path: str | os.PathLike | None = None,
) -> None:
    """Print a bench report's table, and write its JSON and plot where asked."""
    data = report.to_dict()
    print_bench(data, out)
    if json_path:
        write_text(json_path, to_json(data))
        out.print(f"wrote {json_path}", highlight=False)
    if plot_path and any(c.status == "ok" for c in report.cells):
        plot_bench(data, plot_path)
        out.print(f"wrote {plot_path}", highlight=False)


def print_sensitivity(data: dict[str, Any], console: Console) -> None:
    """An ``onnxcomp sensitivity`` report: per layer (most sensitive first) and technique, the
    metric drop and bytes saved (and speed-up when timed); or, for ``--passes``, each layer's
    share of that pipeline's error."""
    unit = data["unit"] or ""
    console.print(f"{data['model']}: {data['metric']} {data['base_score']:.4g} on "
                  f"{data['held_out']}; size {format_bytes(data['base_bytes'])}",
                  highlight=False)  # fmt: skip
    if data.get("pipeline"):
        whole = data["pipeline_outcome"]
        console.print(f"pipeline {escape(data['pipeline'])}: drop "
                      f"{_drop_text(whole, unit)}", highlight=False)  # fmt: skip
        table = Table(title="culprits: the metric won back by leaving one layer out",
                      title_justify="left", box=box.SIMPLE_HEAD)  # fmt: skip
        for column in ("layer", "drop without it", "recovered", "share"):
            table.add_column(column, justify="left" if column == "layer" else "right")
        for c in data["culprits"]:
            if c["recovery"] is None:
                table.add_row(escape(c["name"]), "-", "-", escape(c.get("error") or "failed"))
                continue
            table.add_row(escape(c["name"]), f"{c['drop_without']:.2f} {unit}",
                          f"{c['recovery']:+.2f} {unit}", f"{c['share']:.0%}")  # fmt: skip
        console.print(table)
        return
    prefix = f" (after {data['prefix']})" if data["prefix"] else ""
    table = Table(title=f"drop in {data['metric']} when one layer alone is compressed; "
                  f"bytes saved{prefix}; most sensitive first",
                  title_justify="left", box=box.SIMPLE_HEAD)  # fmt: skip
    table.add_column("layer", overflow="fold")
    table.add_column("ops")
    table.add_column("params", justify="right")
    for technique in data["techniques"]:
        table.add_column(technique, justify="right")
    for row in data["layers"]:
        cells = []
        for technique in data["techniques"]:
            outcome = row["results"].get(technique)
            if outcome is None:
                cells.append("[dim]n/a[/dim]")
                continue
            text = _drop_text(outcome, unit)
            if outcome.get("bytes") is not None:
                text += f"\n[dim]-{format_bytes(data['prefix_bytes'] - outcome['bytes'])}[/dim]"
            if outcome.get("speedup"):
                text += f"\n[dim]×{outcome['speedup']:.2f} speed[/dim]"
            cells.append(text)
        table.add_row(escape(row["name"]), ",".join(row["op_types"]), f"{row['params']:,}",
                      *cells)  # fmt: skip
    console.print(table)


def _drop_text(outcome: dict[str, Any], unit: str) -> str:
    if outcome.get("error"):
        return "[red]failed[/red]"
    if outcome.get("drop") is None:
        return "-"
    return f"{outcome['drop']:.2f} {unit}".strip()


def plot_sensitivity(data: dict[str, Any], path: str) -> None:
    """Heatmap of the metric drop, layers x techniques (culprit mode: each layer's share)."""
    figure_class, canvas_class = _matplotlib()
    culprit = bool(data.get("pipeline"))
    if culprit:
        names = [c["name"] for c in data["culprits"]]
        columns = ["recovered"]
        values = [[c["recovery"] if c["recovery"] is not None else math.nan]
                  for c in data["culprits"]]  # fmt: skip
    else:
        names = [row["name"] for row in data["layers"]]
        columns = data["techniques"]
        values = [[(row["results"].get(t) or {}).get("drop", math.nan)
                   if row["results"].get(t) is not None else math.nan for t in columns]
                  for row in data["layers"]]  # fmt: skip
    values = [[math.nan if v is None else v for v in row] for row in values]
    figure = figure_class(figsize=(2.0 + 1.3 * len(columns), 1.5 + 0.4 * len(names)),
                          layout="constrained")  # fmt: skip
    canvas_class(figure)
    axes = figure.subplots()
    image = axes.imshow(values, cmap="magma_r", aspect="auto")
    axes.set_xticks(range(len(columns)), columns, rotation=30 if len(columns) > 3 else 0)
    axes.set_yticks(range(len(names)), names, fontsize=8)
    for i, row in enumerate(values):
        for j, value in enumerate(row):
            axes.text(j, i, "n/a" if math.isnan(value) else f"{value:.2f}", ha="center",
                      va="center", fontsize=7, color="tab:gray")  # fmt: skip
    unit = data["unit"] or data["metric"]
    figure.colorbar(image, ax=axes, label=f"drop ({unit})")
    title = (f"leaving one layer out of {data['pipeline']}" if culprit
             else f"{data['model']}: drop when one layer alone is compressed")  # fmt: skip
    axes.set_title(title, fontsize=9)
    _save_figure(figure, path)


def print_auto(data: dict[str, Any], console: Console) -> None:
    """An ``onnxcomp auto`` result: the Pareto front of the trials (metric against size and
    latency), the count of trials, and the winner."""
    unit = data["unit"] or ""
    trials = data["trials"]
    done = [t for t in trials if t["state"] == "COMPLETE"]
    feasible = [t for t in trials if t["feasible"]]
    console.print(f"{data['model']}: {data['metric']} {data['base_score']:.4g} on "
                  f"{data['held_out']}; size {format_bytes(data['base_bytes'])}; study "
                  f"'{data['study_name']}': {len(trials)} trials, {len(done)} completed, "
                  f"{len(feasible)} within a drop of {data['max_drop']:g} {unit}",
                  highlight=False)  # fmt: skip
    timing = data.get("timing") or {}
    if timing:
        console.print(f"latency: ONNX Runtime CPU, batch {timing['batch']}, "
                      f"{timing['threads']} thread(s), interleaved with the input model",
                      highlight=False)  # fmt: skip
    if data.get("retimed"):
        numbers = ", ".join(str(n) for n in data["retimed"])
        console.print(f"finalists timed again together before choosing: trials {numbers}",
                      highlight=False)  # fmt: skip
    pareto = set(data["pareto"])
    best = data["best"]["number"] if data.get("best") else None
    table = Table(title="Pareto front (metric vs size and latency; * = best within the bound)",
                  title_justify="left", box=box.SIMPLE_HEAD)  # fmt: skip
    for column in ("trial", "from", "drop", "size", "latency", "pipeline"):
        table.add_column(column, justify="left" if column in ("from", "pipeline") else "right",
                         overflow="fold")  # fmt: skip
    shown = [t for t in trials if t["number"] in pareto or t["number"] == best]
    for t in sorted(shown, key=lambda t: (t["outcome"]["bytes"] or 0)):
        o = t["outcome"]
        mark = "*" if t["number"] == best else ""
        drop = _drop_text(o, unit) + ("" if t["feasible"] else " [red](over)[/red]")
        size = f"{format_bytes(o['bytes'])}\n[dim]{o['size_ratio']:.1f}x smaller[/dim]"
        speed = "-" if o["latency_ms"] is None else (
            f"{o['latency_ms']:.3f} ms\n[dim]×{o['speedup']:.2f} speed[/dim]")  # fmt: skip
        table.add_row(f"{t['number']}{mark}", t["source"], drop, size, speed,
                      escape(o["pipeline"]))  # fmt: skip
    console.print(table)


def plot_auto(data: dict[str, Any], path: str) -> None:
    """Every completed trial: metric drop against size and against speed-up; trials within the
    bound in colour, the Pareto front joined, the winner circled."""
    figure_class, canvas_class = _matplotlib()
    done = [t for t in data["trials"] if t["state"] == "COMPLETE"]
    figure = figure_class(figsize=(11, 4.5), layout="constrained")
    canvas_class(figure)
    left, right = figure.subplots(1, 2, sharey=True)
    best = data["best"]["number"] if data.get("best") else None
    pareto = set(data["pareto"])
    for axes, key, label in ((left, "size_ratio", "times smaller than the input"),
                             (right, "speedup", "speed-up over the input (ORT CPU)")):  # fmt: skip
        for feasible, colour in ((True, "tab:green"), (False, "tab:gray")):
            points = [(t["outcome"][key], t["outcome"]["drop"]) for t in done
                      if t["feasible"] == feasible and t["outcome"][key] is not None]  # fmt: skip
            if points:
                axes.scatter(*zip(*points, strict=True), color=colour, s=18,
                             label="within the bound" if feasible else "over the bound")
        front = sorted((t["outcome"][key], t["outcome"]["drop"]) for t in done
                       if t["number"] in pareto and t["outcome"][key] is not None)  # fmt: skip
        if front:
            axes.plot(*zip(*front, strict=True), "--", color="tab:blue", lw=1, label="Pareto")
        for t in done:
            if t["number"] == best and t["outcome"][key] is not None:
                axes.scatter([t["outcome"][key]], [t["outcome"]["drop"]], s=120,
                             facecolors="none", edgecolors="tab:red", label="best")
        axes.axhline(data["max_drop"], color="tab:red", lw=0.8, ls=":")
        axes.set_xlabel(label)
        axes.grid(alpha=0.3)
    left.set_ylabel(f"drop in {data['metric']} ({data['unit'] or 'units'})")
    left.legend(fontsize=8)
    left.set_title(f"{data['model']}: {len(done)} trials, objective {data['objective']}",
                   fontsize=9)  # fmt: skip
    _save_figure(figure, path)
