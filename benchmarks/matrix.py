"""Every registered pass on every model of the matrix (tests/matrix_cases.py), as a table.

    python benchmarks/matrix.py                      # the whole matrix (light zoo models: long)
    python benchmarks/matrix.py --models 'light/*' --passes simplify,int8 --jobs 2
    python benchmarks/matrix.py --skip-group 'light (zoo layout)' --json matrix.json

Each cell is ``ok`` (the written model passes onnx.checker, loads in ONNX Runtime, keeps its
output shapes and stays finite), ``-`` (onnxcomp refused in one line, the reason is listed),
or ``FAIL`` (listed with what went wrong). Exit status 1 when any pair failed.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
import tempfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich import box
from rich.table import Table

from onnxcomp.report import console
from tests import matrix_cases as mc

MARKS = {"ok": "ok", "refused": "[yellow]-[/yellow]", "failed": "[bold red]FAIL[/bold red]"}


def _judge(job: tuple[str, str, str]) -> mc.Outcome:
    model_name, pass_name, root = job
    spec = {m.name: m for m in mc.all_models()}[model_name]
    with tempfile.TemporaryDirectory(dir=root) as folder:
        return mc.judge(spec, pass_name, Path(folder))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="*", help="fnmatch pattern(s) over model names, "
                        "comma-separated")
    parser.add_argument("--skip-group", action="append", default=[], help="a group to leave out")
    parser.add_argument("--skip", default="", help="fnmatch pattern(s) of models to leave out, "
                        "comma-separated (e.g. light/vgg19: 575 MB)")
    parser.add_argument("--passes", help="comma-separated pass names (default: all)")
    parser.add_argument("--jobs", type=int, default=1, help="pairs run in parallel")
    parser.add_argument("--json", help="write the outcomes as JSON here")
    args = parser.parse_args()

    patterns, skips = args.models.split(","), [p for p in args.skip.split(",") if p]
    models = [
        m for m in mc.all_models()
        if any(fnmatch.fnmatchcase(m.name, p) for p in patterns) and m.group not in args.skip_group
        and not any(fnmatch.fnmatchcase(m.name, p) for p in skips)
    ]  # fmt: skip
    passes = args.passes.split(",") if args.passes else mc.matrix_passes()
    out = console()
    with tempfile.TemporaryDirectory(prefix="onnxcomp-matrix-") as root:
        jobs = [(m.name, p, root) for m in models for p in passes]
        with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            outcomes = []
            for done, outcome in enumerate(pool.map(_judge, jobs), 1):
                outcomes.append(outcome)
                if outcome.status == "failed":
                    out.print(f"[{done}/{len(jobs)}] FAIL {outcome.model} x {outcome.pass_name}: "
                              f"{outcome.detail}", highlight=False, markup=False)
    by_pair = {(o.model, o.pass_name): o for o in outcomes}

    table = Table(title="pass x model", box=box.SIMPLE, title_justify="left")
    table.add_column("model")
    for p in passes:
        table.add_column(p, justify="center")
    for m in models:
        table.add_row(m.name, *(MARKS[by_pair[(m.name, p)].status] for p in passes))
    out.print(table)

    counts = Counter(o.status for o in outcomes)
    reasons = Counter(_reason(o.detail) for o in outcomes if o.status == "refused")
    out.print("refusals (one-line reasons), most common first:", highlight=False)
    for reason, count in reasons.most_common():
        out.print(f"  {count:4d}  {reason}", highlight=False, markup=False)
    for o in outcomes:
        if o.status == "failed":
            out.print(f"FAIL {o.model} x {o.pass_name}: {o.detail}", highlight=False,
                      markup=False)  # fmt: skip
    seconds = sum(o.seconds for o in outcomes)
    out.print(
        f"{len(outcomes)} pairs ({len(models)} models x {len(passes)} passes): "
        f"{counts['ok']} ok, {counts['refused']} refused with a reason, {counts['failed']} "
        f"failed; {seconds:.0f} s of pass time",
        highlight=False,
    )
    if args.json:
        Path(args.json).write_text(json.dumps([o.__dict__ for o in outcomes], indent=1))
    return 1 if counts["failed"] else 0


def _reason(detail: str) -> str:
    """A refusal without the model-specific part (names, numbers after the pass prefix)."""
    return detail.split(" (")[0][:160]


if __name__ == "__main__":
    sys.exit(main())
