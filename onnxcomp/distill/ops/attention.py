"""Attention (opset 23+) and RotaryEmbedding, as the ONNX reference computes them.

Attention covers 3-D and 4-D inputs, grouped-query heads, boolean and additive masks
(shorter masks padded), causal masking aligned after a KV cache, ``past_key`` /
``past_value`` (the present cache is returned), ``nonpad_kv_seqlen``, ``softcap``,
``softmax_precision`` and every ``qk_matmul_output_mode``. A query row with every key masked
gives zeros, not NaN, and no NaN gradient.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from onnxcomp.distill.ops._common import TORCH_DTYPES, Attrs, Inputs, OpFn, Tensor, optional


def _heads(x: Tensor, heads: int) -> Tensor:
    """[batch, seq, heads * size] -> [batch, heads, seq, size]."""
    return x.reshape(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    if mask.dtype == torch.bool:
        zero = torch.zeros((), dtype=dtype, device=mask.device)
        return torch.where(mask, zero, torch.full((), -math.inf, dtype=dtype, device=mask.device))
    return mask.to(dtype)


def _causal(queries: int, keys: int, offset: Tensor | int, dtype: torch.dtype,
            device: torch.device) -> Tensor:  # fmt: skip
    """0 where query i may see key j (j <= i + offset), -inf elsewhere; per batch if offset is
    a tensor ([batch, 1, q, kv]), else [q, kv]."""
    i = torch.arange(queries, device=device).reshape(-1, 1)
    j = torch.arange(keys, device=device).reshape(1, -1)
    if isinstance(offset, Tensor):
        allowed = j <= i + offset.reshape(-1, 1, 1, 1)
    else:
        allowed = j <= i + offset
    return _additive(allowed, dtype)


def _attention(inputs: Inputs, attrs: Attrs) -> tuple[Tensor, ...]:
    q, k, v = inputs[0], inputs[1], inputs[2]
    mask, past_key, past_value = optional(inputs, 3), optional(inputs, 4), optional(inputs, 5)
    nonpad = optional(inputs, 6)
    three_d = q.dim() == 3
    if three_d:
        q = _heads(q, attrs["q_num_heads"])
        k = _heads(k, attrs["kv_num_heads"])
        v = _heads(v, attrs["kv_num_heads"])
    dtype = q.dtype
    scale = attrs.get("scale")
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    root = torch.tensor(math.sqrt(scale), dtype=dtype)  # on Q and K, as the reference
    if past_key is not None:
        k = torch.cat([past_key, k], dim=2)
    if past_value is not None:
        v = torch.cat([past_value, v], dim=2)
    present_key, present_value = k, v
    queries, keys = q.shape[2], k.shape[2]
    if mask is not None and mask.shape[-1] < keys:
        fill = False if mask.dtype == torch.bool else -math.inf
        mask = F.pad(mask, (0, keys - mask.shape[-1]), value=fill)
    bias: Tensor = torch.zeros((queries, keys), dtype=dtype, device=q.device)
    if mask is not None:
        bias = bias + _additive(mask, dtype)
    if attrs.get("is_causal", 0):
        if past_key is None and nonpad is not None:
            offset: Tensor | int = nonpad.long() - queries
        else:
            offset = past_key.shape[2] if past_key is not None else 0
        bias = bias + _causal(queries, keys, offset, dtype, q.device)
    left, right = attrs.get("left_window_size", -1), attrs.get("right_window_size", -1)
    if left >= 0 or right >= 0:  # opset 25: a sliding window around each query's position
        if past_key is None and nonpad is not None:
            start: Tensor | int = (nonpad.long() - queries).reshape(-1, 1, 1, 1)
        else:
            start = past_key.shape[2] if past_key is not None else 0
        i = torch.arange(queries, device=q.device).reshape(-1, 1)
        j = torch.arange(keys, device=q.device).reshape(1, -1)
        distance = i + start - j
        allowed = torch.ones_like(distance, dtype=torch.bool)
        if left >= 0:
            allowed = allowed & (distance <= left)
        if right >= 0:
            allowed = allowed & (-distance <= right)
        bias = bias + _additive(allowed, dtype)
    if nonpad is not None:
        live = torch.arange(keys, device=q.device).reshape(1, -1) < nonpad.reshape(-1, 1)
        bias = bias + _additive(live, dtype).reshape(-1, 1, 1, keys)
    if k.shape[1] != q.shape[1]:  # grouped-query attention: each KV head serves a group
        repeats = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(repeats, dim=1)
        v = v.repeat_interleave(repeats, dim=1)
    scores = (q * root) @ (k * root).transpose(-1, -2)
    softcap = float(attrs.get("softcap") or 0.0)
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    exposed = scores
    masked_rows = torch.isneginf(bias.amax(dim=-1, keepdim=True))
    safe_bias = torch.where(masked_rows, torch.zeros((), dtype=dtype, device=q.device), bias)
    with_bias = scores + safe_bias
    mode = attrs.get("qk_matmul_output_mode", 0)
    if mode == 2:
        exposed = scores + bias
    precision = attrs.get("softmax_precision")
    work = TORCH_DTYPES[precision] if precision else with_bias.dtype
    probs = torch.softmax(with_bias.to(work), dim=-1)
    probs = torch.where(masked_rows, torch.zeros((), dtype=work, device=q.device), probs)
    if mode == 3:
        exposed = probs
    y = probs.to(dtype) @ v
    if three_d:
        y = y.transpose(1, 2).reshape(y.shape[0], y.shape[2], -1)
    return (y, present_key, present_value, exposed.to(dtype))[: attrs["_outputs"]]


def _rotary_embedding(inputs: Inputs, attrs: Attrs) -> Tensor:
    x, cos, sin = inputs[0], inputs[1], inputs[2]
    positions = optional(inputs, 3)
    shape = x.shape
    # [batch, seq, heads, size]
    x = x.transpose(1, 2) if x.dim() == 4 else x.reshape(*shape[:2], attrs["num_heads"], -1)
    rotary = attrs.get("rotary_embedding_dim") or x.shape[-1]
    rotate, keep = x[..., :rotary], x[..., rotary:]
    if positions is not None:
        cos, sin = cos[positions.long()], sin[positions.long()]
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    if attrs.get("interleaved", 0):
        x1, x2 = rotate[..., 0::2], rotate[..., 1::2]
    else:
        x1, x2 = rotate.chunk(2, dim=-1)
    real = cos * x1 - sin * x2
    imag = sin * x1 + cos * x2
    if attrs.get("interleaved", 0):
        rotated = torch.stack([real, imag], dim=-1).reshape(rotate.shape)
    else:
        rotated = torch.cat([real, imag], dim=-1)
    y = torch.cat([rotated, keep], dim=-1)
    return y.reshape(shape) if len(shape) == 3 else y.transpose(1, 2)


OPS: dict[str, OpFn] = {"Attention": _attention, "RotaryEmbedding": _rotary_embedding}
