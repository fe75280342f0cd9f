"""Build ``tiny_encoder.onnx``: a 2-layer transformer encoder classifier on a synthetic task.

Why: onnxcomp needs a small transformer to demonstrate its passes on MatMul/Gemm-heavy graphs
with Softmax attention, LayerNormalization, GELU, dynamic batch *and* sequence dimensions, and
integer inputs. Every piece of the attention is written by hand (explicit Q/K/V/output Linear
projections, reshape to heads, scaled dot product, additive padding mask, Softmax) so the ONNX
graph contains plain MatMul/Add/Softmax/Reshape/Transpose nodes, not a fused attention op.

Task (generated deterministically from a fixed seed): a sequence is
``[A, B, SEP, body...]`` followed by padding (token 0), where ``A != B`` are two of the 8 "symbol"
tokens 1..8, ``SEP`` is token 31 and the body holds 6..29 tokens from 1..30. The label is
``0`` if A occurs in the body fewer times than B, ``1`` if equally often, ``2`` if more often.
Swapping the first two tokens swaps classes 0 and 2 while leaving the multiset of tokens
unchanged, so a bag-of-tokens model cannot beat ~67%; the model has to use position embeddings
and attention to find out which tokens are A and B and then count them over the body.

Model: token embedding (vocab 32) + learned position embedding (max length 32), d_model 64,
2 pre-LayerNorm encoder layers (4 heads, GELU MLP of width 128), final LayerNorm, mean-pool over
non-padded tokens (using the mask), Linear classifier to 3 logits. Padding keys are masked with
an additive bias of -10000 (large-negative rather than -inf, so that it stays finite in fp16
and a fully masked row could never produce NaN).

Outputs, written next to this script:

* ``tiny_encoder.onnx`` - inputs ``input_ids`` int64 [N, L], ``attention_mask`` int64 [N, L]
                          (1 = real token, 0 = padding), output ``logits`` float32 [N, 3];
                          N and L are dynamic (L <= 32). Weights embedded, no external data.
* ``encoder_calib.npz`` - ``input_ids``, ``attention_mask`` int64 [S, 32] padded with 0, and
                          ``labels`` int64 [S]
* ``encoder_eval.npz``  - held-out eval split, same keys
* ``encoder_train.npz`` - the first ``N_TRAIN_FILE`` training sequences, same keys: for
                          distillation (512 calib samples are too few to win back pruning)

``--data-only`` regenerates the data files from the same seed without training or exporting
(the model is left as it is; calib and eval must come out identical to the files there).

Run from the repository root: ``python models/build_tiny_encoder.py``. Training is deterministic
(fixed seeds, single thread, deterministic algorithms) and takes about a minute on CPU.
"""

from __future__ import annotations

import ast
import collections
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import torch
from onnxscript.optimizer import FOLDED_FROM_KEY
from torch import nn

HERE = Path(__file__).resolve().parent
ONNX_PATH = HERE / "tiny_encoder.onnx"
CALIB_PATH = HERE / "encoder_calib.npz"
EVAL_PATH = HERE / "encoder_eval.npz"
TRAIN_PATH = HERE / "encoder_train.npz"

SEED = 0
PAD, SEP = 0, 31
VOCAB = 32
NUM_SYMBOLS = 8  # A and B are drawn from tokens 1..NUM_SYMBOLS
MAX_LEN = 32
MIN_BODY, MAX_BODY = 6, MAX_LEN - 3
MAX_COUNT = 6  # occurrences of A (and of B) in the body: 0..MAX_COUNT
NUM_CLASSES = 3
N_TRAIN, N_CALIB, N_EVAL = 16000, 512, 2000
N_TRAIN_FILE = 4096

D_MODEL, N_HEADS, D_MLP, N_LAYERS = 64, 4, 128, 2
EPOCHS = 8
BATCH_SIZE = 64
LR = 2e-3
WEIGHT_DECAY = 0.01
OPSET = 18
MASK_BIAS = -10000.0


