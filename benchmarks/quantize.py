"""Quantisation: fp32 vs each onnxcomp pass vs onnxruntime.quantization, on the same models.

For each model (the demo models, or ``--models PATH[:CALIB.npz[:EVAL.npz]]``) this makes:

- onnxcomp variants: ``int8``, ``int4``, ``ternary``, ``binary``, ``fp16``, and ``int8-static``
  / ``int8-dynamic`` when the registry has them (picked up by name; skipped with a note if not);
  a pass with a ``layout`` option gets one row per integer layout (``int8-static:u8s8``,
  ``int8-static:u8s8-7bit``, ``int8-static:u8u8``, ``int8-static:s8s8``, ...), and
  ``int8-static@host`` is int8-static for ``--target host``: per-region int8/float placement
  measured on this machine at batch 1 and 32 (it must not be slower than fp32 at either);
- ONNX Runtime's own quantisers: ``quantize_dynamic`` (QInt8 weights, per tensor) without and
  with ``reduce_range`` (7-bit weights), ``quantize_static`` (QDQ, per channel, MinMax
  calibration on the calib split through a CalibrationDataReader) without and with
  ``reduce_range``, and, for models with MatMul weights, ``MatMulNBitsQuantizer`` (4-bit,
  block 32, symmetric).

The CPU (model, AVX2 / VNNI / AMX flags, the target ``host`` resolves to) is printed first:
which integer layout is exact and which is fast depends on it (README, "Targets").

Every quantiser runs in a fresh child process, so its wall time and peak RSS are its own (peak
RSS: VmHWM reset after the imports, i.e. resident imports plus what quantising added). All
quantisers see the calib split; every figure is then taken by ``benchmarks/_runner.py`` (one
timing loop, variants interleaved run by run) with accuracy and output cosine against fp32 on
the eval split. Run from the repository root::

    python benchmarks/quantize.py --threads 1 --batch 1,32 --runs 30 --json quantize.json
    python benchmarks/quantize.py --quick        # smoke run: threads 1, batch 1, few runs
    python benchmarks/quantize.py --only 'int8-static*,ort-*'   # some variants only
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import resource
import subprocess
import sys
import tempfile
import time
import typing
from pathlib import Path
from typing import Any

from _runner import bench, cpu_header, parser, print_summary, wide_console

from onnxcomp import registry
from onnxcomp.bench import Candidate
from onnxcomp.io import write_text
from onnxcomp.report import console, format_bytes, print_bench, to_json

REPO = Path(__file__).resolve().parent.parent
DEMOS = {
    "digits_cnn": ("digits_cnn.onnx", "digits_calib.npz", "digits_eval.npz"),
    "tiny_encoder": ("tiny_encoder.onnx", "encoder_calib.npz", "encoder_eval.npz"),
    # no held-out split: scored by cosine against fp32 on its calibration inputs
    "mbv3_block": ("mbv3_block.onnx", "mbv3_block_calib.npz", "mbv3_block_calib.npz"),
}
ONNXCOMP_PASSES = ("int8", "int4", "ternary", "binary", "fp16", "int8-static", "int8-dynamic")
# Extra options of a pass on one demo model: the MobileNetV3 block's Convs sit next to
# HardSwish, so int8-static leaves all but one float unless HardSwish runs in int8 too.
MODEL_OPTIONS = {("mbv3_block", "int8-static"): "hard_activations=int8"}
# int8-static@host times its placement at batch 1 and this batch, the table's largest.
MEASURE_BATCH = 32
NBITS_BLOCK = 32
CALIB_BATCH = 16
MIN_RUNS = 30
QUANTISER_TIMEOUT_S = 1800
SUMMARY_WIDTH = 180


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A model to quantise, with its calibration and evaluation data (either may be None)."""

    name: str
    path: Path
    calib: Path | None
    eval: Path | None


@dataclasses.dataclass(frozen=True)
class Job:
    """One quantiser run: ``kind`` is onnxcomp (with a pipeline) or one of ORT's quantisers."""

    label: str
    kind: str  # "onnxcomp", "ort-dynamic", "ort-static", "ort-nbits"
    pipeline: str | None = None
    target: str | None = None  # onnxcomp's --target
    reduce_range: bool = False  # ORT's quantisers: 7-bit weights

    @property
    def tool(self) -> str:
        rr = " reduce_range" if self.reduce_range else ""
        return {
            "onnxcomp": f"onnxcomp {self.pipeline}"
            + (f" --target {self.target}" if self.target else ""),
            "ort-dynamic": f"ort quantize_dynamic QInt8{rr}",
            "ort-static": f"ort quantize_static QDQ per-channel{rr}",
            "ort-nbits": f"ort MatMulNBits 4-bit b{NBITS_BLOCK}",
        }[self.kind]


