"""Decoder LLMs: fp32 vs onnxcomp int4 (rtn / gptq / awq, qdq and matmulnbits formats) vs ONNX
Runtime's own MatMulNBitsQuantizer (RTN and GPTQ): size, held-out perplexity, prefill latency,
decode tokens/s with the KV cache, peak memory, and the quantiser's time and peak RSS.

    python benchmarks/llm.py                       # the shipped tiny_llm (trained; perplexity)
    python benchmarks/llm.py --model-1b /tmp/llm1b/llm_1b.onnx   # + the 1.1 B random one
    python benchmarks/llm.py --quick               # fewer variants and runs

Every quantiser runs in a fresh child process (this script with ``--worker``), so its wall time
and peak RSS are its own; the quantised files are written to a temporary directory and measured
by :func:`onnxcomp.bench.run_bench` (``--decode``: prompt with an empty cache, then N greedy
steps feeding ``present.*`` back). Perplexity is ``exp`` of the mean next-byte loss on
``models/llm_heldout.txt`` (windows of 128 bytes, each from an empty cache), computed with
ONNX Runtime at its default (``all``) optimisation level, as a user would run the model; for
the random 1 B model it means nothing and is not computed. Calibration (gptq, awq, ORT's GPTQ):
``models/llm_calib.npz`` (64 windows of 128 training bytes). The 1 B model (random weights)
gets round-to-nearest variants only (see LARGE): its quantisation is about memory and speed.
The small model's exporter metadata (doc strings, stack traces) is stripped first, for every
variant.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich import box
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from onnxcomp import decoder, runtime  # noqa: E402
from onnxcomp.bench import BenchOptions, Candidate, run_bench  # noqa: E402
from onnxcomp.io import load  # noqa: E402
from onnxcomp.report import format_bytes  # noqa: E402
from onnxcomp.target import probe_host  # noqa: E402

TINY = REPO / "models" / "tiny_llm.onnx"
CALIB = REPO / "models" / "llm_calib.npz"
HELDOUT = REPO / "models" / "llm_heldout.txt"

# label -> (tool, pipeline or ORT algorithm)
VARIANTS: dict[str, tuple[str, str]] = {
    "fp32": ("-", ""),
    "rtn qdq": ("onnxcomp", "int4:method=rtn:format=qdq"),
    "rtn nbits": ("onnxcomp", "int4:method=rtn:format=matmulnbits"),
    "gptq qdq": ("onnxcomp", "int4:method=gptq:format=qdq"),
    "gptq nbits": ("onnxcomp", "int4:method=gptq:format=matmulnbits"),
    "awq qdq": ("onnxcomp", "int4:method=awq:format=qdq"),
    "awq nbits": ("onnxcomp", "int4:method=awq:format=matmulnbits"),
    "int8 nbits": ("onnxcomp", "int8:format=matmulnbits"),
    "ort rtn": ("onnxruntime", "RTN"),
    "ort gptq": ("onnxruntime", "GPTQ"),
}
QUICK = ("fp32", "rtn nbits", "gptq nbits", "awq nbits", "ort rtn")
# gptq/awq on the 1 B model: float64 Hessians of all 154 MatMul inputs at once (22 of them
# 5632 x 5632) would take ~6 GB; statistics are collected in one pass, not layer by layer.
LARGE = ("fp32", "rtn qdq", "rtn nbits", "ort rtn")
BLOCK = 32


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-1b", help="also bench this large decoder (models/build_llm_1b.py)")
    p.add_argument("--large-only", action="store_true", help="skip tiny_llm (with --model-1b)")
    p.add_argument("--variants", help="comma-separated labels (default: all for tiny_llm)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens (default 64)")
    p.add_argument("--new-tokens", type=int, default=32, help="decoded tokens (default 32)")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--block", type=int, default=BLOCK, help="int4 block size (default 32)")
    p.add_argument("--quick", action="store_true", help="5 variants, 5 runs")
    p.add_argument("--json", help="write all figures here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def quantise(label: str, model: Path, out_dir: Path, block: int) -> dict[str, Any]:
    """Run one quantiser in a child process; its output path, seconds and peak RSS."""
    tool, recipe = VARIANTS[label]
    if recipe.startswith("int4"):
        recipe += f":block_size={block}"
    if tool == "-":
        return {"path": str(model), "seconds": None, "peak_rss_bytes": None}
    output = out_dir / (label.replace(" ", "_") + ".onnx")
    request = {"tool": tool, "recipe": recipe, "model": str(model), "output": str(output),
               "calib": str(CALIB), "block": block}  # fmt: skip
    # One BLAS thread: on a busy 2-core machine OpenBLAS's spinning threads made 128x128
    # factorisations 1000x slower; the same for every quantiser.
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(request)],
                          capture_output=True, text=True, check=False, env=env)  # fmt: skip
    start = done.stdout.rfind('{"seconds"')  # ORT's GPTQ prints progress without a newline
    if done.returncode != 0 or start < 0:
        error = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        return {"path": None, "error": error[:300]}
    result = json.loads(done.stdout[start:].splitlines()[0])
    result["path"] = str(output) if result.get("error") is None else None
    return result


def worker(request_text: str) -> int:
    """The child: import, reset the RSS peak, quantise, print seconds and peak RSS as JSON."""
    request = json.loads(request_text)
    import onnx

    import onnxcomp

    baseline = _reset_peak_rss()
    start = time.perf_counter()
    error = None
    try:
        if request["tool"] == "onnxcomp":
            calibrated = "gptq" in request["recipe"] or "awq" in request["recipe"]
            onnxcomp.optimize(request["model"], request["recipe"],
                              data=request["calib"] if calibrated else None,
                              output=request["output"], check="none",
                              bound=onnxcomp.LossBound(allow_loss=True))  # fmt: skip
        else:
            from onnxruntime.quantization import matmul_nbits_quantizer as mnq

            if request["recipe"] == "GPTQ":
                config: Any = mnq.GPTQWeightOnlyQuantConfig(
                    calibration_data_reader=_reader(request["calib"]), block_size=request["block"]
                )
            else:
                config = mnq.DefaultWeightOnlyQuantConfig(
                    block_size=request["block"], is_symmetric=True,
                    op_types_to_quantize=("MatMul", "Gather"),
                )  # fmt: skip
            quantizer = mnq.MatMulNBitsQuantizer(onnx.load(request["model"]), algo_config=config)
            quantizer.process()
            big = Path(request["model"]).with_suffix(".onnx.data").exists()
            quantizer.model.save_model_to_file(request["output"], use_external_data_format=big)
    except Exception as e:  # reported as the variant's error
        error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_rss_bytes": _peak_rss() - (baseline or 0),
                      "error": error}))  # fmt: skip
    return 0


def _reader(path: str) -> Any:
    """ORT's CalibrationDataReader over the calibration windows, one at a time."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            with np.load(path) as z:
                count = len(z["input_ids"])
                self.feeds = [{k: z[k][i : i + 1] for k in z.files} for i in range(count)]
            self.index = 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self.index >= len(self.feeds):
                return None
            self.index += 1
            return self.feeds[self.index - 1]

        def rewind(self) -> None:
            self.index = 0

    return Reader()