def set_determinism(seed: int) -> None:
    """Seed every RNG and force single-threaded deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)


def generate(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Generate ``n`` class-balanced examples: ``(input_ids, attention_mask, labels)``."""
    ids = np.zeros((n, MAX_LEN), dtype=np.int64)
    labels = np.zeros(n, dtype=np.int64)
    symbols = np.arange(1, NUM_SYMBOLS + 1)
    for i in range(n):
        body_len = int(rng.integers(MIN_BODY, MAX_BODY + 1))
        a, b = (int(t) for t in rng.choice(symbols, 2, replace=False))
        label = int(rng.integers(0, NUM_CLASSES))
        while True:  # rejection-sample counts consistent with the chosen label
            ca, cb = (int(c) for c in rng.integers(0, MAX_COUNT + 1, 2))
            if ca + cb > body_len:
                continue
            if (label, np.sign(ca - cb)) in ((0, -1), (1, 0), (2, 1)):
                break
        fillers = np.array([t for t in range(1, SEP) if t not in (a, b)])
        body = np.concatenate(
            [np.full(ca, a), np.full(cb, b), rng.choice(fillers, body_len - ca - cb)]
        )
        rng.shuffle(body)
        seq = np.concatenate([[a, b, SEP], body])
        ids[i, : len(seq)] = seq
        labels[i] = label
    mask = (ids != PAD).astype(np.int64)
    return ids, mask, labels


class SelfAttention(nn.Module):
    """Multi-head self-attention from Linear + MatMul + Softmax with an additive mask bias."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.d_head = d_model // n_heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        n, seq, _ = x.shape
        return x.reshape(n, seq, self.n_heads, self.d_head).transpose(1, 2)  # [N, H, L, Dh]

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        n, seq, d = x.shape
        q = self._heads(self.q_proj(x))
        k = self._heads(self.k_proj(x))
        v = self._heads(self.v_proj(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(self.d_head))
        probs = torch.softmax(scores + mask_bias, dim=-1)  # mask_bias: [N, 1, 1, L]
        ctx = torch.matmul(probs, v).transpose(1, 2).reshape(n, seq, d)
        return self.out_proj(ctx)


class EncoderLayer(nn.Module):
    """Pre-LayerNorm transformer encoder layer: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, d_model: int, n_heads: int, d_mlp: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, d_mlp)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(d_mlp, d_model)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), mask_bias)
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))


class TinyEncoder(nn.Module):
    """Embeddings -> N encoder layers -> LayerNorm -> masked mean-pool -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(VOCAB, D_MODEL)
        self.pos_emb = nn.Embedding(MAX_LEN, D_MODEL)
        self.layers = nn.ModuleList(
            [EncoderLayer(D_MODEL, N_HEADS, D_MLP) for _ in range(N_LAYERS)]
        )
        self.ln_f = nn.LayerNorm(D_MODEL)
        self.classifier = nn.Linear(D_MODEL, NUM_CLASSES)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        seq = input_ids.shape[1]
        x = self.tok_emb(input_ids) + self.pos_emb.weight[:seq]
        mask = attention_mask.to(x.dtype)  # [N, L]
        mask_bias = ((1.0 - mask) * MASK_BIAS)[:, None, None, :]  # [N, 1, 1, L]
        for layer in self.layers:
            x = layer(x, mask_bias)
        x = self.ln_f(x)
        summed = (x * mask[..., None]).sum(dim=1)
        count = mask.sum(dim=1, keepdim=True).clamp(min=1.0)
        return self.classifier(summed / count)


def trim(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop trailing all-padding columns of a batch (speeds up training, exercises masks)."""
    length = int(mask.sum(dim=1).max())
    return ids[:, :length], mask[:, :length]