# -- command line -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(DEMOS),
                   help="comma-separated demo names or PATH[:CALIB.npz[:EVAL.npz]]")  # fmt: skip
    p.add_argument("--quick", action="store_true",
                   help="smoke run: threads 1, batch 1, 5 runs, 256 samples")  # fmt: skip
    p.add_argument("--detail", action="store_true", help="also print the full bench tables")
    p.add_argument("--only", default="",
                   help="comma-separated label patterns (fnmatch) of the variants to run, e.g. "
                   "'int8-static*,ort-*'; fp32 always runs")  # fmt: skip
    p.set_defaults(threads="1", batch="1,32", runs=MIN_RUNS, warmup=5, samples=10**9)
    args = p.parse_args(argv)
    if args.quick:
        args.threads, args.batch, args.runs, args.warmup = "1", "1", 5, 2
        args.samples, args.no_memory = 256, True
    elif args.runs < MIN_RUNS:
        p.error(f"--runs must be >= {MIN_RUNS} (use --quick for a smoke run)")
    return args


def model_specs(text: str) -> list[ModelSpec]:
    """Demo names or ``PATH[:CALIB[:EVAL]]`` items, comma-separated."""
    specs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        if item in DEMOS:
            files = [REPO / "models" / name for name in DEMOS[item]]
            specs.append(ModelSpec(item, files[0], files[1], files[2]))
            continue
        path, *data = item.split(":")
        calib = Path(data[0]) if data and data[0] else None
        evaluation = Path(data[1]) if len(data) > 1 and data[1] else calib
        specs.append(ModelSpec(Path(path).stem, Path(path), calib, evaluation))
    return specs


# -- which quantisers ---------------------------------------------------------------------------


def jobs_for(spec: ModelSpec, notes: list[str]) -> list[Job]:
    """The quantisers to run on ``spec``; what is skipped and why goes to ``notes``."""
    jobs = []
    for name in ONNXCOMP_PASSES:
        if name not in registry.PASSES:
            notes.append(f"onnxcomp pass '{name}' is not registered: skipped")
            continue
        try:
            pass_class = registry.PASSES[name].load()
        except (ImportError, AttributeError) as e:
            notes.append(f"onnxcomp pass '{name}' is registered but does not load ({e}): skipped")
            continue
        if pass_class.needs_data and spec.calib is None:
            notes.append(f"{spec.name}: '{name}' needs calibration data: skipped")
            continue
        extra = MODEL_OPTIONS.get((spec.name, name))
        layouts = _layouts(pass_class)
        if not layouts:
            jobs.append(Job(name, "onnxcomp", _pipeline(name, extra)))
        for layout in layouts:
            pipeline = _pipeline(name, extra, f"layout={layout}")
            jobs.append(Job(f"{name}:{layout}", "onnxcomp", pipeline))
        if name == "int8-static":
            # layout=auto: the host's; measure=auto: on for --target host
            pipeline = _pipeline(name, f"search_batch={MEASURE_BATCH}")
            jobs.append(Job(f"{name}@host", "onnxcomp", pipeline, target="host"))
    for reduce_range in (False, True):
        jobs.append(Job(f"ort-dynamic{'-rr' * reduce_range}", "ort-dynamic",
                        reduce_range=reduce_range))  # fmt: skip
    if spec.calib is not None:
        for reduce_range in (False, True):
            jobs.append(Job(f"ort-static-qdq{'-rr' * reduce_range}", "ort-static",
                            reduce_range=reduce_range))  # fmt: skip
    else:
        notes.append(f"{spec.name}: no calibration data: ORT quantize_static skipped")
    if _has_matmul_weights(spec.path):
        jobs.append(Job("ort-matmulnbits4", "ort-nbits"))
    else:
        notes.append(f"{spec.name}: no MatMul with a constant weight: MatMulNBits skipped")
    return jobs


def _layouts(pass_class: Any) -> list[str]:
    """The integer layouts a pass offers (its ``layout`` option's choices but ``auto``)."""
    hints = typing.get_type_hints(pass_class.options_class)
    if "layout" not in hints:
        return []
    return [str(a) for a in typing.get_args(hints["layout"]) if a != "auto"]


def _pipeline(name: str, *options: str | None) -> str:
    return ":".join([name, *(o for o in options if o)])


def _has_matmul_weights(path: Path) -> bool:
    import onnx

    model = onnx.load(path, load_external_data=False)
    weights = {t.name for t in model.graph.initializer}
    return any(n.op_type == "MatMul" and n.input[1] in weights for n in model.graph.node)


