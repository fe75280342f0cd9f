"""Activation-aware scaling (AWQ, Lin et al., 2023): protect the weights that meet large inputs.

For ``y = x @ w`` (``w`` is ``[in, out]``) and any positive per-input-channel ``s``,
``y = (x / s) @ (s[:, None] * w)`` exactly. Quantising ``s * w`` instead of ``w`` gives input
channels with large activations (large ``s``) a finer grid relative to their weights, at the
cost of channels that matter less. ``s = mean|x| ** alpha`` (normalised so that its geometric
mean-of-extremes is 1); ``alpha`` is searched on a grid for the smallest output error
``tr(E^T H E)``, ``E = w - Q(s * w) / s``, which needs only the inputs' second moment ``H``.
``alpha = 0`` is plain round-to-nearest, so the search never does worse than it on ``H``.

:func:`onnxcomp.quant.clip.clip_search` then shrinks each block's range where clipping a few
large weights rounds the rest better (AWQ's second step), judged by the same output error.

The ``1 / s`` is the graph's business: it is folded into the op that makes ``x`` (a norm's
scale, a preceding projection) or applied by a Mul in front of the layer; several layers
reading the same ``x`` share one ``s`` (:func:`awq_scale` takes all their weights).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from onnxcomp.quant.gptq import output_error

# w -> w' (the weight as it will be after quantisation, in float)
Rounder = Callable[[np.ndarray], np.ndarray]
ALPHAS = tuple(i / 20 for i in range(21))


def activation_scale(mean_abs: np.ndarray, alpha: float) -> np.ndarray:
    """``mean|x| ** alpha`` per input channel, normalised (``sqrt(max * min) = 1``) and kept
    away from 0 so dead channels neither blow up nor vanish."""
    base = np.maximum(np.asarray(mean_abs, dtype=np.float64), 1e-8)
    s = base**alpha
    s = s / np.sqrt(s.max() * s.min())
    return np.clip(s, 1e-4, 1e4)


def awq_scale(
    weights: Sequence[np.ndarray],
    mean_abs: np.ndarray,
    hessian: np.ndarray,
    rounder: Rounder,
    alphas: Sequence[float] = ALPHAS,
) -> tuple[np.ndarray, float, float]:
    """The per-input-channel scale ``s`` shared by ``weights`` (each ``[in, out]``, all read the
    same input), the chosen ``alpha``, and the error it gives relative to ``alpha = 0``.

    ``rounder`` quantises and dequantises a weight as the pass will (RTN with its layout).
    """
    baseline = sum(output_error(w, rounder(w), hessian) for w in weights)
    best = (baseline, 0.0, np.ones(len(mean_abs)))
    for alpha in alphas:
        s = activation_scale(mean_abs, alpha)
        err = sum(
            output_error(w, rounder(w * s[:, None]) / s[:, None], hessian) for w in weights
        )
        if err < best[0]:
            best = (err, alpha, s)
    err, alpha, s = best
    return s, alpha, (err / baseline if baseline > 0 else 1.0)
