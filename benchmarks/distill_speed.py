"""Distillation speed: a training step of the ONNX interpreter vs the same model in PyTorch.

The model is the demo transformer (``models/tiny_encoder.onnx``, 2 layers, d=64): once as
:class:`onnxcomp.distill.OnnxModule` built from the ONNX file, once as the PyTorch module its
build script defines (``models/build_tiny_encoder.py``, with the ONNX file's weights copied
in, and outputs checked equal). A step is what distillation does per batch: forward,
cross-entropy, backward, AdamW update. The table gives the median milliseconds per step
(after warm-up) at each batch size and thread count, and the ratio (target <= 1.5).

This script times torch training steps itself: ``onnxcomp.bench`` measures ONNX Runtime
inference, which is not what is compared here. Run from the repository root::

    python benchmarks/distill_speed.py [--batch 32,128] [--threads 1,2] [--steps 30]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F
from _runner import cpu_header
from torch import nn

from onnxcomp.distill import OnnxModule

REPO = Path(__file__).resolve().parent.parent
MODEL = REPO / "models" / "tiny_encoder.onnx"
DATA = REPO / "models" / "encoder_eval.npz"


def _reference_module() -> nn.Module:
    """The build script's TinyEncoder (models/ is not a package: load it by path)."""
    spec = importlib.util.spec_from_file_location("build_tiny_encoder", REPO / "models" /
                                                  "build_tiny_encoder.py")  # fmt: skip
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.TinyEncoder()


def _copy_weights(reference: nn.Module, interpreted: OnnxModule) -> None:
    """Give the PyTorch module the ONNX file's weights: the export names them after the
    module's parameters, with ``.T`` on the Linear weights it stores transposed."""
    onnx_params = dict(interpreted.named_onnx_parameters())
    with torch.no_grad():
        for name, target in reference.named_parameters():
            if name in onnx_params:
                target.copy_(onnx_params[name])
            else:
                target.copy_(onnx_params[f"{name}.T"].T)


def _step(model: nn.Module, optimizer: torch.optim.Optimizer,
          batch: tuple[torch.Tensor, ...], labels: torch.Tensor) -> None:  # fmt: skip
    optimizer.zero_grad(set_to_none=True)
    logits = model(*batch)
    logits = logits[0] if isinstance(logits, tuple) else logits
    F.cross_entropy(logits, labels).backward()
    optimizer.step()


def _median_ms(fns: dict[str, Callable[[], None]], steps: int, warmup: int) -> dict[str, float]:
    """Median milliseconds per call of each function, calls interleaved so that machine
    drift (other processes, frequency) hits every function alike."""
    times: dict[str, list[float]] = {label: [] for label in fns}
    for index in range(warmup + steps):
        for label, fn in fns.items():
            start = time.perf_counter()
            fn()
            if index >= warmup:
                times[label].append(time.perf_counter() - start)
    return {label: statistics.median(t) * 1000 for label, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", default="32,128", help="batch sizes, comma-separated")
    p.add_argument("--threads", default="1,2", help="torch threads, comma-separated")
    p.add_argument("--steps", type=int, default=30, help="timed steps per setting")
    p.add_argument("--warmup", type=int, default=5)
    args = p.parse_args()

    data = np.load(DATA)
    interpreted = OnnxModule(ir.load(MODEL))
    reference = _reference_module()
    _copy_weights(reference, interpreted)
    ids = torch.from_numpy(data["input_ids"][:8])
    mask = torch.from_numpy(data["attention_mask"][:8])
    with torch.no_grad():
        gap = (interpreted(ids, mask)[0] - reference(ids, mask)).abs().max().item()
    print(f"tiny_encoder: max |interpreter - PyTorch| on 8 samples = {gap:.2e}")

    rows = []
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        for batch in [int(b) for b in args.batch.split(",")]:
            feeds = (torch.from_numpy(data["input_ids"][:batch]),
                     torch.from_numpy(data["attention_mask"][:batch]))  # fmt: skip
            labels = torch.from_numpy(data["labels"][:batch])
            steps = {}
            for label, model in (("pytorch", reference), ("interpreter", interpreted)):
                optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
                steps[label] = lambda m=model, o=optimizer, f=feeds, y=labels: _step(m, o, f, y)
            timings = _median_ms(steps, args.steps, args.warmup)
            rows.append((threads, batch, timings["pytorch"], timings["interpreter"]))

    print(f"\n{'threads':>8}{'batch':>7}{'PyTorch ms':>12}{'interpreter ms':>16}{'ratio':>8}")
    for threads, batch, ref_ms, ours_ms in rows:
        print(f"{threads:>8}{batch:>7}{ref_ms:>12.2f}{ours_ms:>16.2f}{ours_ms / ref_ms:>8.2f}")
    print(f"\n(median of {args.steps} steps after {args.warmup} warm-up steps; target ratio "
          f"<= 1.5)\n{cpu_header()}")  # fmt: skip


if __name__ == "__main__":
    main()