# -- running a quantiser in a child process ----------------------------------------------------


def run_quantiser(job: Job, spec: ModelSpec, out_dir: Path) -> Candidate:
    """Run ``job`` in a fresh interpreter; the candidate carries its wall time and peak RSS."""
    output = out_dir / f"{spec.name}.{job.label}.onnx"
    request = {"job": dataclasses.asdict(job), "model": str(spec.path), "output": str(output),
               "calib": str(spec.calib) if spec.calib else None}  # fmt: skip
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(request)]
    meta: dict[str, Any] = {"quantiser": job.tool}
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False,
                              timeout=QUANTISER_TIMEOUT_S, cwd=REPO)  # fmt: skip
    except subprocess.TimeoutExpired:
        return Candidate(job.label, None, error=f"over {QUANTISER_TIMEOUT_S} s", meta=meta)
    try:
        result = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        lines = done.stderr.strip().splitlines() or [f"exit code {done.returncode}"]
        return Candidate(job.label, None, error=lines[-1][:300], meta=meta)
    keys = ("seconds", "peak_rss_bytes", "rss_after_imports_bytes", "placement")
    meta |= {k: result.get(k) for k in keys}
    if meta["peak_rss_bytes"] is not None and meta["rss_after_imports_bytes"] is not None:
        meta["rss_added_bytes"] = meta["peak_rss_bytes"] - meta["rss_after_imports_bytes"]
    if result.get("error"):
        return Candidate(job.label, None, error=result["error"], meta=meta)
    return Candidate(job.label, output, meta=meta)


def worker(request_text: str) -> int:
    """The child: import what the quantiser needs, reset the RSS peak, quantise, report JSON."""
    request = json.loads(request_text)
    job = Job(**request["job"])
    quantise = {"onnxcomp": _onnxcomp, "ort-dynamic": _ort_dynamic, "ort-static": _ort_static,
                "ort-nbits": _ort_nbits}[job.kind]  # fmt: skip
    quantise(job, None, None, None)  # imports only
    baseline = _reset_peak_rss()
    started = time.perf_counter()
    error, extra = None, None
    try:
        extra = quantise(job, Path(request["model"]), Path(request["output"]), request["calib"])
    except Exception as e:  # reported as the variant's error row
        error = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e) else ''}"
    seconds = time.perf_counter() - started
    result = {"seconds": seconds, "peak_rss_bytes": _peak_rss(),
              "rss_after_imports_bytes": baseline, "error": error}  # fmt: skip
    print(json.dumps(result | (extra or {})))
    return 0


