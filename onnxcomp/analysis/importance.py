"""Importance of output channels measured on real inputs: activation entropy.

A channel whose activation hardly varies over the data (a dead ReLU, a near-constant output)
carries little information to the next layer. :func:`channel_entropy` runs the model in ONNX
Runtime on ``--data`` with the requested intermediate values added as graph outputs (on a copy:
the model is not changed), histograms each channel's activation over all samples and positions
(``bins`` equal bins between the channel's observed min and max; two passes over the data, so
memory does not grow with it) and returns the Shannon entropy of each histogram in nats:
0 for a constant channel, at most ``log(bins)``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from onnxcomp import runtime
from onnxcomp.data import Dataset, run_batch_size

DEFAULT_BINS = 32
MAX_BATCH = 16
# Ops that act on each element alone (with a constant other operand): a channel stays a channel.
PER_ELEMENT_OPS = {
    "Relu", "LeakyRelu", "PRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu",
    "Selu", "Celu", "Softplus", "Gelu", "Mish", "Add", "Sub", "Mul", "Div",
}  # fmt: skip


def probe_point(node: ir.Node) -> tuple[ir.Value, int]:
    """Where to measure the output channels of a weight layer, and their axis there.

    Starts at the node's output (channels on axis 1 for Conv/ConvTranspose, last for Gemm and
    MatMul) and follows its only consumer through per-element ops with constant other operands
    and, for axis-1 channels, BatchNormalization, so a ReLU layer is measured after its ReLU.
    """
    axis = 1 if node.op_type in ("Conv", "ConvTranspose") else -1
    value = node.outputs[0]
    while len(value.uses()) == 1 and not value.is_graph_output():
        consumer, _ = next(iter(value.uses()))
        if consumer.op_type == "BatchNormalization":
            follow = axis == 1 or (value.shape is not None and len(value.shape) == 2)
        elif consumer.op_type in PER_ELEMENT_OPS:
            others = [v for v in consumer.inputs[1 if consumer.inputs[0] is value else 0 :]
                      if v is not None and v is not value]  # fmt: skip
            follow = all(v.const_value is not None for v in others)
        else:
            follow = False
        if not follow or not consumer.outputs or consumer.outputs[0].name is None:
            break
        value = consumer.outputs[0]
    return value, axis


def channel_entropy(
    model: ir.Model,
    data: Dataset,
    points: Mapping[str, int],
    *,
    bins: int = DEFAULT_BINS,
    samples: int | None = None,
) -> dict[str, np.ndarray]:
    """Entropy (nats) of each channel of each value in ``points`` (value name -> channel axis),
    over the first ``samples`` samples of ``data``. Names the model lacks are left out."""
    names = list(points)
    batch = run_batch_size(model, data.num_samples, MAX_BATCH)

    def passes():
        return runtime.collect_activations(model, names, data.batches(batch, samples))

    # Two passes over the data: per-channel ranges first, then histograms over those ranges.
    low: dict[str, np.ndarray] = {}
    high: dict[str, np.ndarray] = {}
    for activations in passes():
        for name, x in activations.items():
            flat = _channels(x, points[name])
            finite = np.where(np.isfinite(flat), flat, np.nan)
            lo, hi = np.nanmin(finite, axis=1), np.nanmax(finite, axis=1)
            low[name] = np.fmin(low[name], lo) if name in low else lo
            high[name] = np.fmax(high[name], hi) if name in high else hi
    counts: dict[str, np.ndarray] = {}
    for activations in passes():
        for name, x in activations.items():
            hist = histogram_channels(_channels(x, points[name]), low[name], high[name], bins)
            counts[name] = counts[name] + hist if name in counts else hist
    return {name: entropy(hist) for name, hist in counts.items()}


def histogram_channels(x: np.ndarray, low: np.ndarray, high: np.ndarray, bins: int) -> np.ndarray:
    """Counts [channels, bins] of ``x`` [channels, values] over equal bins from low to high;
    a channel with low == high puts everything in its first bin; NaN/Inf are not counted."""
    channels = x.shape[0]
    width = np.where(high > low, high - low, 1.0)[:, None]
    with np.errstate(invalid="ignore"):
        index = np.floor((x - low[:, None]) / width * bins)
    valid = np.isfinite(index)
    index = np.clip(np.where(valid, index, 0), 0, bins - 1).astype(np.int64)
    flat = (np.arange(channels)[:, None] * bins + index).reshape(-1)
    counted = np.bincount(flat, weights=valid.reshape(-1), minlength=channels * bins)
    return counted.reshape(channels, bins)


def entropy(counts: np.ndarray) -> np.ndarray:
    """Shannon entropy (nats) of each row of histogram counts; 0 for an empty row."""
    counts = np.asarray(counts, dtype=np.float64)
    totals = counts.sum(axis=-1, keepdims=True)
    p = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    logs = np.log(p, out=np.zeros_like(p), where=p > 0)
    return -(p * logs).sum(axis=-1)


def _channels(x: np.ndarray, axis: int) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)
