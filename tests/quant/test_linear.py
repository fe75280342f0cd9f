"""Linear quantisation math: scale/zero-point layouts and the half-step round-trip bound."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from onnxcomp import chunks, quant
from onnxcomp.quant import linear

RNG = np.random.default_rng(0)
W = (RNG.standard_normal((24, 40)) * RNG.uniform(0.01, 3, (24, 1))).astype(np.float32)
LAYOUTS = [(None, 0), (0, 0), (1, 0), (1, 16), (0, 16)]  # (axis, block_size); 40 = 2.5 blocks


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(("axis", "block"), LAYOUTS)
def test_round_trip_error_is_at_most_half_a_step(bits, symmetric, axis, block):
    scale, zero_point = quant.linear_params(
        W, bits, axis=axis, block_size=block, symmetric=symmetric
    )
    assert scale.dtype == np.float32 and scale.shape == quant.param_shape(W.shape, axis, block)
    codes = quant.quantize(W, scale, zero_point, bits, axis=axis, block_size=block)
    low, high = quant.qrange(bits, symmetric)
    assert codes.dtype == np.int8 and low <= codes.min() and codes.max() <= high
    restored = quant.dequantize(codes, scale, zero_point, axis=axis, block_size=block)
    step = quant.expand(scale, W.shape, axis, block).astype(np.float64)
    error = np.abs(W.astype(np.float64) - restored)
    assert np.all(error <= step / 2 * (1 + 1e-5) + 1e-7)


def test_per_channel_symmetric_scale_is_absmax_over_127():
    scale, zero_point = quant.linear_params(W, 8, axis=1, symmetric=True)
    assert zero_point is None and scale.shape == (40,)
    want = np.abs(W).max(axis=0).astype(np.float64) / 127
    assert np.all(scale >= want) and np.allclose(scale, want, rtol=1e-7)


def test_blocked_scales_cover_a_last_partial_block_without_padding_zeros():
    w = np.ones((2, 40), np.float32)
    w[:, 32:] = -5.0  # the last block holds 8 real elements and 8 of padding
    assert quant.param_shape(w.shape, 1, 16) == (2, 3)
    low = quant.reduce_groups(w, 1, 16, np.nanmin)
    np.testing.assert_array_equal(low, [[1, 1, -5], [1, 1, -5]])
    expanded = quant.expand(low, w.shape, 1, 16)
    assert expanded.shape == w.shape and expanded[0, 31] == 1 and expanded[0, 32] == -5


def test_affine_zero_point_keeps_zero_exact_and_uses_the_full_range():
    w = RNG.uniform(0.5, 2.0, (4, 64)).astype(np.float32)  # all positive: range [0, max]
    scale, zero_point = quant.linear_params(w, 4, axis=0, symmetric=False)
    assert zero_point is not None and np.all(zero_point == -8)
    codes = quant.quantize(np.zeros_like(w), scale, zero_point, 4, axis=0)
    assert not np.any(quant.dequantize(codes, scale, zero_point, axis=0))
    codes = quant.quantize(w, scale, zero_point, 4, axis=0)
    assert codes.max() == 7


def test_all_zero_channel_gets_scale_one_and_zero_codes():
    w = W.copy()
    w[3] = 0
    scale, _ = quant.linear_params(w, 8, axis=0)
    assert scale[3] == 1
    assert not np.any(quant.quantize(w, scale, None, 8, axis=0)[3])


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16])
def test_half_precision_scales_are_rounded_up_so_the_bound_holds(dtype):
    w = (RNG.standard_normal((8, 64)) * 1e-3).astype(dtype)
    scale, _ = quant.linear_params(w, 4, axis=0, dtype=dtype)
    assert scale.dtype == dtype and np.all(scale.astype(np.float32) > 0)
    exact = np.abs(w.astype(np.float64)).max(axis=1) / 7
    assert np.all(scale.astype(np.float64) >= exact)
    codes = quant.quantize(w, scale, None, 4, axis=0)
    error = np.abs(w.astype(np.float64) - codes * scale.astype(np.float64)[:, None])
    assert np.all(error <= scale.astype(np.float64)[:, None] / 2 * (1 + 1e-6))


def test_bits_outside_8_4_2_are_rejected():
    with pytest.raises(ValueError, match="bits"):
        quant.qrange(3, True)


def test_limited_codes_stay_within_the_limit_and_the_half_step_bound():
    """7-bit weights (limit 63) for AVX2's 16-bit pair sums: codes in [-63, 63], error <= s/2."""
    w = np.random.default_rng(3).standard_normal((16, 24)).astype(np.float32) * 3
    scale, zero = quant.linear_params(w, 8, axis=1, symmetric=True, limit=63)
    codes = quant.quantize(w, scale, zero, 8, axis=1, limit=63)
    assert zero is None and codes.min() >= -63 and codes.max() <= 63
    assert np.abs(codes).max(axis=0).min() == 63  # each column uses the whole 7-bit range
    back = quant.dequantize(codes, scale, None, axis=1)
    assert np.all(np.abs(back - w) <= scale / 2 + 1e-7)
    with pytest.raises(ValueError, match="limit"):
        quant.linear_params(w, 8, axis=1, symmetric=True, limit=200)


