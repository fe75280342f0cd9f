"""Binary and ternary codes: their scales, and the least-squares threshold against TWN's."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from onnxcomp import quant

W = np.random.default_rng(0).standard_normal((16, 256)).astype(np.float32)


def _error(w: np.ndarray, codes: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Squared reconstruction error per row (per-channel layout, axis 0)."""
    return ((w - codes * alpha[:, None]) ** 2).sum(axis=1)


def test_binary_codes_are_signs_scaled_by_mean_magnitude():
    codes, alpha = quant.binarize(W, axis=0)
    assert set(np.unique(codes)) == {-1, 1}
    np.testing.assert_array_equal(codes, np.where(W >= 0, 1, -1))
    np.testing.assert_allclose(alpha, np.abs(W).mean(axis=1), rtol=1e-6)
    # mean |w| is the least-squares scale for sign codes: nudging it only adds error
    for factor in (0.95, 1.05):
        assert np.all(_error(W, codes, alpha * factor) > _error(W, codes, alpha))


def test_twn_rule_thresholds_at_07_mean_magnitude():
    codes, alpha = quant.ternarize(W, axis=0, rule="twn")
    delta = 0.7 * np.abs(W).mean(axis=1, keepdims=True)
    np.testing.assert_array_equal(codes, np.sign(W) * (np.abs(W) > delta))
    kept = np.where(np.abs(W) > delta, np.abs(W), np.nan)
    np.testing.assert_allclose(alpha, np.nanmean(kept, axis=1), rtol=1e-6)


def test_least_squares_rule_never_does_worse_than_twn_on_gaussian_weights():
    optimal = _error(W, *quant.ternarize(W, axis=0, rule="optimal"))
    twn = _error(W, *quant.ternarize(W, axis=0, rule="twn"))
    assert np.all(optimal <= twn * (1 + 1e-6))
    assert optimal.sum() < twn.sum()


def test_least_squares_rule_finds_the_best_threshold_by_brute_force():
    row = W[:1, :40]
    codes, alpha = quant.ternarize(row, axis=0)
    magnitudes = np.sort(np.abs(row[0]))[::-1]
    best = min(((row[0] ** 2).sum() - magnitudes[:k].sum() ** 2 / k) for k in range(1, 41))
    assert _error(row, codes, alpha)[0] == pytest.approx(best, rel=1e-5)


def test_least_squares_rule_finds_the_best_threshold_of_long_channels():
    # channels of 4096 are searched from bins of their magnitudes, not sorted whole
    w = np.random.default_rng(1).standard_t(3, (4, 4096)).astype(np.float32)
    codes, alpha = quant.ternarize(w, axis=0)
    magnitudes = np.sort(np.abs(w.astype(np.float64)), axis=1)[:, ::-1]
    kept = np.arange(1, w.shape[1] + 1)
    best = (w.astype(np.float64) ** 2).sum(axis=1) - np.max(magnitudes.cumsum(1) ** 2 / kept, 1)
    np.testing.assert_allclose(_error(w, codes, alpha), best, rtol=1e-9)


def test_blocked_ternary_has_one_scale_per_block():
    codes, alpha = quant.ternarize(W, axis=1, block_size=64)
    assert alpha.shape == (16, 4) and set(np.unique(codes)) <= {-1, 0, 1}
    block = W[2, 64:128]
    kept = np.abs(block)[codes[2, 64:128] != 0]
    assert alpha[2, 1] == pytest.approx(kept.mean(), rel=1e-6)


def test_all_zero_channel_gets_zero_codes_and_zero_scale():
    w = W.copy()
    w[5] = 0
    for rule in ("optimal", "twn"):
        codes, alpha = quant.ternarize(w, axis=0, rule=rule)
        assert not np.any(codes[5]) and alpha[5] == 0 and np.all(np.isfinite(alpha))


@pytest.mark.parametrize(("axis", "block_size"), [(None, 0), (1, 0), (0, 0), (0, 16), (1, 4)])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_coders_refuse_inf_and_nan_when_asked(axis, block_size, value, dtype):
    # Wide enough for the binned threshold search (channels of >= 1024) along axis 1.
    w = np.random.default_rng(4).standard_normal((1030, 24)).astype(dtype)
    bad = w.copy()
    bad[1027, 21] = value  # in a partial last block along either axis
    coders = [
        lambda x, finite: quant.binarize(x, axis=axis, block_size=block_size, finite=finite),
        *(
            lambda x, finite, rule=rule: quant.ternarize(
                x, axis=axis, block_size=block_size, rule=rule, finite=finite
            )
            for rule in ("optimal", "twn")
        ),
    ]
    for coder in coders:
        for a, b in zip(coder(w, False), coder(w, True), strict=True):  # finite: the same
            np.testing.assert_array_equal(a, b)
        with pytest.raises(quant.NonFiniteWeight):
            coder(bad, True)
