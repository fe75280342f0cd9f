"""The ``onnxcomp`` command: optimize, passes, inspect, bench, report, sensitivity, auto.

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
from onnxcomp.instrument import DEFAULT_MAX_DROP, DEFAULT_MIN_COSINE
from onnxcomp.pipeline import STREAM_ABOVE_BYTES
from onnxcomp.target import DEFAULT_TARGET, TARGET_NAMES

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
    _add_target_argument(optimize)
    optimize.add_argument("--max-drop", type=float, default=DEFAULT_MAX_DROP, metavar="POINTS",
                          help="fail (write nothing) if top-1 accuracy on --data's labels falls "
                          f"more than this many points (default {DEFAULT_MAX_DROP:g}; -1: off)")
    optimize.add_argument("--min-cosine", type=float, metavar="C",
                          help="fail (write nothing) if any output's cosine to the input "
                          f"model's falls below C (default {DEFAULT_MIN_COSINE:g} when --data "
                          "has no labels, off when it has; -1: off)")
    optimize.add_argument("--allow-loss", action="store_true",
                          help="write the result even if it is below --max-drop/--min-cosine")
    optimize.add_argument("--keep-initializer-inputs", action="store_true",
                          help="initializers also listed as graph inputs (old exporters) stay "
                          "inputs a caller may override, and passes leave them alone (default: "
                          "they are weights)")
    optimize.add_argument("--stream-above", type=float, default=STREAM_ABOVE_BYTES / 1e9,
                          metavar="GB",
                          help="a model with more weights than this is rewritten a tensor at a "
                          "time and checked on a sample of its layers, each run alone, instead "
                          f"of whole (default {STREAM_ABOVE_BYTES / 1e9:g})")
    optimize.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    commands.add_parser("passes", help="list the passes and their options")

    doctor = commands.add_parser(
        "doctor", help="this machine: CPU instruction sets, ONNX Runtime, what int8 passes do here"
    )
    _add_target_argument(doctor, default="host")
    doctor.add_argument("--json", action="store_true", help="print JSON instead of tables")
    doctor.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    inspect = commands.add_parser("inspect", help="size, parameters, sparsity and ops of a model")
    inspect.add_argument("model")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of tables")
    inspect.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    bench = commands.add_parser(
        "bench", help="size, latency, memory and accuracy of models side by side",
        description="Measure every model under every provider x threads x batch setting. Ratios "
        "are to the first model. A model that fails is reported and the others are still "
        "measured; the exit code is 1 only if every model failed (130 on Ctrl-C, after printing "
        "what was measured).",
    )  # fmt: skip
    bench.add_argument("models", nargs="+", help=".onnx files; the first is the baseline")
    bench.add_argument("--providers", default="cpu",
                       help="comma-separated: cpu, cuda, tensorrt, ... (default cpu); one that "
                       "this onnxruntime lacks is noted in the table")
    bench.add_argument("--threads", default="1",
                       help="intra-op thread counts, comma-separated; 0 = ONNX Runtime's default "
                       "(default 1)")
    bench.add_argument("--batch", default="1", help="batch sizes, comma-separated (default 1)")
    bench.add_argument("--data", help=".npz of real inputs (+ labels): feeds, and accuracy or "
                       "agreement with the first model")
    bench.add_argument("--shape", action="append", default=[], metavar="NAME=1x128",
                       help="shape of random inputs (without --data); the batch dim is replaced")
    bench.add_argument("--samples", type=int, default=512,
                       help="samples of --data the accuracy figures use (default 512)")
    bench.add_argument("--runs", type=int, default=100,
                       help="measured runs per model and setting (default 100)")
    bench.add_argument("--warmup", type=int, default=10,
                       help="warm-up runs per model and setting, not recorded (default 10)")
    bench.add_argument("--time-budget", type=float, metavar="SECONDS",
                       help="stop a setting's runs once this many seconds are spent")
    bench.add_argument("--level", choices=("disable", "basic", "extended", "all"), default="all",
                       help="ONNX Runtime graph optimisation level (default all)")
    bench.add_argument("--provider-option", action="append", default=[],
                       metavar="PROVIDER:KEY=VALUE",
                       help="passed to the provider, e.g. cuda:device_id=1 (repeatable)")
    bench.add_argument("--no-memory", action="store_true",
                       help="skip the peak-memory probe (a child process per model and setting)")
    bench.add_argument("--decode", type=int, default=0, metavar="N",
                       help="decoders with a KV cache: prefill ms and tokens/s generating N "
                       "tokens after the prompt (--shape input_ids=1x64 sets the prompt)")
    bench.add_argument("--json", help="write the results as JSON here")
    bench.add_argument("--plot", help="write a PNG of latency vs size here (needs matplotlib)")
    bench.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    report = commands.add_parser(
        "report", help="render a JSON report of optimize --report or bench --json again"
    )
    report.add_argument("report", help="the JSON file")
    report.add_argument("--plot", help="write a PNG: the per-pass trail of an optimize report, "
                        "latency vs size of a bench report (needs matplotlib)")
    report.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    from onnxcomp.passes.distill import DistillOptions

    distill = commands.add_parser(
        "distill", help="train a smaller student model to mimic a teacher model",
        description="Train --student (an ONNX model with the teacher's input and output names, "
        "or a torch module given as module:Class) against the teacher on --data; write the "
        "trained student. Under torchrun --nproc_per_node N it trains with "
        "DistributedDataParallel and rank 0 writes. Options as in the distill pass.",
    )  # fmt: skip
    distill.add_argument("teacher", help="the teacher .onnx (never modified)")
    distill.add_argument("--student", required=True,
                         help="student .onnx, or a torch module as module:Class or file.py:Class")
    distill.add_argument("--student-args", metavar="JSON",
                         help="constructor arguments of a module:Class student, a JSON object")
    distill.add_argument("--data", help=".npz of training inputs keyed by the teacher's input "
                         "names (+ labels)")
    distill.add_argument("-o", "--output", required=True, help="output .onnx file")
    distill.add_argument("--report", help="write the report as JSON here")
    for name, type_name, default, help_text in DistillOptions.describe():
        distill.add_argument(f"--{name.replace('_', '-')}", dest=f"option_{name}",
                             metavar=type_name.upper().replace(" ", "_"),
                             help=f"{help_text} (default {_option_text(default) or 'none'})")
    distill.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    _add_search_commands(commands)
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
            raise UsageError("give a command: optimize, passes, doctor, inspect, bench, report, "
                             "distill, sensitivity or auto "
                             "(see 'onnxcomp --help')")
        commands = {
            "optimize": _optimize,
            "passes": _passes,
            "doctor": _doctor,
            "inspect": _inspect,
            "bench": _bench,
            "report": _report,
            "distill": _distill,
            "sensitivity": _sensitivity,
            "auto": _auto,
        }
        return commands[args.command](args)
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


def _add_target_argument(parser: argparse.ArgumentParser, default: str = DEFAULT_TARGET) -> None:
    parser.add_argument(
        "--target", choices=TARGET_NAMES, default=default,
        help="the machine the model is for: picks the integer layout of int8 passes (default "
        "portable: right on every x86-64 with AVX2 and on ARM64; host: this machine)",
    )  # fmt: skip


def _fail(message: str) -> None:
    print(f"onnxcomp: error: {' '.join(message.split())}", file=sys.stderr)


def _optimize(args: argparse.Namespace) -> int:
    import onnxcomp
    from onnxcomp.data import parse_shapes
    from onnxcomp.io import guard_paths, is_main_process, write_text
    from onnxcomp.report import console as make_console
    from onnxcomp.report import print_pipeline, to_json

    guard_paths(
        {"the input model": args.model, "--data": args.data},
        {"-o": args.output, "--report": args.report},
        models_written={"-o"},
    )
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
            target=args.target,
            bound=onnxcomp.LossBound(
                max_drop=None if args.max_drop < 0 else args.max_drop,
                min_cosine=args.min_cosine,
                allow_loss=args.allow_loss,
            ),
            keep_initializer_inputs=args.keep_initializer_inputs,
            stream_above=int(args.stream_above * 1e9),
        )
    if not is_main_process():
        return 0  # torchrun workers: rank 0 prints and writes
    print_pipeline(report, console)
    console.print(f"wrote {args.output}", highlight=False)
    if args.report:
        write_text(args.report, to_json(report.to_dict()))
        console.print(f"wrote {args.report}", highlight=False)
    return 0


def _passes(args: argparse.Namespace) -> int:
    from rich.markup import escape
    from rich.table import Table

    from onnxcomp.registry import PASSES
    from onnxcomp.report import console as make_console

    console = make_console()
    for name, spec in PASSES.items():
        console.print(f"[bold]{name}[/bold]  {escape(spec.summary)}", highlight=False)
        options = spec.options_class().describe()
        if not options:
            console.print("    (no options)")
            continue
        table = Table(show_header=True, box=None, padding=(0, 2))
        for column in ("option", "type", "default", "help"):
            table.add_column(column)
        for option_name, type_name, default, help_text in options:
            default = spec.presets.get(option_name, default)
            table.add_row(
                f"    {option_name}", escape(type_name), escape(_option_text(default)),
                escape(help_text),
            )  # fmt: skip
        console.print(table)
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from onnxcomp.report import console as make_console
    from onnxcomp.report import print_machine, to_json
    from onnxcomp.target import machine_report, resolve_target

    report = machine_report(resolve_target(args.target))
    if args.json:
        print(to_json(report), end="")
    else:
        print_machine(report, make_console())
    return 0


def _option_text(value: object) -> str:
    """A default as it would be written in a pipeline string (lists joined with +)."""
    if isinstance(value, tuple):
        return "+".join(map(str, value)) or "(none)"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


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


def _bench(args: argparse.Namespace) -> int:
    from onnxcomp.bench import BenchOptions, parse_provider_options, run_bench
    from onnxcomp.data import parse_shapes
    from onnxcomp.io import guard_paths
    from onnxcomp.report import check_plot_support, emit_bench, progress_bar
    from onnxcomp.report import console as make_console

    options = BenchOptions(
        providers=tuple(p for p in args.providers.split(",") if p.strip()),
        threads=_int_list(args.threads, "--threads"),
        batches=_int_list(args.batch, "--batch"),
        runs=args.runs,
        warmup=args.warmup,
        time_budget=args.time_budget,
        level=args.level,
        provider_options=parse_provider_options(args.provider_option),
        shapes=parse_shapes(args.shape),
        samples=args.samples,
        memory=not args.no_memory,
        decode=args.decode,
    )
    options.validate()
    reads = {f"the input model {m}": m for m in args.models}
    guard_paths({**reads, "--data": args.data}, {"--json": args.json, "--plot": args.plot})
    if args.plot:
        check_plot_support()

    console = make_console()
    with progress_bar() as progress:
        report = run_bench(args.models, options, data=args.data, progress=progress)
    emit_bench(report, console, json_path=args.json, plot_path=args.plot)
    if report.interrupted:
        _fail("interrupted; the table shows what was measured so far")
        return 130
    failed = report.failed_models()
    if failed and len(failed) == len(report.models):
        _fail("every model failed (see the table)")
        return 1
    return 0


def _int_list(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"bad {flag} '{text}': expected integers separated by commas") from None
    if not values:
        raise UsageError(f"{flag} is empty")
    return values


def _report(args: argparse.Namespace) -> int:
    import json

    from onnxcomp.io import guard_paths
    from onnxcomp.report import (
        check_plot_support,
        pipeline_report_from_dict,
        plot_bench,
        plot_trail,
        print_bench,
        print_pipeline,
    )
    from onnxcomp.report import console as make_console

    path = Path(args.report)
    if not path.is_file():
        raise UsageError(f"no such report file: {path}")
    if args.plot:
        check_plot_support()
        guard_paths({"the report": path}, {"--plot": args.plot})
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise OnnxcompError(f"{path} is not a JSON report ({e})") from None
    console = make_console()
    if isinstance(data, dict) and data.get("kind") == "onnxcomp-bench":
        print_bench(data, console)
        if args.plot:
            plot_bench(data, args.plot)
    elif isinstance(data, dict) and "records" in data and "pipeline" in data:
        print_pipeline(pipeline_report_from_dict(data), console)
        if args.plot:
            plot_trail(data, args.plot)
    else:
        raise OnnxcompError(f"{path} is neither an 'onnxcomp optimize --report' nor an "
                            "'onnxcomp bench --json' file")
    if args.plot:
        console.print(f"wrote {args.plot}", highlight=False)
    return 0


def _distill(args: argparse.Namespace) -> int:
    import onnxcomp
    from onnxcomp.data import load_data
    from onnxcomp.io import guard_paths, is_main_process, load, write_text
    from onnxcomp.passes.distill import DistillOptions, DistillPass, require_torch

    require_torch()
    from onnxcomp.distill.student import is_module_spec
    from onnxcomp.report import console as make_console
    from onnxcomp.report import print_pipeline, to_json

    if not args.data:
        raise UsageError("distill needs --data FILE.npz: the inputs to train on")
    student_file = None if is_module_spec(args.student) else args.student
    guard_paths(
        {"the teacher": args.teacher, "the student": student_file, "--data": args.data},
        {"-o": args.output, "--report": args.report},
        models_written={"-o"},
    )
    values = {
        key.removeprefix("option_"): value
        for key, value in vars(args).items()
        if key.startswith("option_") and value is not None
    }
    options = DistillOptions.from_strings(values, pass_name="distill")
    teacher = load(args.teacher)
    data = load_data(args.data, teacher)
    main = is_main_process()
    console = make_console()

    if is_module_spec(args.student):
        from onnxcomp.io import save
        from onnxcomp.passes.distill import distill_torch_student

        model, stats = distill_torch_student(teacher, args.student, args.student_args, data,
                                             options)  # fmt: skip
        if main:
            size = save(model, args.output)
            for key, value in {**stats, "file_bytes": size}.items():
                console.print(f"{key}: {value}", highlight=False)
            console.print(f"wrote {args.output}", highlight=False)
            if args.report:
                write_text(args.report, to_json({**stats, "file_bytes": size}))
        return 0
    if args.student_args:
        raise UsageError("--student-args is for a module:Class student, not an ONNX file")
    student = load(args.student)
    _check_same_signature(teacher, student)
    _, report = onnxcomp.optimize(
        student, [DistillPass(options, teacher=teacher)], data=data,
        output=args.output if main else None, check="final",
    )  # fmt: skip
    if main:
        print_pipeline(report, console)
        console.print(f"wrote {args.output}", highlight=False)
        if args.report:
            write_text(args.report, to_json(report.to_dict()))
            console.print(f"wrote {args.report}", highlight=False)
    return 0


def _check_same_signature(teacher, student) -> None:
    """An ONNX student takes the teacher's inputs and gives its outputs, by name."""
    from onnxcomp.data import graph_inputs

    for what, get in (("inputs", lambda m: [v.name for v in graph_inputs(m)]),
                      ("outputs", lambda m: [v.name for v in m.graph.outputs])):  # fmt: skip
        if sorted(get(teacher)) != sorted(get(student)):
            raise OnnxcompError(
                f"the student's {what} ({', '.join(get(student))}) are not the teacher's "
                f"({', '.join(get(teacher))}): they must match by name"
            )