def _reset_peak_rss() -> int | None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status("VmRSS")
    except OSError:
        return None


def _peak_rss() -> int:
    peak = _status("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _status(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def perplexity(path: str, threads: int) -> float:
    model = load(path)
    sig = decoder.signature(model)
    assert sig is not None
    session = runtime.make_session(model, level="all", threads=threads)
    tokens = np.frombuffer(HELDOUT.read_bytes(), dtype=np.uint8)
    return decoder.perplexity(session, sig, tokens, window=128)


def bench_model(name: str, model: Path, labels: list[str], args: argparse.Namespace,
                tmp: Path, score: bool) -> list[dict[str, Any]]:  # fmt: skip
    if score:  # small model: its exporter metadata (8% of the file) would blur the sizes
        import onnxcomp

        stripped = tmp / f"{name}_fp32.onnx"
        onnxcomp.optimize(model, "strip", output=stripped, check="none")
        model = stripped
    rows = []
    for label in labels:
        print(f"[{name}] quantising: {label}", file=sys.stderr, flush=True)
        result = quantise(label, model, tmp, args.block)
        row = {"model": name, "variant": label, "tool": VARIANTS[label][0],
               "recipe": VARIANTS[label][1], **result}  # fmt: skip
        if score and row.get("path"):
            row["perplexity"] = perplexity(row["path"], args.threads)
        rows.append(row)
    candidates = [Candidate(r["variant"], r["path"], error=r.get("error")) for r in rows]
    options = BenchOptions(
        threads=(args.threads,), runs=args.runs, warmup=2, decode=args.new_tokens,
        shapes={"input_ids": (1, args.prompt)}, level="all",
    )  # fmt: skip
    print(f"[{name}] benchmarking {len(rows)} variants", file=sys.stderr, flush=True)
    report = run_bench(candidates, options).to_dict()
    for row, info in zip(rows, report["models"], strict=True):
        cell = next((c for c in report["results"] if c["model"] == info["label"]), {})
        row["file_bytes"] = info["file_bytes"]
        row["error"] = row.get("error") or info["error"] or (
            cell.get("note") if cell.get("status") == "error" else None)  # fmt: skip
        row["prefill_ms"] = cell.get("prefill_ms")
        row["decode_tokens_per_s"] = cell.get("decode_tokens_per_s")
        row["peak_memory_bytes"] = cell.get("peak_memory_bytes")
    return rows


def print_table(name: str, rows: list[dict[str, Any]], cpu: str, args: argparse.Namespace) -> None:
    base = rows[0]
    table = Table(title=f"{name}: int4 block {args.block} weight-only, {cpu}, "
                  f"{args.threads} thread(s), prompt {args.prompt}, {args.new_tokens} new tokens",
                  title_justify="left",
                  box=box.SIMPLE_HEAD)  # fmt: skip
    for header in ("variant", "tool", "size", "perplexity", "prefill ms", "decode tok/s",
                   "peak mem", "quant s", "quant RSS", "note"):  # fmt: skip
        table.add_column(header, justify="left" if header in ("variant", "tool", "note")
                         else "right", overflow="fold")  # fmt: skip
    for row in rows:
        def ratio(key: str, fmt: str, row: dict[str, Any] = row) -> str:
            value, ref = row.get(key), base.get(key)
            if value is None:
                return "-"
            text = fmt.format(value)
            return text + (f" ({value / ref:.2f}x)" if ref and row is not base else "")

        ppl = row.get("perplexity")
        ppl_text = "-" if ppl is None else f"{ppl:.4f}"
        if ppl is not None and base.get("perplexity") and row is not base:
            ppl_text += f" (+{ppl - base['perplexity']:.4f})"
        size = "-" if row.get("file_bytes") is None else format_bytes(row["file_bytes"])
        if row.get("file_bytes") and base.get("file_bytes") and row is not base:
            size += f" ({row['file_bytes'] / base['file_bytes']:.3f}x)"
        table.add_row(
            row["variant"], row["tool"], size, ppl_text, ratio("prefill_ms", "{:.2f}"),
            ratio("decode_tokens_per_s", "{:.1f}"),
            "-" if row.get("peak_memory_bytes") is None else format_bytes(row["peak_memory_bytes"]),
            "-" if row.get("seconds") is None else f"{row['seconds']:.1f}",
            "-" if row.get("peak_rss_bytes") is None else format_bytes(row["peak_rss_bytes"]),
            row.get("error") or "",
        )  # fmt: skip
    from rich.console import Console

    from onnxcomp.report import console

    out = console()
    (out if out.is_terminal else Console(width=max(out.width, 190))).print(table)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args.worker)
    if args.quick:
        args.runs = min(args.runs, 5)
    cpu = probe_host().model
    labels = args.variants.split(",") if args.variants else list(QUICK if args.quick else VARIANTS)
    unknown = [v for v in labels if v not in VARIANTS]
    if unknown:
        print(f"unknown variants {unknown}; valid: {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    if labels[0] != "fp32":
        labels = ["fp32", *[v for v in labels if v != "fp32"]]
    results = {"cpu": cpu, "platform": platform.platform(), "threads": args.threads,
               "prompt": args.prompt, "new_tokens": args.new_tokens, "models": {}}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="onnxcomp-llm-") as tmp:
        if not args.large_only:
            rows = bench_model("tiny_llm", TINY, labels, args, Path(tmp), score=True)
            results["models"]["tiny_llm"] = rows
            print_table("tiny_llm (1.05 M params, trained)", rows, cpu, args)
        if args.model_1b:
            big = [v for v in labels if v in LARGE] if args.variants else list(LARGE)
            rows = bench_model("llm_1b", Path(args.model_1b), big, args, Path(tmp), score=False)
            results["models"]["llm_1b"] = rows
            print_table("llm_1b (1.1 B params, random)", rows, cpu, args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
