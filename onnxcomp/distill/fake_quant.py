"""Fake quantisation of DequantizeLinear weights: train in float, stay on the integer grid.

A weight stored as ``DequantizeLinear(q, scale[, zero_point])`` becomes a float parameter
initialised to the dequantised value. Its forward value is ``(clip(round(w / s) + z) - z) * s``
(binary codes: ``s * sign(w)``) with a straight-through estimator, so the model computes with
grid values while gradients reach the float weight; at initialisation this reproduces the
dequantised weight exactly. :meth:`QuantGrid.codes` puts trained weights back onto the same
grid (and :meth:`QuantGrid.refit` fits new scales) for writing back.

Grids: per tensor, per axis or per block, as DequantizeLinear's ``axis`` / ``block_size``;
INT8/UINT8/INT4/UINT4/INT2/UINT2 ranges; without a zero point the narrow symmetric range
(``[-(2^(b-1)-1), 2^(b-1)-1]``, which is also the ternary grid for INT2) unless the stored codes
already use the lowest value; INT2 codes in {-1, +1} only are binary.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import torch

from onnxcomp import quant
from onnxcomp.distill.ops import expand_param


@dataclasses.dataclass(frozen=True)
class QuantGrid:
    """Where a quantised weight's values may lie: code range, layout, and the stored dtype."""

    dtype: ir.DataType  # of the integer codes
    qmin: int
    qmax: int
    axis: int | None
    block_size: int
    binary: bool
    has_zero_point: bool

    @classmethod
    def infer(
        cls,
        codes: np.ndarray,
        dtype: ir.DataType,
        scale_shape: tuple[int, ...],
        axis: int,
        block_size: int,
        has_zero_point: bool,
    ) -> QuantGrid:
        """The grid of a DequantizeLinear node, from its stored codes and attributes."""
        low, high = int(dtype.min), int(dtype.max)
        binary = False
        if not has_zero_point and dtype.is_signed():
            present = set(np.unique(codes).tolist())
            binary = dtype.bitwidth == 2 and bool(present) and present <= {-1, 1}
            if low not in present:
                low = -high
        per_tensor = not scale_shape or (int(np.prod(scale_shape)) == 1 and not block_size)
        axis = None if per_tensor else (axis + codes.ndim if axis < 0 else axis)
        return cls(dtype, low, high, axis, block_size, binary, has_zero_point)

    @property
    def bits(self) -> int:
        return self.dtype.bitwidth

    def fake_quantize(
        self, w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None
    ) -> torch.Tensor:
        """``w`` on the grid in the forward pass, the identity in the backward pass (STE)."""
        s = expand_param(scale, w.shape, self.axis, self.block_size).to(w.dtype)
        if self.binary:
            snapped = torch.where(w >= 0, s, -s)
        else:
            q = torch.round(w / s)
            if zero_point is not None:
                z = expand_param(zero_point, w.shape, self.axis, self.block_size).to(w.dtype)
                snapped = (torch.clamp(q + z, self.qmin, self.qmax) - z) * s
            else:
                snapped = torch.clamp(q, self.qmin, self.qmax) * s
        return w + (snapped - w).detach()

    def codes(self, w: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None) -> np.ndarray:
        """Integer codes (int32) of the trained float weight ``w`` on this grid."""
        if self.binary:
            return np.where(w >= 0, 1, -1).astype(np.int32)
        s = quant.expand(np.asarray(scale, np.float32), w.shape, self.axis, self.block_size)
        q = np.rint(np.asarray(w, np.float32) / s)
        if zero_point is not None:
            q = q + quant.expand(zero_point.astype(np.float32), w.shape, self.axis, self.block_size)
        return np.clip(q, self.qmin, self.qmax).astype(np.int32)

    def refit(self, w: np.ndarray, scale_dtype: np.dtype) -> tuple[np.ndarray, np.ndarray | None]:
        """New scale (and zero point) for the trained ``w``: least-squares ``mean |w|`` for
        binary codes, the range rule of :mod:`onnxcomp.quant.linear` otherwise."""
        axis, block = self.axis, self.block_size
        if self.binary:
            _, alpha = quant.binarize(w, axis=axis, block_size=block)
            return quant.linear.store_scale(alpha, scale_dtype), None
        if self.has_zero_point:
            low = np.minimum(quant.reduce_groups(w, axis, block, np.nanmin), 0.0)
            high = np.maximum(quant.reduce_groups(w, axis, block, np.nanmax), 0.0)
            scale = quant.linear.store_scale((high - low) / (self.qmax - self.qmin), scale_dtype)
            zero = np.clip(
                np.rint(self.qmin - low / scale.astype(np.float64)), self.qmin, self.qmax
            )
            return scale, zero
        amax = quant.reduce_groups(w, axis, block, lambda g, axis: np.nanmax(np.abs(g), axis=axis))
        return quant.linear.store_scale(amax / self.qmax, scale_dtype), None

    def tensor(self, codes: np.ndarray, name: str) -> ir.TensorProtocol:
        """``codes`` in the stored dtype (4- and 2-bit types are packed when serialised)."""
        return ir.tensor(codes.astype(self.dtype.numpy()), dtype=self.dtype, name=name)
