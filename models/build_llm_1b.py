"""Build ``llm_1b.onnx`` (+ ``llm_1b.onnx.data``): tiny_llm's architecture at ~1.1 B parameters.

Why: the shipped decoder (``tiny_llm.onnx``, 1 M parameters) says whether compression keeps
perplexity; it says little about size, memory and speed at the scale people deploy. This
script builds the same Llama-style graph (RMSNorm, rotary embeddings, SwiGLU, grouped-query
attention, untied head, KV cache inputs and outputs) with TinyLlama-1.1B's shapes: vocabulary
32000, d_model 2048, 22 layers, 32 query heads sharing 4 key/value heads of 64, MLP 5632.
Weights are random (seed 0, PyTorch's default initialisation), so perplexity means nothing;
file size, session memory, prefill latency and decode tokens/s do.

Not run by the tests (the file is 4.4 GB). Needs ~10 GB of RAM and a few minutes:
``python models/build_llm_1b.py [--out DIR] [--layers N]``. The exporter is
``torch.onnx.export(..., dynamo=True)`` with external data.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from build_tiny_llm import TinyLlama, export_decoder

HERE = Path(__file__).resolve().parent
VOCAB, D_MODEL, N_LAYERS, N_HEADS, N_KV_HEADS, D_MLP = 32000, 2048, 22, 32, 4, 5632


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(HERE), help="directory for llm_1b.onnx(.data)")
    parser.add_argument("--layers", type=int, default=N_LAYERS, help="fewer for a quick try")
    args = parser.parse_args()
    torch.manual_seed(0)
    start = time.time()
    with torch.no_grad():
        model = TinyLlama(VOCAB, D_MODEL, args.layers, N_HEADS, N_KV_HEADS, D_MLP).eval()
    params = sum(p.numel() for p in model.parameters())
    print(f"{params / 1e9:.3f} B parameters ({time.time() - start:.0f} s)")
    out = Path(args.out) / "llm_1b.onnx"
    export_decoder(model, out, external_data=True)
    data = out.with_name(out.name + ".data")
    size = out.stat().st_size + (data.stat().st_size if data.exists() else 0)
    print(f"wrote {out} ({size / 1e9:.2f} GB with external data, {time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
