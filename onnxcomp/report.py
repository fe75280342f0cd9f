"""Render reports for people (rich tables) and for programs (JSON).

Nothing here computes anything about a model: it formats what the pipeline and the analyses
measured.
"""

from __future__ import annotations

import json
import math
from typing import Any

from rich.console import Console
from rich.table import Table

from onnxcomp.analysis.summary import ModelSummary
from onnxcomp.pipeline import PipelineReport


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
    for record in report.records:
        for note in record.notes:
            console.print(f"note ({record.name}): {note}", highlight=False)


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
            io_table.add_row(kind, name, dtype, shape)
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