def _add_search_commands(commands: argparse._SubParsersAction) -> None:
    """``sensitivity`` and ``auto``: searches over pipelines (onnxcomp.search)."""
    from onnxcomp.search import DEFAULT_TECHNIQUES, TECHNIQUES
    from onnxcomp.search.auto import DEFAULT_TRIALS, OBJECTIVES
    from onnxcomp.search.metrics import DEFAULT_HOLDOUT

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("model", help="input .onnx file (never modified)")
        p.add_argument("--data", required=True, help=".npz of real inputs (+ labels): passes "
                       "calibrate and train on it, and a held-out share scores the results")
        p.add_argument("--eval-data", help=".npz the metric is judged on instead of a held-out "
                       "share of --data (never seen by a pass)")
        p.add_argument("--holdout", type=float, default=DEFAULT_HOLDOUT,
                       help=f"share of --data held out without --eval-data "
                       f"(default {DEFAULT_HOLDOUT:g})")
        p.add_argument("--metric", help="top1 (needs labels; the default with them), cosine "
                       "(the default without), or module:function taking (outputs, arrays) "
                       "and returning a number, higher is better")
        p.add_argument("--workers", type=int, default=1,
                       help="processes that score layers in parallel (default 1)")
        p.add_argument("--batch", type=int, default=1,
                       help="batch size latency is timed at (ORT CPU): the one the model will "
                       "be served at (default 1; at 32 int8 and pruning pay off far more)")
        p.add_argument("--threads", type=int, default=1,
                       help="intra-op threads latency is timed with (default 1)")
        _add_target_argument(p)
        p.add_argument("--json", help="write the results as JSON here")
        p.add_argument("--plot", help="write a PNG here (needs matplotlib)")
        p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    sensitivity = commands.add_parser(
        "sensitivity", help="per-layer cost of each technique, or the culprits of a pipeline",
        description="For each weight layer and technique, apply it to that layer alone and "
        "measure the metric drop on held-out data and the bytes saved (--latency: the speed-up "
        "too). --passes P explains P instead: the metric each layer's absence wins back.",
    )  # fmt: skip
    common(sensitivity)
    sensitivity.add_argument("--techniques", default=",".join(DEFAULT_TECHNIQUES),
                             help=f"comma-separated, from {', '.join(TECHNIQUES)} "
                             "(default %(default)s)")  # fmt: skip
    sensitivity.add_argument("--passes", "-p", help="a pipeline whose error to attribute to "
                             "layers (leave-one-layer-out)")  # fmt: skip
    sensitivity.add_argument("--latency", action="store_true",
                             help="also time each result against the input (ORT CPU)")

    auto = commands.add_parser(
        "auto", help="search prune x quantise x distill for the smallest/fastest model within a "
        "metric drop",
        description="Search the registered passes and their options (per-layer precision, "
        "pruning, low-rank, int8 activations, distillation) with Optuna for the best model "
        "whose metric on held-out data drops at most --max-drop; write it and print the "
        "pipeline that reproduces it. Exit 1, writing nothing, when no trial meets the bound.",
    )  # fmt: skip
    common(auto)
    auto.add_argument("-o", "--output", required=True, help="output .onnx file")
    auto.add_argument("--max-drop", type=float, default=1.0, metavar="DROP",
                      help="largest metric drop allowed (top-1 points, cosine x100 points, or "
                      "the custom metric's units; default 1)")
    auto.add_argument("--objective", choices=OBJECTIVES, default="size",
                      help="minimise file size, latency (ORT CPU, at --batch), or both "
                      "(default size)")
    auto.add_argument("--trials", type=int, default=DEFAULT_TRIALS,
                      help=f"trials in the study, all processes together (default "
                      f"{DEFAULT_TRIALS})")
    auto.add_argument("--time-budget", type=float, metavar="SECONDS",
                      help="stop starting trials after this many seconds")
    auto.add_argument("--storage", help="keep the study here: a journal file (shareable by "
                      "processes through file locks) or a database URL (sqlite:///s.db)")
    auto.add_argument("--resume", action="store_true",
                      help="continue (or join) the study in --storage")
    auto.add_argument("--study-name", help="name of the study in --storage")
    auto.add_argument("--distill-epochs", help="epoch choices for distillation, comma-"
                      "separated (default 0,10,30 with torch; 0 turns it off)")
    auto.add_argument("--distill-options", default="",
                      help="extra distill options, e.g. lr=0.003:batch_size=64")


