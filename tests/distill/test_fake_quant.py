"""QuantGrid: which grid a DequantizeLinear weight lives on, fake quantisation with a
straight-through estimator, and re-quantisation for write-back."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import onnx_ir as ir  # noqa: E402

from onnxcomp import quant  # noqa: E402
from onnxcomp.distill import QuantGrid  # noqa: E402

RNG = np.random.default_rng(0)
INT8, INT4, INT2, UINT8 = ir.DataType.INT8, ir.DataType.INT4, ir.DataType.INT2, ir.DataType.UINT8


def test_symmetric_codes_use_the_narrow_range():
    codes = RNG.integers(-7, 8, (8, 32))
    grid = QuantGrid.infer(codes, INT4, (8, 1), 1, 32, False)
    assert (grid.qmin, grid.qmax, grid.axis, grid.block_size, grid.binary) == (-7, 7, 1, 32, False)


def test_codes_at_the_lowest_value_keep_the_full_range():
    codes = np.asarray([[-128, 5], [3, 127]])
    assert (QuantGrid.infer(codes, INT8, (2,), 0, 0, False).qmin) == -128


def test_int2_sign_codes_are_binary_and_ternary_codes_are_not():
    assert QuantGrid.infer(np.asarray([[1, -1], [-1, 1]]), INT2, (2,), 0, 0, False).binary
    ternary = QuantGrid.infer(np.asarray([[1, 0], [-1, 1]]), INT2, (2,), 0, 0, False)
    assert not ternary.binary and (ternary.qmin, ternary.qmax) == (-1, 1)


def test_zero_point_uses_the_dtype_range_and_scalar_scale_is_per_tensor():
    grid = QuantGrid.infer(np.asarray([0, 200]), UINT8, (), 1, 0, True)
    assert (grid.qmin, grid.qmax, grid.axis) == (0, 255, None)


@pytest.mark.parametrize(
    ("bits", "axis", "block"), [(8, 0, 0), (4, 1, 16), (4, None, 0), (8, 1, 0)]
)
def test_fake_quantize_is_exact_on_dequantized_weights_and_codes_round_trip(bits, axis, block):
    w = RNG.standard_normal((6, 40)).astype(np.float32)
    scale, zero_point = quant.linear_params(w, bits, axis=axis, block_size=block, symmetric=False)
    codes = quant.quantize(w, scale, zero_point, bits, axis=axis, block_size=block)
    dequantized = quant.dequantize(codes, scale, zero_point, axis=axis, block_size=block)
    dtype = INT8 if bits == 8 else INT4
    grid = QuantGrid.infer(codes, dtype, scale.shape, axis if axis is not None else 1, block, True)
    out = grid.fake_quantize(
        torch.from_numpy(dequantized), torch.as_tensor(scale), torch.as_tensor(zero_point)
    )
    np.testing.assert_array_equal(out.numpy(), dequantized)
    np.testing.assert_array_equal(grid.codes(dequantized, scale, zero_point), codes)


def test_straight_through_gradient_and_saturation():
    grid = QuantGrid(INT8, -127, 127, None, 0, False, False)
    w = torch.tensor([0.26, -0.74, 500.0], requires_grad=True)
    out = grid.fake_quantize(w, torch.tensor(0.5), None)
    np.testing.assert_allclose(out.detach().numpy(), [0.5, -0.5, 63.5])
    out.sum().backward()
    np.testing.assert_array_equal(w.grad.numpy(), [1.0, 1.0, 1.0])


def test_binary_grid_is_plus_minus_scale():
    grid = QuantGrid(INT2, -1, 1, 0, 0, True, False)
    w = torch.tensor([[0.3, -0.1, 0.0], [-2.0, 2.0, 0.5]])
    out = grid.fake_quantize(w, torch.tensor([0.5, 1.0]), None)
    np.testing.assert_array_equal(out.numpy(), [[0.5, -0.5, 0.5], [-1.0, 1.0, 1.0]])
    scale, _ = grid.refit(w.numpy(), np.dtype(np.float32))
    np.testing.assert_allclose(scale, [0.4 / 3, 4.5 / 3], rtol=1e-6)


def test_refit_symmetric_scale_covers_the_new_range():
    grid = QuantGrid(INT8, -127, 127, 0, 0, False, False)
    w = np.asarray([[1.0, -3.0], [0.5, 0.25]], np.float32)
    scale, zero_point = grid.refit(w, np.dtype(np.float32))
    assert zero_point is None
    np.testing.assert_allclose(scale, [3 / 127, 0.5 / 127], rtol=1e-6)
    assert grid.tensor(grid.codes(w, scale, None), "q").dtype == INT8
