"""The onnx wheel's light model-zoo architectures in the zoo's own layout (IR 3, opset 9, every
weight an initializer also listed as a graph input; random weights, see
tests/matrix_cases.zoo_layout): file size before and after ``simplify``, ``int8`` and
``prune-channels:ratio=0.25``, BatchNorms folded, output cosine, and whether outputs keep
their shapes.

    python benchmarks/zoo.py                         # all nine (VGG-19 alone is 575 MB)
    python benchmarks/zoo.py --models squeezenet,shufflenet --json zoo.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import onnx
from rich import box
from rich.table import Table

import onnxcomp
from onnxcomp.errors import OnnxcompError
from onnxcomp.instrument import LossBound, min_cosine
from onnxcomp.report import console, format_bytes
from tests import matrix_cases as mc

PIPELINES = ("simplify", "int8", "prune-channels:ratio=0.25")


def measure(name: str, folder: Path) -> list[dict]:
    """One row per pipeline for the zoo-layout model ``name``."""
    source = folder / f"{name}.onnx"
    onnx.save(mc.zoo_layout(name), source)
    rows = []
    for pipeline in PIPELINES:
        output = folder / "out.onnx"
        row: dict = {"model": name, "pipeline": pipeline, "bytes_before": source.stat().st_size}
        try:
            _, report = onnxcomp.optimize(source, pipeline, output=output,
                                          bound=LossBound(allow_loss=True))  # fmt: skip
        except OnnxcompError as e:
            rows.append({**row, "error": str(e)})
            continue
        record = report.records[-1]
        row.update(
            bytes_after=report.file_bytes_after,
            ratio=report.file_bytes_after / row["bytes_before"],
            batchnorms=f"{report.before.op_counts.get('BatchNormalization', 0)} -> "
            f"{report.after.op_counts.get('BatchNormalization', 0)}",
            cosine=min_cosine(record.check or []),
            shapes_kept=not any(d.shape_mismatch for d in record.check or []),
            seconds=sum(r.seconds for r in report.records),
        )
        rows.append(row)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(mc.LIGHT_MODELS))
    parser.add_argument("--json", help="write the rows as JSON here")
    args = parser.parse_args()
    rows = []
    out = console()
    with tempfile.TemporaryDirectory(prefix="onnxcomp-zoo-") as tmp:
        for name in args.models.split(","):
            rows += measure(name, Path(tmp))
            out.print(f"{name}: done", highlight=False)
    table = Table(title="light zoo models, zoo layout", box=box.SIMPLE, title_justify="left")
    for column in ("model", "pipeline", "before", "after", "ratio", "BatchNorm", "cosine",
                   "shapes kept", "seconds"):  # fmt: skip
        table.add_column(column, justify="left" if column in ("model", "pipeline") else "right")
    for row in rows:
        if "error" in row:
            table.add_row(row["model"], row["pipeline"], format_bytes(row["bytes_before"]),
                          row["error"][:60], "", "", "", "", "")  # fmt: skip
            continue
        table.add_row(
            row["model"], row["pipeline"], format_bytes(row["bytes_before"]),
            format_bytes(row["bytes_after"]), f"{row['ratio']:.3f}x", row["batchnorms"],
            f"{row['cosine']:.4f}" if row["cosine"] is not None else "-",
            "yes" if row["shapes_kept"] else "NO", f"{row['seconds']:.1f}",
        )  # fmt: skip
    out.print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
