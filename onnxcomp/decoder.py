"""Decoder language models with a KV cache: recognising them and feeding them.

An exported decoder (Hugging Face / torch.onnx style) takes ``input_ids`` [B, S] and usually
``attention_mask`` [B, P+S], ``position_ids`` [B, S] and one ``past_key_values.*`` tensor
[B, KV, P, D] per layer and key/value, and returns ``logits`` [B, S, V] and ``present.*``
[B, KV, P+S, D] in the same order. Calibration data and benchmarks often hold token ids only:
:func:`complete_feeds` makes the other inputs for the plain case (no padding, positions
counted from the cache length, an empty cache), and :func:`step_feeds` the inputs of the next
decoding step from the previous step's outputs, and :func:`perplexity` scores held-out tokens.
Nothing here reads files.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from onnxcomp.errors import OnnxcompError

PAST_PREFIXES = ("past_key_values", "past_key", "past_value", "past.")
PRESENT_PREFIXES = ("present",)


@dataclasses.dataclass(frozen=True)
class CacheInput:
    """One KV-cache input: its name, the output that feeds it next step, its fixed dims."""

    name: str
    present: str
    heads: int
    head_dim: int
    dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class DecoderSignature:
    """What :func:`signature` found: the cache inputs and the optional inputs present."""

    cache: tuple[CacheInput, ...]
    has_mask: bool
    has_positions: bool
    logits: str


def signature(model: ir.Model) -> DecoderSignature | None:
    """The model's decoder signature, or None when it has no ``input_ids`` + KV-cache inputs
    (then it is not a decoder this module knows how to feed)."""
    inputs = {v.name: v for v in model.graph.inputs if not v.is_initializer()}
    past = [v for name, v in inputs.items() if name.startswith(PAST_PREFIXES)]
    present = [v for v in model.graph.outputs if (v.name or "").startswith(PRESENT_PREFIXES)]
    if "input_ids" not in inputs or not past or len(past) != len(present):
        return None
    cache = []
    for value, out in zip(past, present, strict=True):
        shape = value.shape
        if shape is None or len(shape) != 4 or not all(isinstance(shape[i], int) for i in (1, 3)):
            return None
        dtype = value.dtype.numpy() if value.dtype is not None else np.dtype(np.float32)
        cache.append(CacheInput(value.name or "", out.name or "", int(shape[1]), int(shape[3]),
                                np.dtype(dtype)))  # fmt: skip
    logits = next((v.name for v in model.graph.outputs if v.name == "logits"),
                  model.graph.outputs[0].name)  # fmt: skip
    return DecoderSignature(tuple(cache), "attention_mask" in inputs, "position_ids" in inputs,
                            logits or "")  # fmt: skip


def complete_feeds(
    sig: DecoderSignature, feeds: Mapping[str, np.ndarray], past_length: int = 0
) -> dict[str, np.ndarray]:
    """``feeds`` with the decoder inputs it lacks: an all-ones mask over cache + new tokens,
    positions ``past_length ..``, empty caches (``past_length`` must then be 0)."""
    if "input_ids" not in feeds:
        raise OnnxcompError("decoder inputs need at least input_ids")
    ids = np.asarray(feeds["input_ids"])
    batch, seq = ids.shape
    out = dict(feeds)
    if sig.has_mask and "attention_mask" not in out:
        out["attention_mask"] = np.ones((batch, past_length + seq), np.int64)
    if sig.has_positions and "position_ids" not in out:
        positions = np.arange(past_length, past_length + seq, dtype=np.int64)
        out["position_ids"] = np.broadcast_to(positions, (batch, seq)).copy()
    for cache in sig.cache:
        if cache.name not in out:
            if past_length:
                raise OnnxcompError(f"no value for {cache.name} with a past of {past_length}")
            out[cache.name] = np.zeros((batch, cache.heads, 0, cache.head_dim), cache.dtype)
    return out


def step_feeds(
    sig: DecoderSignature,
    next_ids: np.ndarray,
    outputs: Mapping[str, np.ndarray],
    past_length: int,
) -> dict[str, np.ndarray]:
    """Inputs of the next decoding step: ``next_ids`` [B, 1] after ``past_length`` tokens whose
    keys and values are in ``outputs`` (the previous step's ``present.*``)."""
    feeds = {cache.name: outputs[cache.present] for cache in sig.cache}
    feeds["input_ids"] = np.asarray(next_ids, dtype=np.int64)
    return complete_feeds(sig, feeds, past_length)


def output_names(sig: DecoderSignature) -> list[str]:
    """The logits, then the caches (what a decoding loop fetches)."""
    return [sig.logits, *(c.present for c in sig.cache)]


def perplexity(
    session: ort.InferenceSession,
    sig: DecoderSignature,
    tokens: np.ndarray,
    *,
    window: int = 128,
    batch: int = 8,
) -> float:
    """``exp`` of the mean next-token negative log-likelihood of ``tokens`` (1-D ids), cut into
    windows of ``window + 1`` tokens, each scored from an empty cache (the first token of a
    window is context only). Leftover tokens at the end are not scored."""
    count = len(tokens) // (window + 1)
    if count == 0:
        raise OnnxcompError(f"perplexity needs at least {window + 1} tokens, got {len(tokens)}")
    windows = np.asarray(tokens[: count * (window + 1)], np.int64).reshape(count, window + 1)
    total, scored = 0.0, 0
    for start in range(0, count, batch):
        chunk = windows[start : start + batch]
        feeds = complete_feeds(sig, {"input_ids": chunk[:, :-1]})
        logits = session.run([sig.logits], feeds)[0].astype(np.float64)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        total -= float(np.take_along_axis(logp, chunk[:, 1:, None], axis=-1).sum())
        scored += chunk[:, 1:].size
    return float(np.exp(total / scored))
