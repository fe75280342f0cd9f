"""Small real-architecture torch models exported to ONNX, for the end-to-end distillation tests.

Each is a tiny-shape version of a model family real users bring: a BERT-style encoder with an
attention mask and token types (dynamo exporter), a Llama-style decoder (RMSNorm, rotary
embeddings, SwiGLU, grouped-query attention, causal), a DBNet-style text detector (FPN with
Resize upsampling, a probability map), an Inception-style CNN with LRN, and a GRU sequence
classifier. Random weights (fixed seeds); :func:`export` writes one and returns its inputs.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 50
SEQ = 12


class BertEncoder(nn.Module):
    """Token + position + token-type embeddings, 2 post-norm layers, a classifier on [CLS]."""

    def __init__(self, width: int = 32, heads: int = 4, layers: int = 2, classes: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.words = nn.Embedding(VOCAB, width)
        self.positions = nn.Embedding(SEQ, width)
        self.types = nn.Embedding(2, width)
        self.norm = nn.LayerNorm(width)
        self.layers = nn.ModuleList(
            nn.ModuleDict(
                {
                    "qkv": nn.Linear(width, 3 * width),
                    "out": nn.Linear(width, width),
                    "norm1": nn.LayerNorm(width),
                    "up": nn.Linear(width, 2 * width),
                    "down": nn.Linear(2 * width, width),
                    "norm2": nn.LayerNorm(width),
                }
            )
            for _ in range(layers)
        )
        self.head = nn.Linear(width, classes)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        n, s = input_ids.shape
        positions = torch.arange(s, device=input_ids.device).unsqueeze(0)
        x = self.words(input_ids) + self.positions(positions) + self.types(token_type_ids)
        x = self.norm(x)
        bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0
        for layer in self.layers:
            q, k, v = layer["qkv"](x).reshape(n, s, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias
            context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(n, s, -1)
            x = layer["norm1"](x + layer["out"](context))
            x = layer["norm2"](x + layer["down"](F.gelu(layer["up"](x))))
        return self.head(x[:, 0])


class LlamaDecoder(nn.Module):
    """RMSNorm, rotary position embeddings, grouped-query causal attention, SwiGLU MLP."""

    def __init__(self, width: int = 32, heads: int = 4, kv_heads: int = 2, layers: int = 2) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.size = heads, kv_heads, width // heads
        self.embed = nn.Embedding(VOCAB, width)
        self.layers = nn.ModuleList(
            nn.ModuleDict(
                {
                    "norm1": nn.RMSNorm(width, eps=1e-6),
                    "q": nn.Linear(width, width, bias=False),
                    "kv": nn.Linear(width, 2 * kv_heads * self.size, bias=False),
                    "o": nn.Linear(width, width, bias=False),
                    "norm2": nn.RMSNorm(width, eps=1e-6),
                    "gate": nn.Linear(width, 3 * width, bias=False),
                    "up": nn.Linear(width, 3 * width, bias=False),
                    "down": nn.Linear(3 * width, width, bias=False),
                }
            )
            for _ in range(layers)
        )
        self.norm = nn.RMSNorm(width, eps=1e-6)
        self.lm_head = nn.Linear(width, VOCAB, bias=False)
        inv = 1.0 / (10000 ** (torch.arange(0, self.size, 2).float() / self.size))
        angles = torch.outer(torch.arange(SEQ).float(), inv)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def _rotate(self, x: torch.Tensor) -> torch.Tensor:
        s = x.shape[2]
        cos, sin = self.cos[:s], self.sin[:s]
        x1, x2 = x[..., : self.size // 2], x[..., self.size // 2 :]
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        n, s = input_ids.shape
        x = self.embed(input_ids)
        for layer in self.layers:
            h = layer["norm1"](x)
            q = layer["q"](h).reshape(n, s, self.heads, self.size).transpose(1, 2)
            k, v = layer["kv"](h).reshape(n, s, 2, self.kv_heads, self.size).permute(2, 0, 3, 1, 4)
            q, k = self._rotate(q), self._rotate(k)
            attended = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            x = x + layer["o"](attended.transpose(1, 2).reshape(n, s, -1))
            h = layer["norm2"](x)
            x = x + layer["down"](F.silu(layer["gate"](h)) * layer["up"](h))
        return self.lm_head(self.norm(x))


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
    )


class DBNet(nn.Module):
    """A strided backbone, an FPN that upsamples with Resize (nearest and bilinear), and a
    probability-map head that upsamples back to the input size."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        channels = (3, width, 2 * width, 4 * width)
        self.stages = nn.ModuleList(_conv_bn(a, b, 2) for a, b in itertools.pairwise(channels))
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in (width, 2 * width, 4 * width))
        self.smooth = nn.ModuleList(nn.Conv2d(width, width // 2, 3, padding=1) for _ in range(3))
        self.head = nn.Sequential(
            _conv_bn(3 * (width // 2), width), nn.ConvTranspose2d(width, 1, 2, 2)
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        features, x = [], image
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        laterals = [conv(f) for conv, f in zip(self.lateral, features, strict=True)]
        for i in (1, 0):
            laterals[i] = laterals[i] + F.interpolate(laterals[i + 1], scale_factor=2.0)
        size = laterals[0].shape[-2:]
        maps = [
            F.interpolate(conv(f), size=size, mode="bilinear", align_corners=False)
            for conv, f in zip(self.smooth, laterals, strict=True)
        ]
        out = self.head(torch.cat(maps, dim=1))
        return torch.sigmoid(F.interpolate(out, scale_factor=2.0, mode="bilinear"))


class _LRN(torch.autograd.Function):
    """torch's LRN, exported as the ONNX LRN op (the TorchScript exporter would decompose it);
    odd sizes, where torch's window and ONNX's agree."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        return F.local_response_norm(x, 5, alpha=1e-3, beta=0.75, k=2.0)

    @staticmethod
    def symbolic(g: object, x: object) -> object:
        return g.op("LRN", x, size_i=5, alpha_f=1e-3, beta_f=0.75, bias_f=2.0)


class InceptionNet(nn.Module):
    """A GoogLeNet-style stem with LRN, one inception block (1x1, 3x3, 5x5, pool branches), and
    a second, even-sized LRN that the exporter decomposes (with If nodes)."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.b1 = nn.Sequential(nn.Conv2d(16, 8, 1), nn.ReLU())
        self.b3 = nn.Sequential(nn.Conv2d(16, 8, 1), nn.ReLU(), nn.Conv2d(8, 12, 3, padding=1))
        self.b5 = nn.Sequential(nn.Conv2d(16, 4, 1), nn.ReLU(), nn.Conv2d(4, 8, 5, padding=2))
        self.bp = nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.Conv2d(16, 8, 1))
        self.lrn2 = nn.LocalResponseNorm(4)
        self.fc = nn.Linear(36, classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = _LRN.apply(self.stem(image))
        x = torch.cat([self.b1(x), self.b3(x), self.b5(x), self.bp(x)], dim=1)
        x = self.lrn2(F.relu(x))
        return self.fc(x.mean(dim=(2, 3)))


class GRUClassifier(nn.Module):
    """Float features through a bidirectional GRU; an MLP classifier on both final states."""

    def __init__(self, features: int = 6, hidden: int = 16, classes: int = 3) -> None:
        super().__init__()
        self.project = nn.Linear(features, hidden)
        self.gru = nn.GRU(hidden, hidden, batch_first=True, bidirectional=True)
        self.head = nn.Sequential(nn.Linear(2 * hidden, 24), nn.ReLU(), nn.Linear(24, classes))

    def forward(self, sequence: torch.Tensor) -> torch.Tensor:
        _, last = self.gru(torch.tanh(self.project(sequence)))
        return self.head(torch.cat([last[0], last[1]], dim=-1))


def _tokens(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    ids = rng.integers(1, VOCAB, (n, SEQ)).astype(np.int64)
    lengths = rng.integers(SEQ // 2, SEQ + 1, n)
    mask = (np.arange(SEQ)[None, :] < lengths[:, None]).astype(np.int64)
    types = (np.arange(SEQ)[None, :] >= (lengths[:, None] // 2)).astype(np.int64) * mask
    return {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": types}


# name -> (model factory, input maker, dynamo export, opset)
Maker = Callable[[np.random.Generator, int], dict[str, np.ndarray]]
MODELS: dict[str, tuple[Callable[[], nn.Module], Maker, bool, int]] = {
    "bert": (BertEncoder, _tokens, True, 18),
    "llama": (
        LlamaDecoder,
        lambda rng, n: {"input_ids": rng.integers(0, VOCAB, (n, SEQ)).astype(np.int64)},
        True,
        23,
    ),
    "dbnet": (
        DBNet,
        lambda rng, n: {"image": rng.standard_normal((n, 3, 32, 32)).astype(np.float32)},
        False,
        17,
    ),
    "inception": (
        InceptionNet,
        lambda rng, n: {"image": rng.standard_normal((n, 3, 16, 16)).astype(np.float32)},
        False,
        17,
    ),
    "gru": (
        GRUClassifier,
        lambda rng, n: {"sequence": rng.standard_normal((n, 10, 6)).astype(np.float32)},
        False,
        17,
    ),
}


def export(name: str, directory: Path) -> Path:
    """Build model ``name`` (seeded), export it with a dynamic batch axis, return the path."""
    factory, make_inputs, dynamo, opset = MODELS[name]
    torch.manual_seed(0)
    model = factory().eval()
    example = {k: torch.from_numpy(v) for k, v in make_inputs(np.random.default_rng(0), 2).items()}
    path = directory / f"{name}.onnx"
    names = list(example)
    if dynamo:
        batch = torch.export.Dim("batch", min=1, max=1024)
        torch.onnx.export(
            model,
            tuple(example.values()),
            path,
            input_names=names,
            dynamic_shapes={k: {0: batch} for k in names},
            dynamo=True,
            opset_version=opset,
            external_data=False,
            verbose=False,
        )
    else:
        torch.onnx.export(
            model,
            tuple(example.values()),
            path,
            input_names=names,
            output_names=["output"],
            dynamic_axes={k: {0: "batch"} for k in [*names, "output"]},
            dynamo=False,
            opset_version=opset,
        )
    return path