def _search_paths(args: argparse.Namespace, written: dict[str, str | None]) -> None:
    from onnxcomp.io import guard_paths
    from onnxcomp.report import check_plot_support

    guard_paths({"the input model": args.model, "--data": args.data,
                 "--eval-data": args.eval_data}, written,
                models_written={"-o"} if "-o" in written else set())  # fmt: skip
    if args.plot:
        check_plot_support()


def _timing(args: argparse.Namespace):
    """The latency measurement of ``sensitivity --latency`` and ``auto``: ``--batch`` and
    ``--threads`` (a one-line error below 1)."""
    from onnxcomp.search import Timing

    for flag, value in (("--batch", args.batch), ("--threads", args.threads)):
        if value < 1:
            raise UsageError(f"{flag} must be >= 1, not {value}")
    return Timing(batch=args.batch, threads=args.threads)


def _sensitivity(args: argparse.Namespace) -> int:
    import onnxcomp
    from onnxcomp.report import console as make_console
    from onnxcomp.report import plot_sensitivity, print_sensitivity, progress_bar
    from onnxcomp.search import parse_techniques

    techniques = parse_techniques(args.techniques) if not args.passes else None
    _search_paths(args, {"--json": args.json, "--plot": args.plot})
    with progress_bar("measuring the input model") as progress:
        report = onnxcomp.sensitivity(
            args.model, args.data, eval_data=args.eval_data, holdout=args.holdout,
            techniques=techniques, passes=args.passes, metric=args.metric, target=args.target,
            latency=args.latency, timing=_timing(args), workers=args.workers,
            progress=progress,
        )  # fmt: skip
    data = report.to_dict()
    console = make_console()
    print_sensitivity(data, console)
    _write_search_outputs(data, args, console, plot_sensitivity)
    return 0


