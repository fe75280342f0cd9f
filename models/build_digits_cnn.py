"""Build ``digits_cnn.onnx``: a small residual CNN trained on scikit-learn's digits dataset.

Why: onnxcomp needs a small but real image classifier to demonstrate its passes on.
This model deliberately contains the patterns those passes target:

* Conv (bias=False) -> BatchNormalization -> Relu chains (fold-bn into Conv),
* a residual block whose second BatchNormalization output is Added to the skip path,
* MaxPool / AveragePool, Flatten, and a Gemm followed by a 1-D BatchNormalization
  (fold-bn into Gemm), then a final Gemm classifier.

The model is exported with ``torch.onnx.export(..., dynamo=True, optimize=False)`` because the
exporter's default optimizer (onnxscript) fuses BatchNormalization into Conv/Gemm. The raw export
is then tidied with constant folding only (see ``tidy``), so the ONNX file keeps its
BatchNormalization nodes, holds every weight in an initializer (no Constant nodes) and has bias-free
Conv nodes where PyTorch had ``bias=False``. The input batch dimension is dynamic.

Outputs, written next to this script:

* ``digits_cnn.onnx``   - the model, weights embedded (no external data),
                          input ``input`` float32 [N, 1, 8, 8], output ``logits`` float32 [N, 10]
* ``digits_train.npz``  - the training split, for fine-tuning and distillation: same keys
* ``digits_calib.npz``  - calibration split: ``input`` float32 [S, 1, 8, 8], ``labels`` int64 [S]
* ``digits_eval.npz``   - held-out eval split, same keys

Data: ``sklearn.datasets.load_digits`` (1797 8x8 images, pixel values 0..16), normalised as
``pixel / 16``, stratified fixed-seed split 70% train / 10% calib / 20% eval.

Run from the repository root: ``python models/build_digits_cnn.py``. Training is deterministic
(fixed seeds, single thread, deterministic algorithms) and takes well under a minute on CPU.
"""

from __future__ import annotations

import collections
import random
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import onnxscript.optimizer
import onnxscript.rewriter
import torch
from onnxscript.rewriter.rules import common as rewrite_rules
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

HERE = Path(__file__).resolve().parent
ONNX_PATH = HERE / "digits_cnn.onnx"
TRAIN_PATH = HERE / "digits_train.npz"
CALIB_PATH = HERE / "digits_calib.npz"
EVAL_PATH = HERE / "digits_eval.npz"

SEED = 0
EPOCHS = 40
BATCH_SIZE = 32
LR = 3e-3
WEIGHT_DECAY = 1e-4
OPSET = 18


def set_determinism(seed: int) -> None:
    """Seed every RNG and force single-threaded deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)


class ResidualBlock(nn.Module):
    """``out = relu(bn2(conv2(relu(bn1(conv1(x))))) + x)`` with bias-free 3x3 convs."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + x)


class DigitsCNN(nn.Module):
    """Stem conv -> residual block -> maxpool -> conv -> avgpool -> MLP head (Linear+BN1d)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(),
        )
        self.block = ResidualBlock(32)
        self.pool1 = nn.MaxPool2d(2)  # 8x8 -> 4x4
        self.conv3 = nn.Sequential(
            nn.Conv2d(32, 64, 3, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(),
        )
        self.pool2 = nn.AvgPool2d(2)  # 4x4 -> 2x2
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(64 * 2 * 2, 64)
        self.bn_fc = nn.BatchNorm1d(64)
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(0.2)
        self.fc2 = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.block(x)
        x = self.pool1(x)
        x = self.conv3(x)
        x = self.pool2(x)
        x = self.flatten(x)
        x = self.relu(self.bn_fc(self.fc1(x)))
        x = self.dropout(x)
        return self.fc2(x)


def load_splits(seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Return ``{"train"|"calib"|"eval": (x float32 [S,1,8,8], y int64 [S])}``."""
    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = digits.target.astype(np.int64)
    x_train, x_rest, y_train, y_rest = train_test_split(
        x, y, test_size=0.30, random_state=seed, stratify=y
    )
    # Of the remaining 30%: one third calib (10% overall), two thirds eval (20% overall).
    x_calib, x_eval, y_calib, y_eval = train_test_split(
        x_rest, y_rest, test_size=2.0 / 3.0, random_state=seed, stratify=y_rest
    )
    return {
        "train": (np.ascontiguousarray(x_train), y_train),
        "calib": (np.ascontiguousarray(x_calib), y_calib),
        "eval": (np.ascontiguousarray(x_eval), y_eval),
    }


