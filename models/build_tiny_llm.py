"""Build ``tiny_llm.onnx``: a small Llama-style decoder with a KV cache, trained on Python's docs.

Why: onnxcomp's weight-only 4-bit quantisation (GPTQ, AWQ, MatMulNBits) is meant for decoder
language models, so it needs one whose perplexity means something and whose graph has the
inputs real exported decoders have (``attention_mask``, ``position_ids``,
``past_key_values.*`` in, ``present.*`` out).

Text: the docstrings of the standard library (modules, their public classes, functions and
methods) of the Python running this script, byte-level tokens (vocabulary 256, no tokenizer to
ship). Modules are split by name: every 8th module (sorted) is held out; the first
``HELDOUT_BYTES`` of the held-out text are written to ``llm_heldout.txt``.

Model (:class:`TinyLlama`): token embedding, ``N_LAYERS`` pre-RMSNorm blocks of grouped-query
attention (``N_HEADS`` query heads sharing ``N_KV_HEADS`` key/value heads, rotary position
embeddings applied from ``position_ids``) and a SwiGLU MLP, final RMSNorm, untied LM head;
no biases, like Llama. About 1.05 M parameters (4.2 MB in fp32).

Outputs, written next to this script:

* ``tiny_llm.onnx`` - inputs ``input_ids`` int64 [B, S], ``attention_mask`` int64 [B, P+S]
  (1 = token, 0 = padding), ``position_ids`` int64 [B, S], ``past_key_values.{i}.key`` /
  ``.value`` float32 [B, KV, P, D]; outputs ``logits`` float32 [B, S, 256] and
  ``present.{i}.key`` / ``.value`` [B, KV, P+S, D]. B, S and P are dynamic; P may be 0 (the
  full-sequence model is the same graph with an empty cache).
* ``llm_calib.npz`` - every input of the model for 64 training windows (no held-out module) of 128
  tokens with an empty cache (``--data`` for calibration and the numeric check).
* ``llm_heldout.txt`` - held-out text for perplexity (benchmarks/llm.py).

The exporter is ``torch.onnx.export(..., dynamo=True)`` with dynamic dims for B, S and P.
Run from the repository root: ``python models/build_tiny_llm.py`` (about 5 minutes on 2 CPU
cores; ``--steps`` changes the training length). :func:`build_decoder` is shared with
``build_llm_1b.py``, which builds the same architecture at ~1 B parameters.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
ONNX_PATH = HERE / "tiny_llm.onnx"
CALIB_PATH = HERE / "llm_calib.npz"
HELDOUT_PATH = HERE / "llm_heldout.txt"

SEED = 0
VOCAB = 256
D_MODEL, N_LAYERS, N_HEADS, N_KV_HEADS, D_MLP = 128, 5, 4, 2, 384
ROPE_THETA = 10000.0
SEQ_LEN, BATCH_SIZE, STEPS, LR = 128, 16, 500, 3e-3
HELDOUT_EVERY, HELDOUT_BYTES = 8, 32768
N_CALIB = 64
OPSET = 18
MASK_BIAS = -1e4  # finite, so fp16 conversion and fully padded rows stay NaN-free
SKIP_MODULES = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test",
                "lib2to3", "ensurepip", "pydoc_data"}  # fmt: skip


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class Attention(nn.Module):
    def __init__(self, d: int, heads: int, kv_heads: int):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, d // heads
        self.q_proj = nn.Linear(d, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(heads * self.head_dim, d, bias=False)

    def forward(self, x, cos, sin, bias, past_k, past_v):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k = torch.cat([past_k, k], dim=2)
        v = torch.cat([past_v, v], dim=2)
        rep = self.heads // self.kv_heads
        t = k.shape[2]
        kr = k[:, :, None].expand(b, self.kv_heads, rep, t, self.head_dim).reshape(
            b, self.heads, t, self.head_dim
        )
        vr = v[:, :, None].expand(b, self.kv_heads, rep, t, self.head_dim).reshape(
            b, self.heads, t, self.head_dim
        )
        scores = q @ kr.transpose(-1, -2) / math.sqrt(self.head_dim) + bias
        out = torch.softmax(scores, dim=-1) @ vr
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1)), k, v


class Block(nn.Module):
    def __init__(self, d: int, heads: int, kv_heads: int, mlp: int):
        super().__init__()
        self.input_norm = RMSNorm(d)
        self.attn = Attention(d, heads, kv_heads)
        self.post_norm = RMSNorm(d)
        self.gate_proj = nn.Linear(d, mlp, bias=False)
        self.up_proj = nn.Linear(d, mlp, bias=False)
        self.down_proj = nn.Linear(mlp, d, bias=False)

    def forward(self, x, cos, sin, bias, past_k, past_v):
        h, k, v = self.attn(self.input_norm(x), cos, sin, bias, past_k, past_v)
        x = x + h
        y = self.post_norm(x)
        x = x + self.down_proj(nn.functional.silu(self.gate_proj(y)) * self.up_proj(y))
        return x, k, v


class TinyLlama(nn.Module):
    """forward(input_ids, attention_mask, position_ids, *past) -> (logits, *present), with
    ``past`` = key0, value0, key1, value1, ... each [B, KV, P, D]."""

    def __init__(self, vocab=VOCAB, d=D_MODEL, layers=N_LAYERS, heads=N_HEADS,
                 kv_heads=N_KV_HEADS, mlp=D_MLP):  # fmt: skip
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Block(d, heads, kv_heads, mlp) for _ in range(layers))
        self.norm = RMSNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        head_dim = d // heads
        inv_freq = 1.0 / ROPE_THETA ** (torch.arange(0, head_dim, 2).float() / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.kv_heads, self.head_dim = kv_heads, head_dim

    def forward(self, input_ids, attention_mask, position_ids, *past):
        s = input_ids.shape[1]
        x = self.embed_tokens(input_ids)
        freqs = position_ids[..., None].float() * self.inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # [B, 1, S, D]
        cos, sin = emb.cos(), emb.sin()
        total = attention_mask.shape[1]
        query_pos = torch.arange(s, device=input_ids.device) + (total - s)
        key_pos = torch.arange(total, device=input_ids.device)
        allowed = (key_pos[None, :] <= query_pos[:, None])[None, None] & (
            attention_mask[:, None, None, :] > 0
        )
        bias = torch.where(allowed, 0.0, MASK_BIAS)
        present = []
        for i, layer in enumerate(self.layers):
            x, k, v = layer(x, cos, sin, bias, past[2 * i], past[2 * i + 1])
            present += [k, v]
        return (self.lm_head(self.norm(x)), *present)

    def empty_past(self, batch: int) -> list[torch.Tensor]:
        shape = (batch, self.kv_heads, 0, self.head_dim)
        return [torch.zeros(shape) for _ in range(2 * len(self.layers))]


def io_names(layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


def export_decoder(model: TinyLlama, path: Path, *, external_data: bool = False) -> None:
    """Export with dynamo, B/S/P dynamic; example inputs with a non-empty cache (P=3) so no dim
    is specialised to 0 or 1."""
    layers = len(model.layers)
    inputs, outputs = io_names(layers)
    b, s, p = 2, 5, 3
    ids = torch.zeros((b, s), dtype=torch.long)
    mask = torch.ones((b, p + s), dtype=torch.long)
    pos = torch.arange(p, p + s)[None].repeat(b, 1)
    past = [torch.zeros((b, model.kv_heads, p, model.head_dim)) for _ in range(2 * layers)]
    batch, seq, past_len = torch.export.Dim("batch"), torch.export.Dim("seq"), torch.export.Dim(
        "past"
    )
    total = torch.export.Dim.AUTO
    shapes = (
        {0: batch, 1: seq},
        {0: batch, 1: total},
        {0: batch, 1: seq},
        tuple({0: batch, 2: past_len} for _ in range(2 * layers)),  # *past: one tuple
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model.eval(),
            (ids, mask, pos, *past),
            dynamic_shapes=shapes,
            input_names=inputs,
            output_names=outputs,
            opset_version=OPSET,
            dynamo=True,
            external_data=external_data,
        )
    program.save(str(path), external_data=external_data)


def stdlib_docs() -> tuple[str, str]:
    """(training text, held-out text): docstrings of the stdlib, split by module."""
    warnings.simplefilter("ignore")
    train, heldout = [], []
    names = sorted(m for m in sys.stdlib_module_names
                   if not m.startswith("_") and m not in SKIP_MODULES)  # fmt: skip
    for index, name in enumerate(names):
        try:
            module = importlib.import_module(name)
        except Exception:
            continue
        docs = [inspect.getdoc(module) or ""]
        for key, obj in sorted(vars(module).items()):
            if key.startswith("_") or getattr(obj, "__module__", None) != name:
                continue
            docs.append(inspect.getdoc(obj) or "")
            if inspect.isclass(obj):
                for attr, member in sorted(vars(obj).items()):
                    if not attr.startswith("_") and callable(member):
                        docs.append(inspect.getdoc(member) or "")
        text = "\n\n".join(d for d in docs if d)
        (heldout if index % HELDOUT_EVERY == 0 else train).append(text)
    return "\n\n".join(train), "\n\n".join(heldout)


def train(model: TinyLlama, tokens: np.ndarray, steps: int) -> None:
    """AdamW, cosine schedule, random windows of SEQ_LEN+1 bytes."""
    rng = np.random.default_rng(SEED)
    data = torch.from_numpy(tokens.astype(np.int64))
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / 50) * 0.5 * (1 + math.cos(math.pi * i / steps))
    )
    mask = torch.ones((BATCH_SIZE, SEQ_LEN), dtype=torch.long)
    pos = torch.arange(SEQ_LEN)[None].repeat(BATCH_SIZE, 1)
    past = model.empty_past(BATCH_SIZE)
    start = time.time()
    model.train()
    for step in range(steps):
        offsets = rng.integers(0, len(data) - SEQ_LEN - 1, BATCH_SIZE)
        batch = torch.stack([data[o : o + SEQ_LEN + 1] for o in offsets])
        logits = model(batch[:, :-1], mask, pos, *past)[0]
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step:4d} loss {loss.item():.3f} ({time.time() - start:.0f} s)")


def perplexity(session: ort.InferenceSession, tokens: np.ndarray, layers: int) -> float:
    """Byte-level perplexity of ``tokens`` in windows of SEQ_LEN (each window from scratch)."""
    windows = len(tokens) // (SEQ_LEN + 1)
    seqs = tokens[: windows * (SEQ_LEN + 1)].reshape(windows, SEQ_LEN + 1).astype(np.int64)
    feeds = decoder_feeds(seqs[:, :-1], layers, session)
    logits = session.run(["logits"], feeds)[0]
    logits = logits - logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, seqs[:, 1:, None], axis=-1).mean()
    return float(np.exp(nll))


def decoder_feeds(ids: np.ndarray, layers: int, session: ort.InferenceSession) -> dict:
    b, s = ids.shape
    positions = np.broadcast_to(np.arange(s, dtype=np.int64), (b, s)).copy()
    feeds = {"input_ids": ids, "attention_mask": np.ones((b, s), np.int64),
             "position_ids": positions}  # fmt: skip
    for value in session.get_inputs()[3:]:
        kv, hd = value.shape[1], value.shape[3]
        feeds[value.name] = np.zeros((b, kv, 0, hd), np.float32)
    return feeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=STEPS)
    args = parser.parse_args()
    torch.manual_seed(SEED)
    torch.set_num_threads(1)  # 2 threads on 2 shared cores ran 4x slower here
    train_text, heldout_text = stdlib_docs()
    train_tokens = np.frombuffer(train_text.encode(), dtype=np.uint8)
    heldout = heldout_text.encode()[:HELDOUT_BYTES].decode(errors="ignore")
    HELDOUT_PATH.write_text(heldout)
    print(f"train {len(train_tokens)} bytes, held-out {len(heldout.encode())} bytes")

    model = TinyLlama()
    print(f"{sum(p.numel() for p in model.parameters())} parameters")
    train(model, train_tokens, args.steps)
    model.eval()
    export_decoder(model, ONNX_PATH)
    onnx.checker.check_model(onnx.load(ONNX_PATH), full_check=True)

    session = ort.InferenceSession(str(ONNX_PATH), providers=["CPUExecutionProvider"])
    # PyTorch against ONNX Runtime, full sequence and then one step with the cache.
    ids = torch.from_numpy(train_tokens[:65].astype(np.int64))[None].repeat(2, 1)
    feeds = decoder_feeds(ids[:, :64].numpy(), N_LAYERS, session)
    ours = session.run(None, feeds)
    with torch.no_grad():
        theirs = model(*(torch.from_numpy(feeds[n.name]) for n in session.get_inputs()))
    err = max(float(np.abs(a - b.numpy()).max()) for a, b in zip(ours, theirs, strict=True))
    step = {"input_ids": ids[:, 64:].numpy(), "attention_mask": np.ones((2, 65), np.int64),
            "position_ids": np.full((2, 1), 64, np.int64)}  # fmt: skip
    step.update((n.name, ours[i - 2]) for i, n in enumerate(session.get_inputs()) if i >= 3)
    one = session.run(["logits"], step)[0]
    full = session.run(["logits"], decoder_feeds(ids.numpy(), N_LAYERS, session))[0]
    step_err = float(np.abs(one[:, -1] - full[:, -1]).max())
    print(f"torch vs ORT max |diff| {err:.2e}; cached step vs full sequence {step_err:.2e}")
    assert err < 1e-3 and step_err < 1e-3

    heldout_tokens = np.frombuffer(heldout.encode(), dtype=np.uint8)
    print(f"held-out perplexity (ORT) {perplexity(session, heldout_tokens, N_LAYERS):.3f}")

    rng = np.random.default_rng(SEED + 1)
    offsets = rng.integers(0, len(train_tokens) - SEQ_LEN, N_CALIB)
    calib = np.stack([train_tokens[o : o + SEQ_LEN] for o in offsets]).astype(np.int64)
    np.savez_compressed(CALIB_PATH, **decoder_feeds(calib, N_LAYERS, session))
    print(f"wrote {ONNX_PATH.name} ({ONNX_PATH.stat().st_size} bytes), {CALIB_PATH.name}, "
          f"{HELDOUT_PATH.name}")  # fmt: skip


if __name__ == "__main__":
    main()
