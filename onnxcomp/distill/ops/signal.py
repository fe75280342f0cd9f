"""Signal ops: DFT and STFT on torch.fft (differentiable in the signal), the window functions
and MelWeightMatrix (constants of their sizes).

Complex values are ONNX's: a trailing axis of 2 (real, imaginary); real signals may end in an
axis of 1.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from onnxcomp.distill.ops._common import TORCH_DTYPES, Attrs, Inputs, OpFn, Tensor, optional


def _complex(x: Tensor) -> Tensor:
    """[..., 1 or 2] as a complex tensor [...]."""
    if x.shape[-1] == 1:
        return x[..., 0].to(torch.float64 if x.dtype == torch.float64 else torch.float32) + 0j
    return torch.view_as_complex(x.float().contiguous() if x.dtype != torch.float64 else
                                 x.contiguous())  # fmt: skip


def _stacked(y: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.view_as_real(y).to(dtype)


def _scalar(t: Tensor | None) -> int | None:
    return None if t is None or t.numel() == 0 else int(t.reshape(-1)[0].item())


def _dft(inputs: Inputs, attrs: Attrs) -> Tensor:
    x = inputs[0]
    length = _scalar(optional(inputs, 1))
    if attrs["_opset"] >= 20:
        axis = _scalar(optional(inputs, 2))
        axis = -2 if axis is None else axis
    else:
        axis = attrs.get("axis", 1)
    axis = axis + x.dim() if axis < 0 else axis  # counted over the input, complex axis included
    signal = _complex(x)
    n = length or signal.shape[axis]
    if attrs.get("inverse", 0) and attrs.get("onesided", 0):  # half spectrum -> real signal
        n = length or 2 * (signal.shape[axis] - 1)
        return torch.fft.irfft(signal, n=n, dim=axis).unsqueeze(-1).to(x.dtype)
    if attrs.get("inverse", 0):
        y = torch.fft.ifft(signal, n=n, dim=axis)
    else:
        y = torch.fft.fft(signal, n=n, dim=axis)
    if attrs.get("onesided", 0):
        y = y.narrow(axis, 0, n // 2 + 1)
    return _stacked(y, x.dtype)


def _stft(inputs: Inputs, attrs: Attrs) -> Tensor:
    signal, step = inputs[0], _scalar(inputs[1])
    window, length = optional(inputs, 2), _scalar(optional(inputs, 3))
    length = length or window.shape[0]
    frames = _complex(signal).unfold(1, length, step)  # [batch, frames, length]
    if window is not None:
        frames = frames * window.to(frames.real.dtype)
    y = torch.fft.fft(frames, dim=-1)
    if attrs.get("onesided", 1):
        y = y[..., : length // 2 + 1]
    return _stacked(y, signal.dtype)


def _window(kind: str) -> OpFn:
    def apply(inputs: Inputs, attrs: Attrs) -> Tensor:
        size = _scalar(inputs[0])
        denominator = size if attrs.get("periodic", 1) else size - 1
        n = torch.arange(size, dtype=torch.float64)
        phase = 2 * math.pi * n / denominator
        if kind == "hann":
            y = torch.sin(math.pi * n / denominator) ** 2
        elif kind == "hamming":
            y = 25 / 46 - (1 - 25 / 46) * torch.cos(phase)
        else:
            y = 0.42 - 0.5 * torch.cos(phase) + 0.08 * torch.cos(2 * phase)
        return y.to(TORCH_DTYPES[attrs.get("output_datatype", 1)]).to(inputs[0].device)

    return apply


def _mel_weight_matrix(inputs: Inputs, attrs: Attrs) -> Tensor:
    bins, dft, rate = (_scalar(t) for t in inputs[:3])
    low, high = (float(t.reshape(-1)[0]) for t in inputs[3:5])
    points = np.arange(bins + 2)
    low_mel, high_mel = (2595 * np.log1p(f / 700) / np.log(10) for f in (low, high))
    step = (high_mel - low_mel) / points.shape[0]
    hertz = 700 * np.expm1((points * step + low_mel) / 2595 * np.log(10))
    edges = (((dft + 1) * hertz) // rate).astype(int)
    out = np.zeros((dft // 2 + 1, bins))
    for i in range(bins):
        left, centre, right = edges[i], edges[i + 1], edges[i + 2]
        if centre == left:
            out[centre, i] = 1
        else:
            out[left : centre + 1, i] = (np.arange(left, centre + 1) - left) / (centre - left)
        if right > centre:
            out[centre:right, i] = (right - np.arange(centre, right)) / (right - centre)
    dtype = TORCH_DTYPES[attrs.get("output_datatype", 1)]
    return torch.from_numpy(out).to(dtype=dtype, device=inputs[0].device)


OPS: dict[str, OpFn] = {
    "DFT": _dft,
    "STFT": _stft,
    "HannWindow": _window("hann"),
    "HammingWindow": _window("hamming"),
    "BlackmanWindow": _window("blackman"),
    "MelWeightMatrix": _mel_weight_matrix,
}