def _reset_peak_rss() -> int | None:
    """Reset VmHWM to the current RSS (Linux); the RSS now, in bytes."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _proc_status("VmRSS")
    except OSError:
        return None


def _peak_rss() -> int:
    peak = _proc_status("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _proc_status(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# -- the quantisers (called once with None to import, then to quantise) -------------------------


def _onnxcomp(
    job: Job, model: Path | None, output: Path | None, calib: str | None
) -> dict[str, Any] | None:
    import onnxcomp

    if model is None or output is None:
        registry.get((job.pipeline or "").split(":")[0]).load()
        return None
    _, report = onnxcomp.optimize(model, job.pipeline or "", data=calib, check="none",
                                  output=output, target=job.target)  # fmt: skip
    stats = report.records[-1].stats
    if "measured_ratio" not in stats:
        return None
    decisions = stats["region_decisions"]
    kept = sum(1 for d in decisions if d["int8"])
    ratios = "/".join(f"{r:.2f}x" for r in stats["measured_ratio"])
    batches = "/".join(str(b) for b in stats["measured_batches"])
    verdict = "float" if stats["float_only"] else f"int8 {kept}/{len(decisions)} regions"
    fallback = stats.get("dynamic_fallback")
    if fallback and fallback["kept"]:
        verdict += f" + {fallback['weights']} dynamic"
        pairs = zip(fallback["dynamic_ms"], fallback["fp32_ms"], strict=True)
        ratios = "/".join(f"{t / f:.2f}x" for t, f in pairs)
    return {"placement": f"{verdict} ({stats.get('int8_layout') or '-'}; measured b{batches}: "
                         f"{ratios})"}  # fmt: skip


def _ort_dynamic(job: Job, model: Path | None, output: Path | None, calib: str | None) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if model is None or output is None:
        return
    quantize_dynamic(model, output, weight_type=QuantType.QInt8, reduce_range=job.reduce_range)


def _ort_static(job: Job, model: Path | None, output: Path | None, calib: str | None) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    if model is None or output is None or calib is None:
        return
    quantize_static(model, output, _npz_reader(calib), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8, reduce_range=job.reduce_range)  # fmt: skip


def _ort_nbits(job: Job, model: Path | None, output: Path | None, calib: str | None) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    if model is None or output is None:
        return
    quantizer = MatMulNBitsQuantizer(onnx.load(model), bits=4, block_size=NBITS_BLOCK,
                                     is_symmetric=True)  # fmt: skip
    quantizer.process()
    quantizer.model.save_model_to_file(str(output), use_external_data_format=False)


def _npz_reader(path: str) -> Any:
    """A CalibrationDataReader over an onnxcomp ``.npz`` data file, CALIB_BATCH samples a time."""
    import numpy as np
    from onnxruntime.quantization import CalibrationDataReader

    class NpzReader(CalibrationDataReader):
        def __init__(self) -> None:
            with np.load(path) as archive:
                inputs = {k: archive[k] for k in archive.files if k != "labels"}
            total = len(next(iter(inputs.values())))
            self.batches = iter([{k: v[i : i + CALIB_BATCH] for k, v in inputs.items()}
                                 for i in range(0, total, CALIB_BATCH)])  # fmt: skip

        def get_next(self) -> dict[str, Any] | None:
            return next(self.batches, None)

    return NpzReader()


# -- benching and reporting --------------------------------------------------------------------


def bench_model(spec: ModelSpec, args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    """Quantise ``spec`` every way, bench all variants together; the report as a dict."""
    out = console()
    notes: list[str] = []
    jobs = jobs_for(spec, notes)
    if args.only:
        patterns = [p.strip() for p in args.only.split(",") if p.strip()]
        jobs = [j for j in jobs if any(fnmatch.fnmatchcase(j.label, p) for p in patterns)]
    candidates = [Candidate("fp32", spec.path, meta={"quantiser": "input model"})]
    for job in jobs:
        out.print(f"{spec.name}: {job.tool} ...", highlight=False)
        candidates.append(run_quantiser(job, spec, out_dir))
    report = bench(candidates, args, data=spec.eval).to_dict()
    report["notes"] = notes + report["notes"]
    return report


META_COLUMNS = [
    ("placement", "measured placement", lambda v: v or ""),
    ("seconds", "quant s", lambda v: "-" if v is None else f"{v:.2f}"),
    ("peak_rss_bytes", "peak RSS", lambda v: "-" if v is None else format_bytes(v)),
    ("rss_added_bytes", "RSS added", lambda v: "-" if v is None else format_bytes(v)),
]


LEGEND = (
    "quant s, peak RSS: the quantiser in its own process (RSS added = peak minus the RSS after "
    "imports); int8-static:LAYOUT / int8-dynamic:LAYOUT = the pass with layout=LAYOUT; "
    "int8-static@host = --target host (layout of this CPU, placement measured here at batch 1 "
    f"and {MEASURE_BATCH}); ort-dynamic = quantize_dynamic QInt8 per tensor, ort-static-qdq = "
    "quantize_static QDQ QInt8/QInt8 per-channel MinMax on the calib split, -rr = with "
    f"reduce_range (7-bit weights); ort-matmulnbits4 = MatMulNBits 4-bit block {NBITS_BLOCK} "
    "symmetric; p50 at ONNX Runtime level 'all'"
)


def print_report(name: str, report: dict[str, Any], detail: bool) -> None:
    out = wide_console(SUMMARY_WIDTH)
    if detail:
        print_bench(report, out)
    data = report["config"].get("data")
    scored = f"top-1 / cosine vs fp32 on {Path(data).name}" if data else "random inputs"
    print_summary(report, out, title=f"{name}: {scored}; p50 = median latency, ORT CPU",
                  meta=META_COLUMNS)  # fmt: skip
    out.print(LEGEND, highlight=False)
    for note in report["notes"]:
        out.print(f"note: {note}", highlight=False)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console().print(cpu_header(), highlight=False)
    reports = {}
    with tempfile.TemporaryDirectory(prefix="onnxcomp-quantize-") as tmp:
        for spec in model_specs(args.models):
            reports[spec.name] = bench_model(spec, args, Path(tmp))
            print_report(spec.name, reports[spec.name], args.detail)
    if args.json:
        write_text(args.json, to_json({"kind": "onnxcomp-quantize-bench", "cpu": cpu_header(),
                                       "models": reports}))  # fmt: skip
        console().print(f"wrote {args.json}", highlight=False)
    return 130 if any(r["interrupted"] for r in reports.values()) else 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        raise SystemExit(worker(sys.argv[2]))
    raise SystemExit(main())