def _write_search_outputs(data: dict, args: argparse.Namespace, console, plot) -> None:
    """``--json`` and ``--plot`` of sensitivity and auto, each said when written."""
    from onnxcomp.io import write_text
    from onnxcomp.report import to_json

    if args.json:
        write_text(args.json, to_json(data))
        console.print(f"wrote {args.json}", highlight=False)
    if args.plot:
        plot(data, args.plot)
        console.print(f"wrote {args.plot}", highlight=False)


def _auto(args: argparse.Namespace) -> int:
    import onnxcomp
    from onnxcomp.errors import LossBoundError
    from onnxcomp.report import console as make_console
    from onnxcomp.report import plot_auto, print_auto, progress_bar
    from onnxcomp.search import fit_data_path

    epochs = None
    if args.distill_epochs is not None:
        epochs = _int_list(args.distill_epochs, "--distill-epochs")
    _search_paths(args, {"-o": args.output, "--json": args.json, "--plot": args.plot})
    console = make_console()
    error = None
    with progress_bar("measuring the input model") as progress:
        try:
            result = onnxcomp.auto(
                args.model, args.data, max_drop=args.max_drop, output=args.output,
                objective=args.objective, eval_data=args.eval_data, holdout=args.holdout,
                metric=args.metric, target=args.target, trials=args.trials,
                time_budget=args.time_budget, storage=args.storage, resume=args.resume,
                study_name=args.study_name, distill_epochs=epochs,
                distill_options=args.distill_options, timing=_timing(args),
                workers=args.workers, progress=progress,
            )  # fmt: skip
        except LossBoundError as e:
            if not hasattr(e, "result"):
                raise
            result, error = e.result, e
    data = result.to_dict()
    print_auto(data, console)
    _write_search_outputs(data, args, console, plot_auto)
    if error is not None:
        _fail(str(error))
        return error.exit_code
    best = result.final
    assert best is not None and result.pipeline is not None
    fit = args.data if args.eval_data else str(fit_data_path(args.output))
    console.print(f"best: trial {result.best.number}: drop {best.drop:.2f} "
                  f"{result.unit or result.metric}, {best.size_ratio:.1f}x smaller "
                  f"({best.bytes:,} bytes)", highlight=False)  # fmt: skip
    if not args.eval_data:
        console.print(f"wrote {fit} (the part of --data that passes saw)", highlight=False)
    console.print(f"wrote {args.output}; reproduce it with:\n  onnxcomp optimize {args.model} "
                  f"-p {result.pipeline} --data {fit} --target {args.target} -o {args.output} "
                  "--allow-loss", highlight=False, soft_wrap=True)  # fmt: skip
    return 0
