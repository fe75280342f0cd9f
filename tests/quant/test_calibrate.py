"""Calibration math: streaming histograms and the four range methods, on known arrays."""

from __future__ import annotations

import numpy as np
import pytest

from onnxcomp.quant import calibrate, quantize_bias

RNG = np.random.default_rng(0)


def _hist(*arrays: np.ndarray, bins: int = calibrate.DEFAULT_BINS) -> calibrate.Histogram:
    hist = calibrate.Histogram(bins)
    for array in arrays:
        hist.add(array)
    return hist


def _mse(x: np.ndarray, low: float, high: float, symmetric: bool) -> float:
    return float(np.mean((x - calibrate.fake_quantize(x, low, high, 8, symmetric)) ** 2))


def test_histogram_keeps_exact_counts_and_extremes_when_its_range_doubles():
    small, large = np.append(RNG.uniform(-1, 1, 998), [-1, 1]), RNG.uniform(-7, 5, 500)
    hist = _hist(small, large, np.array([np.nan, np.inf]))
    assert hist.limit == 8.0 and hist.counts.sum() == 1500  # doubled 1 -> 2 -> 4 -> 8
    assert hist.low == large.min() and hist.high == large.max()
    direct, _ = np.histogram(np.concatenate([small, large]), bins=hist.edges)
    assert np.abs(hist.counts - direct).sum() <= 4  # values on a bin edge may land either side


def test_minmax_is_the_exact_observed_range_widened_to_zero():
    x = np.array([0.5, 2.0, 3.25])
    assert calibrate.minmax_range(_hist(x)) == (0.0, 3.25)
    assert calibrate.minmax_range(_hist(x - 4.0), symmetric=True) == (-3.5, 3.5)


def test_percentile_matches_numpy_to_one_bin():
    x = RNG.standard_normal(200_000)
    hist = _hist(x)
    width = 2 * hist.limit / hist.bins
    _, t = calibrate.percentile_range(hist, 99.0, symmetric=True)
    assert abs(t - np.percentile(np.abs(x), 99.0)) <= width
    low, high = calibrate.percentile_range(hist, 99.0)
    assert abs(low - np.percentile(x, 0.5)) <= width
    assert abs(high - np.percentile(x, 99.5)) <= width


def test_percentile_100_keeps_everything():
    x = np.array([-1.0, 0.25, 3.0])
    low, high = calibrate.percentile_range(_hist(x), 100.0)
    assert (low, high) == (-1.0, 3.0)


def test_entropy_clips_outliers_of_a_gaussian_near_the_kl_optimum():
    x = np.concatenate([RNG.standard_normal(500_000), np.full(20, 60.0), np.full(20, -60.0)])
    hist = _hist(x)
    low, high = calibrate.entropy_range(hist, symmetric=True)
    assert low == -high
    # TensorRT's KL threshold for an int8 Gaussian lies a few sigma out: far from the outliers,
    # far enough to keep the bulk.
    assert 2.5 < high < 8.0
    # and it beats the outlier-driven minmax range on the bulk of the data
    bulk = x[:500_000]
    assert _mse(bulk, low, high, True) < 0.2 * _mse(bulk, -60.0, 60.0, True)


def test_entropy_keeps_a_relu_range_one_sided():
    x = np.maximum(RNG.standard_normal(100_000), 0)
    low, high = calibrate.entropy_range(_hist(x))
    # Regression: the spike of exact zeros used to drag the threshold to 1.6-2.0; a ReLU
    # output now gets about the threshold of the full Gaussian (~4 sigma).
    assert low == 0.0 and 3.5 < high <= x.max()


@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_range_matches_brute_force_search(symmetric):
    x = np.concatenate([RNG.laplace(size=100_000), [25.0, -18.0]])
    low, high = calibrate.mse_range(_hist(x), symmetric=symmetric)
    lo0, hi0 = calibrate.minmax_range(_hist(x), symmetric)
    brute = min(_mse(x, a * lo0, a * hi0, symmetric) for a in np.linspace(0.005, 1, 400))
    assert _mse(x, low, high, symmetric) <= 1.05 * brute
    assert _mse(x, low, high, symmetric) < 0.85 * _mse(x, lo0, hi0, symmetric)


def test_fake_quantize_matches_quantize_linear_rounding():
    x = np.array([-1.0, -0.5, 0.0, 0.26, 1.0, 5.0])
    got = calibrate.fake_quantize(x, -1.0, 1.0, symmetric=True)
    scale, zero_point, _, _ = calibrate.range_params(-1.0, 1.0, symmetric=True)
    assert zero_point == 0 and scale == pytest.approx(1 / 127)
    expected = np.clip(np.rint(x / scale), -127, 127) * scale  # round half to even
    np.testing.assert_allclose(got, expected)
    scale, zero_point, qmin, qmax = calibrate.range_params(0.0, 6.0)
    assert zero_point == qmin == -128 and qmax == 127 and scale == pytest.approx(6 / 255)


def test_compute_range_rejects_unknown_methods_and_empty_histograms():
    with pytest.raises(ValueError, match="unknown calibration method"):
        calibrate.compute_range(_hist(np.ones(3)), "kl")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no finite values"):
        calibrate.minmax_range(_hist(np.array([np.nan])))


def test_trim_padding_cuts_to_the_longest_row():
    mask = np.array([[1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])
    ids = np.arange(10).reshape(2, 5)
    other = np.ones((2, 7))
    trimmed = calibrate.trim_padding({"ids": ids, "attention_mask": mask, "x": other})
    np.testing.assert_array_equal(trimmed["ids"], ids[:, :3])
    assert trimmed["attention_mask"].shape == (2, 3) and trimmed["x"].shape == (2, 7)
    np.testing.assert_array_equal(calibrate.unpadded_lengths(mask), [2, 3])
    assert calibrate.trim_padding({"ids": ids}) == {"ids": ids}


def test_bias_scale_is_input_scale_times_weight_scale():
    codes, scale = quantize_bias(np.array([1.0, -2.0, 1e12]), 0.5, np.array([0.1, 0.2, 0.1]))
    np.testing.assert_allclose(scale, [0.05, 0.1, 0.05], rtol=1e-6)
    assert codes.dtype == np.int32
    np.testing.assert_array_equal(codes, [20, -20, np.iinfo(np.int32).max])
