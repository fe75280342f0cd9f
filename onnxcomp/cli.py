"""The ``onnxcomp`` command: optimize, passes, inspect.

Every failure a user can cause prints one line on stderr and exits non-zero: 2 for how the
command was called (unknown pass or option, bad path), 1 for the model or data. A traceback
appears only with ``--debug``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

from onnxcomp.errors import OnnxcompError, UsageError

DEBUG_HINT = "run with --debug for the traceback"


class _Parser(argparse.ArgumentParser):
    """argparse, but its errors are one line and a UsageError (exit code 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="onnxcomp", description="Compress ONNX models with verified passes.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and library logs")
    commands = parser.add_subparsers(dest="command", parser_class=_Parser)

    optimize = commands.add_parser("optimize", help="run passes on a model and write the result")
    optimize.add_argument("model", help="input .onnx file (never modified)")
    optimize.add_argument("--passes", "-p", required=True,
                          help="e.g. simplify,fold-bn or prune:sparsity=0.8,int4:block_size=32")
    optimize.add_argument("-o", "--output", required=True, help="output .onnx file")
    optimize.add_argument("--data", help=".npz of real inputs keyed by input name (+ labels)")
    optimize.add_argument("--shape", action="append", default=[], metavar="NAME=1x128",
                          help="shape for random check inputs with dynamic dims (repeatable)")
    optimize.add_argument("--report", help="write the per-pass report as JSON here")
    optimize.add_argument("--check", choices=("each", "final", "none"), default="each",
                          help="numeric check against the input model after each pass (default), "
                          "after the last, or never")
    optimize.add_argument("--check-samples", type=int, default=512,
                          help="samples of --data the check runs on (default 512)")
    optimize.add_argument("--atol", type=float, default=1e-4, help="absolute tolerance")
    optimize.add_argument("--rtol", type=float, default=1e-3,
                          help="tolerance relative to the largest reference output")
    optimize.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    commands.add_parser("passes", help="list the passes and their options")

    inspect = commands.add_parser("inspect", help="size, parameters, sparsity and ops of a model")
    inspect.add_argument("model")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of tables")
    inspect.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    if not debug:
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
    try:
        args = build_parser().parse_args(argv)
        if args.version:
            from onnxcomp import __version__

            print(__version__)
            return 0
        if args.command is None:
            raise UsageError("give a command: optimize, passes or inspect (see 'onnxcomp --help')")
        return {"optimize": _optimize, "passes": _passes, "inspect": _inspect}[args.command](args)
    except OnnxcompError as e:
        if debug:
            raise
        _fail(str(e))
        return e.exit_code
    except KeyboardInterrupt:
        _fail("interrupted")
        return 130
    except Exception as e:
        if debug:
            raise
        _fail(f"internal error: {type(e).__name__}: {e} ({DEBUG_HINT})")
        return 1


def _fail(message: str) -> None:
    print(f"onnxcomp: error: {' '.join(message.split())}", file=sys.stderr)


def _optimize(args: argparse.Namespace) -> int:
    import onnxcomp
    from onnxcomp.data import parse_shapes
    from onnxcomp.io import write_text
    from onnxcomp.report import console as make_console
    from onnxcomp.report import print_pipeline, to_json

    if args.report and Path(args.report).resolve() == Path(args.model).resolve():
        raise UsageError("--report would overwrite the input model")
    console = make_console()
    with console.status(f"running {args.passes} on {args.model} ..."):
        _, report = onnxcomp.optimize(
            args.model,
            args.passes,
            data=args.data,
            shapes=parse_shapes(args.shape),
            output=args.output,
            tolerance=onnxcomp.Tolerance(args.atol, args.rtol),
            check=args.check,
            check_samples=args.check_samples,
        )
    print_pipeline(report, console)
    console.print(f"wrote {args.output}", highlight=False)
    if args.report:
        write_text(args.report, to_json(report.to_dict()))
        console.print(f"wrote {args.report}", highlight=False)
    return 0


def _passes(args: argparse.Namespace) -> int:
    from rich.table import Table

    from onnxcomp.registry import PASSES
    from onnxcomp.report import console as make_console

    console = make_console()
    for name, spec in PASSES.items():
        console.print(f"[bold]{name}[/bold]  {spec.summary}", highlight=False)
        options = spec.options_class().describe()
        if not options:
            console.print("    (no options)")
            continue
        table = Table(show_header=True, box=None, padding=(0, 2))
        for column in ("option", "type", "default", "help"):
            table.add_column(column)
        for option_name, type_name, default, help_text in options:
            default = spec.presets.get(option_name, default)
            table.add_row(f"    {option_name}", type_name, repr(default), help_text)
        console.print(table)
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from onnxcomp.analysis.summary import summarize
    from onnxcomp.io import external_files, load
    from onnxcomp.report import console as make_console
    from onnxcomp.report import print_summary, summary_dict, to_json

    model = load(args.model)
    file_bytes = Path(args.model).stat().st_size + sum(
        p.stat().st_size for p in external_files(model) if p.exists()
    )
    summary = summarize(model)
    if args.json:
        print(to_json(summary_dict(summary, path=args.model, file_bytes=file_bytes)), end="")
    else:
        print_summary(summary, make_console(), path=args.model, file_bytes=file_bytes)
    return 0