def train(model: nn.Module, ids: np.ndarray, mask: np.ndarray, y: np.ndarray, seed: int) -> None:
    """Train in place with AdamW + one-cycle LR schedule."""
    gen = torch.Generator().manual_seed(seed)
    xt, mt, yt = torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(y)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    steps_per_epoch = len(xt) // BATCH_SIZE
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=LR, total_steps=EPOCHS * steps_per_epoch, pct_start=0.1
    )
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(EPOCHS):
        model.train()
        perm = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for step in range(steps_per_epoch):
            idx = perm[step * BATCH_SIZE : (step + 1) * BATCH_SIZE]
            loss = loss_fn(model(*trim(xt[idx], mt[idx])), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        print(f"  epoch {epoch + 1:2d}/{EPOCHS}  train loss {total / steps_per_epoch:.4f}")


@torch.no_grad()
def torch_logits(model: nn.Module, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Eval-mode forward pass returning numpy logits."""
    model.eval()
    return model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()


def rename_transposed_weights(model: ir.Model) -> None:
    """Give the exporter's pre-transposed Linear weights readable names, in place.

    For ``nn.Linear`` on 3-D inputs the exporter emits ``MatMul(x, Transpose(W))`` and its
    optimizer constant-folds the Transpose into a new anonymous initializer ``val_<n>`` (recording
    the source in the ``pkg.onnxscript.optimizer.folded_from`` metadata). Rename those to
    ``<parameter name>.T`` so reports can tell which layer a MatMul weight belongs to.
    """
    for value in list(model.graph.initializers.values()):
        sources = ast.literal_eval(value.metadata_props.get(FOLDED_FROM_KEY, "[]"))
        # A 2-D value folded from exactly one named parameter is that parameter transposed.
        if len(sources) != 1 or sources[0].startswith("val_"):
            continue
        if value.shape is None or len(value.shape) != 2:
            continue
        new_name = f"{sources[0]}.T"
        if new_name not in model.graph.initializers:
            value.name = new_name


def export(model: nn.Module, path: Path) -> None:
    """Export with the dynamo exporter (dynamic batch and sequence), weights embedded."""
    model.eval()
    # Example sizes deliberately differ from the sizes used in the checks below.
    ex_ids = torch.randint(1, VOCAB, (3, 20), generator=torch.Generator().manual_seed(1))
    ex_mask = torch.ones_like(ex_ids)
    ex_mask[1, 15:] = 0
    batch = torch.export.Dim("batch", min=1, max=4096)
    seq = torch.export.Dim("seq", min=1, max=MAX_LEN)
    program = torch.onnx.export(
        model,
        (ex_ids, ex_mask),
        dynamo=True,
        opset_version=OPSET,
        input_names=["input_ids", "attention_mask"],
        output_names=["logits"],
        dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
        optimize=True,  # default; constant-folds the shape arithmetic (no BatchNorm to keep here)
    )
    assert program is not None
    rename_transposed_weights(program.model)
    program.save(str(path), external_data=False)


def check_onnx(path: Path) -> onnx.ModelProto:
    """Validate the exported file: checker, weights embedded, small size, dynamic dims."""
    model = onnx.load(str(path), load_external_data=False)
    onnx.checker.check_model(model, full_check=True)
    ext = [t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert not ext, f"initializers stored as external data: {ext}"
    size = path.stat().st_size
    assert size < 1_000_000, f"model too large: {size} bytes"
    for inp in model.graph.input:
        dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
        assert all(isinstance(d, str) for d in dims), f"{inp.name} not fully dynamic: {dims}"
        print(f"  input {inp.name}: {dims}")
    ops = collections.Counter(n.op_type for n in model.graph.node)
    assert ops["Constant"] == 0, f"Constant nodes left in the graph: {ops}"
    anonymous = [
        t.name for t in model.graph.initializer if t.name.startswith("val_") and len(t.dims) >= 2
    ]
    assert not anonymous, f"unnamed weight matrices: {anonymous}"
    print(
        f"  {path.name}: {size / 1024:.1f} KB, opset "
        f"{[(o.domain or 'ai.onnx', o.version) for o in model.opset_import]}"
    )
    print(f"  op histogram: {dict(sorted(ops.items()))}")
    return model


def write_train_split(train_data: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    """The first ``N_TRAIN_FILE`` training sequences, for distillation."""
    ids, mask, labels = (a[:N_TRAIN_FILE] for a in train_data)
    np.savez_compressed(TRAIN_PATH, input_ids=ids, attention_mask=mask, labels=labels)
    kb = TRAIN_PATH.stat().st_size / 1024
    print(f"  wrote {TRAIN_PATH.relative_to(HERE.parent)} ({kb:.1f} KB)")


def data_only() -> None:
    """Regenerate the data files from the seed; check calib and eval against the files there."""
    rng = np.random.default_rng(SEED)
    train_data = generate(N_TRAIN, rng)
    for path, n in ((CALIB_PATH, N_CALIB), (EVAL_PATH, N_EVAL)):
        arrays = generate(n, rng)
        with np.load(path) as stored:
            same = all(np.array_equal(a, stored[k]) for a, k in
                       zip(arrays, ("input_ids", "attention_mask", "labels"), strict=True))
        assert same, f"{path.name} differs from the regenerated split"
    write_train_split(train_data)


def main() -> None:
    """Generate data, train, export, verify against onnxruntime, and write the npz splits."""
    if "--data-only" in sys.argv[1:]:
        data_only()
        return
    t0 = time.time()
    set_determinism(SEED)
    rng = np.random.default_rng(SEED)
    train_data = generate(N_TRAIN, rng)
    calib_ids, calib_mask, calib_y = generate(N_CALIB, rng)
    eval_ids, eval_mask, eval_y = generate(N_EVAL, rng)
    print(
        f"  train {N_TRAIN}, calib {N_CALIB}, eval {N_EVAL} sequences; "
        f"eval class counts {np.bincount(eval_y).tolist()}"
    )

    model = TinyEncoder()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"  parameters: {n_params} ({n_params * 4 / 1024:.1f} KB float32)")
    train(model, *train_data, seed=SEED)
    print(f"  training took {time.time() - t0:.1f}s")

    ref_eval = torch_logits(model, eval_ids, eval_mask)
    torch_acc = float((ref_eval.argmax(1) == eval_y).mean())
    calib_acc = float((torch_logits(model, calib_ids, calib_mask).argmax(1) == calib_y).mean())
    print(f"  torch accuracy: eval {torch_acc:.4f}  calib {calib_acc:.4f}")

    export(model, ONNX_PATH)
    check_onnx(ONNX_PATH)

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(ONNX_PATH), opts, providers=["CPUExecutionProvider"])
    ort_eval = sess.run(["logits"], {"input_ids": eval_ids, "attention_mask": eval_mask})[0]
    diff = float(np.abs(ort_eval - ref_eval).max())
    ort_acc = float((ort_eval.argmax(1) == eval_y).mean())
    print(f"  onnxruntime accuracy: eval {ort_acc:.4f}  (max |ort - torch| = {diff:.2e})")
    assert diff < 1e-4, f"ORT/torch mismatch {diff}"
    assert ort_acc == torch_acc, "ORT and torch accuracies differ"

    # Batch sizes / sequence lengths other than the export example (3 x 20), built from eval
    # rows that fit in the width, so most rows carry padding; check against torch.
    lengths = eval_mask.sum(1)
    for bs, width in ((1, 32), (5, 11), (7, 27), (64, 32), (33, 17)):
        rows = np.flatnonzero(lengths <= width)[:bs]
        ids = np.ascontiguousarray(eval_ids[rows, :width])
        mask = np.ascontiguousarray(eval_mask[rows, :width])
        ref = torch_logits(model, ids, mask)
        out = sess.run(["logits"], {"input_ids": ids, "attention_mask": mask})[0]
        assert out.shape == (bs, NUM_CLASSES), out.shape
        d = float(np.abs(out - ref).max())
        assert d < 1e-4, f"batch {bs} x {width}: mismatch {d}"
        # Same rows at the full stored width 32: trailing padding must not change the logits.
        d_pad = float(np.abs(out - ort_eval[rows]).max())
        assert d_pad < 1e-4, f"batch {bs} x {width}: padding changes the output by {d_pad}"
        print(
            f"  batch {bs:2d} x seq {width:2d} ({int((mask == 0).any(1).sum()):2d} padded rows):"
            f" max |ort - torch| {d:.2e}, vs width 32 {d_pad:.2e}"
        )

    np.savez_compressed(CALIB_PATH, input_ids=calib_ids, attention_mask=calib_mask, labels=calib_y)
    np.savez_compressed(EVAL_PATH, input_ids=eval_ids, attention_mask=eval_mask, labels=eval_y)
    write_train_split(train_data)
    for p in (ONNX_PATH, CALIB_PATH, EVAL_PATH):
        print(f"  wrote {p.relative_to(HERE.parent)} ({p.stat().st_size / 1024:.1f} KB)")
    print(
        f"RESULT tiny_encoder: torch eval acc {torch_acc:.4f}, ORT eval acc {ort_acc:.4f}, "
        f"total {time.time() - t0:.1f}s"
    )


if __name__ == "__main__":
    main()