def random_shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Light augmentation: shift each image by up to ``max_shift`` pixels (zero-filled)."""
    n = x.shape[0]
    padded = nn.functional.pad(x, (max_shift,) * 4)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    out = torch.empty_like(x)
    h, w = x.shape[-2:]
    for i in range(n):
        out[i] = padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
    return out


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, seed: int) -> None:
    """Train in place with AdamW + cosine LR schedule and shift augmentation."""
    gen = torch.Generator().manual_seed(seed)
    xt = torch.from_numpy(x)
    yt = torch.from_numpy(y)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    steps_per_epoch = (len(xt) + BATCH_SIZE - 1) // BATCH_SIZE
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=LR, total_steps=EPOCHS * steps_per_epoch
    )
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(EPOCHS):
        model.train()
        perm = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for start in range(0, len(xt), BATCH_SIZE):
            idx = perm[start : start + BATCH_SIZE]
            if len(idx) < 2:  # BatchNorm1d needs >1 sample in training mode
                continue
            xb = random_shift(xt[idx], gen)
            loss = loss_fn(model(xb), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if (epoch + 1) % 10 == 0:
            print(f"  epoch {epoch + 1:3d}/{EPOCHS}  train loss {total / len(xt):.4f}")


@torch.no_grad()
def torch_logits(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """Eval-mode forward pass returning numpy logits."""
    model.eval()
    return model(torch.from_numpy(x)).numpy()


def tidy(model: ir.Model) -> None:
    """Clean the unoptimised export in place without fusing BatchNormalization.

    ``optimize=True`` would run onnxscript's default rewrite rules, which include
    FuseBatchNormIntoConv/Gemm, so we export with ``optimize=False`` and run only:
    constant folding (the exporter materialises the zero bias of each bias-free Conv through a
    Shape/Expand/CastLike chain), removal of the resulting all-zero Conv bias, replacement of the
    Flatten's computed Shape->Concat->Reshape target by a constant ``[-1, 256]``, Identity (eval
    Dropout) elimination, dead-node removal, and lifting of every Constant into an initializer.
    """
    onnxscript.optimizer.fold_constants(model)
    onnxscript.rewriter.rewrite(
        model,
        pattern_rewrite_rules=[
            rewrite_rules.remove_optional_bias_from_conv_rule,
            rewrite_rules.materialize_reshape_shape_rule,
        ],
    )
    ir.passes.Sequential(
        ir.passes.common.IdentityEliminationPass(),
        ir.passes.common.RemoveUnusedNodesPass(),
        ir.passes.common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        ir.passes.common.RemoveUnusedOpsetsPass(),
        ir.passes.common.NameFixPass(),
    )(model)


def export(model: nn.Module, path: Path) -> None:
    """Export with the dynamo exporter, dynamic batch, BatchNormalization kept, no ext data."""
    model.eval()
    example = (torch.zeros(4, 1, 8, 8),)
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.onnx.export(
        model,
        example,
        dynamo=True,
        opset_version=OPSET,
        input_names=["input"],
        output_names=["logits"],
        dynamic_shapes={"x": {0: batch}},
        optimize=False,  # keep BatchNormalization nodes for the fold-bn demo
    )
    assert program is not None
    tidy(program.model)
    program.save(str(path), external_data=False)


def check_onnx(path: Path) -> onnx.ModelProto:
    """Validate the exported file: checker, BN present, weights embedded, small size."""
    model = onnx.load(str(path), load_external_data=False)
    onnx.checker.check_model(model, full_check=True)
    ext = [t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert not ext, f"initializers stored as external data: {ext}"
    ops = collections.Counter(n.op_type for n in model.graph.node)
    assert ops["BatchNormalization"] == 5, f"BatchNormalization nodes missing: {ops}"
    assert ops["Constant"] == 0, f"Constant nodes left in the graph: {ops}"
    size = path.stat().st_size
    assert size < 1_000_000, f"model too large: {size} bytes"
    print(
        f"  {path.name}: {size / 1024:.1f} KB, opset "
        f"{[(o.domain or 'ai.onnx', o.version) for o in model.opset_import]}"
    )
    print(f"  op histogram: {dict(sorted(ops.items()))}")
    return model


def main() -> None:
    """Train, export, verify against onnxruntime, and write the npz splits."""
    t0 = time.time()
    set_determinism(SEED)
    splits = load_splits(SEED)
    for name, (xs, _) in splits.items():
        print(f"  {name}: {len(xs)} samples")

    model = DigitsCNN()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"  parameters: {n_params} ({n_params * 4 / 1024:.1f} KB float32)")
    train(model, *splits["train"], seed=SEED)
    print(f"  training took {time.time() - t0:.1f}s")

    x_eval, y_eval = splits["eval"]
    x_calib, y_calib = splits["calib"]
    ref_eval = torch_logits(model, x_eval)
    torch_acc = float((ref_eval.argmax(1) == y_eval).mean())
    torch_calib_acc = float((torch_logits(model, x_calib).argmax(1) == y_calib).mean())
    print(f"  torch accuracy: eval {torch_acc:.4f}  calib {torch_calib_acc:.4f}")

    export(model, ONNX_PATH)
    check_onnx(ONNX_PATH)

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(ONNX_PATH), opts, providers=["CPUExecutionProvider"])
    ort_eval = sess.run(["logits"], {"input": x_eval})[0]
    diff = float(np.abs(ort_eval - ref_eval).max())
    ort_acc = float((ort_eval.argmax(1) == y_eval).mean())
    print(f"  onnxruntime accuracy: eval {ort_acc:.4f}  (max |ort - torch| = {diff:.2e})")
    assert diff < 1e-4, f"ORT/torch mismatch {diff}"
    assert ort_acc == torch_acc, "ORT and torch accuracies differ"
    for bs in (1, 7):
        out = sess.run(["logits"], {"input": x_eval[:bs]})[0]
        assert out.shape == (bs, 10), out.shape
        d = float(np.abs(out - ref_eval[:bs]).max())
        assert d < 1e-4, f"batch {bs}: mismatch {d}"
        print(f"  batch size {bs}: ok (max diff {d:.2e})")

    x_train, y_train = splits["train"]
    np.savez(TRAIN_PATH, input=x_train, labels=y_train)
    np.savez(CALIB_PATH, input=x_calib, labels=y_calib)
    np.savez(EVAL_PATH, input=x_eval, labels=y_eval)
    for p in (ONNX_PATH, TRAIN_PATH, CALIB_PATH, EVAL_PATH):
        print(f"  wrote {p.relative_to(HERE.parent)} ({p.stat().st_size / 1024:.1f} KB)")
    print(
        f"RESULT digits_cnn: torch eval acc {torch_acc:.4f}, ORT eval acc {ort_acc:.4f}, "
        f"total {time.time() - t0:.1f}s"
    )


if __name__ == "__main__":
    main()