def _store_scale_plain(scale: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """store_scale as first written (every element through np.where)."""
    scale = np.asarray(scale, dtype=np.float64)
    info = ml_dtypes.finfo(dtype)
    safe = np.where(scale > 0, np.maximum(scale, float(info.tiny)), 1.0)
    stored = safe.astype(dtype)
    low = stored.astype(np.float64) < safe
    if np.any(low):
        bumped = (safe * (1 + 2 * float(info.eps))).astype(dtype)
        stored = np.where(low, bumped, stored).astype(dtype)
    return stored


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
@pytest.mark.filterwarnings("ignore:overflow encountered in cast")
def test_store_scale_bumps_only_what_rounded_down_as_before(dtype) -> None:
    rng = np.random.default_rng(3)
    for scale in (np.abs(rng.standard_normal((64, 128))) * 0.01, np.array(0.3), np.array(1e-30),
                  np.array([0.0, -1.0, np.nan, 1e-300, 1e300]),
                  np.exp(rng.standard_normal(4096) * 30)):  # fmt: skip
        ours = linear.store_scale(scale, np.dtype(dtype))
        plain = _store_scale_plain(scale, dtype)
        assert ours.dtype == plain.dtype and ours.shape == plain.shape
        assert np.atleast_1d(ours).tobytes() == np.atleast_1d(plain).tobytes()
        finite = np.isfinite(np.asarray(scale, np.float64)) & (np.asarray(scale) > 0)
        assert np.all(ours.astype(np.float64)[finite] >= np.asarray(scale, np.float64)[finite])


@pytest.mark.parametrize(("axis", "block_size"), [(None, 0), (1, 0), (0, 0), (0, 16), (1, 4)])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_linear_params_refuses_inf_and_nan_when_asked(axis, block_size, value, dtype):
    w = np.random.default_rng(3).standard_normal((40, 24)).astype(dtype)
    for symmetric in (True, False):
        expected = quant.linear_params(w, 8, axis=axis, block_size=block_size,
                                       symmetric=symmetric)  # fmt: skip
        got = quant.linear_params(w, 8, axis=axis, block_size=block_size,
                                  symmetric=symmetric, finite=True)  # fmt: skip
        for a, b in zip(expected, got, strict=True):  # finite: the same parameters
            np.testing.assert_array_equal(a, b)
        bad = w.copy()
        bad[37, 21] = value  # in a partial last block along either axis
        with pytest.raises(quant.NonFiniteWeight):
            quant.linear_params(bad, 8, axis=axis, block_size=block_size,
                                symmetric=symmetric, finite=True)  # fmt: skip


@pytest.mark.parametrize(
    "shape", [(300, 70), (70, 300), (1, 900), (900, 1), (7, 5, 30), (1000,), (64, 3, 3, 2)]
)
@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_group_extremes_in_pieces_on_threads_are_the_whole_reductions(shape, dtype, monkeypatch):
    # Small pieces and slices, so that these shapes cross many of each (along rows, or along
    # channels when there is one row), against NaN-ignoring reductions of the whole groups.
    monkeypatch.setattr(linear, "PIECE_ELEMENTS", 64)
    monkeypatch.setattr(chunks, "SLICE", 256)
    rng = np.random.default_rng(5)
    w = rng.standard_normal(shape).astype(dtype)
    layouts = [(None, 0)] + [(a, b) for a in range(len(shape)) for b in (0, 4) if shape[a] >= 4]
    for axis, block in layouts:
        for kind in ("plain", "nan", "inf", "zeros"):
            x = w.copy()
            flat = x.reshape(-1)
            if kind == "nan":
                flat[flat.size // 3] = np.nan
            elif kind == "inf":
                flat[-1], flat[0] = -np.inf, np.inf
            elif kind == "zeros":
                flat[::2] = 0.0
            got = linear.group_extremes(x, axis, block)
            if kind == "nan":
                assert got is None
                continue
            expected = [quant.reduce_groups(x, axis, block, reducer, exact=True)
                        for reducer in (np.nanmin, np.nanmax)]  # fmt: skip
            assert got is not None
            for a, b in zip(got, expected, strict=True):
                assert a.shape == b.shape
                np.testing.assert_array_equal(a, b)
