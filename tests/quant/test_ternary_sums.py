"""Ternary's scales from the threshold search, and sums of channels strided across rows.

``ternarize`` takes alpha's sum and count from the search for the threshold where that sum
is provably the one a second pass would add (exact), and adds the other groups' in a second
pass; ``_column_sums`` adds strided channels row after row as numpy's reduce does; ``_bins``
counts and sums magnitudes per bin from one bincount. Each against a plain formulation,
bit for bit (the references in test_identity.py define the expected codes and scales).
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest

from onnxcomp import quant
from onnxcomp.quant import linear, ternary
from tests.quant.test_identity import (
    LONG_KINDS,
    _long_groups,
    _reduce,
    _same,
    _ternary_reference,
    _weights,
)

RNG = np.random.default_rng(11)


@pytest.fixture
def second_pass(monkeypatch):
    """Each pass of ternarize's over the weight for sums (:func:`ternary._group_sums`): how
    many groups it sums, and whether above a threshold (alpha's, added again after the search
    or the coding) or not (TWN's mean)."""
    calls = []
    sums = ternary._group_sums

    def recorded(w, axis, block_size, threshold=None, **kwargs):
        total, count = sums(w, axis, block_size, threshold, **kwargs)
        calls.append((total.size, threshold is not None))
        return total, count

    monkeypatch.setattr(ternary, "_group_sums", recorded)
    return calls


def _unknown(w, axis, block):
    """How many groups' sums the search leaves to the second pass."""
    return int(np.isnan(ternary._optimal_thresholds(w, axis, block)[1]).sum())


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_finite_weights_need_no_second_pass(second_pass, dtype):
    # binned channels on either axis, sorted blocks, one group per tensor; few distinct
    # values (ties), exactly equal f(k) (float32 only: its scales overflow float16)
    cases = [("normal", (12, 2048), 0, 0), ("normal", (2048, 12), 1, 0),
             ("student2", (4, 4096), 0, 0), ("few_values", (8, 2048), 0, 0),
             ("normal", (64, 96), 1, 32), ("few_values", (64, 90), 1, 32),
             ("normal", (33, 70), None, 0)]  # fmt: skip
    if dtype == np.float32:
        cases.append(("tied_f", (8, 2048), 0, 0))
    for kind, shape, axis, block in cases:
        w = _long_groups(kind, shape).astype(dtype)
        ours = quant.ternarize(w, axis=axis, block_size=block)
        _same(ours, _ternary_reference(w, axis, block, "optimal"))
    assert second_pass == []


@pytest.mark.parametrize("kind", [k for k in LONG_KINDS if k != "nonfinite"])
def test_searched_sums_are_those_of_the_magnitudes_above_the_threshold(kind):
    # what alpha needs, |w| > threshold, whatever the search kept (ties, all-zero groups):
    # the count, and where the search vouches for it the sum to the bit (the exact sum)
    w = _long_groups(kind, (6, 2048))
    w[5] = 0
    for rows, block in ((w, 0), (w, 64)):
        found = ternary._optimal_thresholds(rows, 1 if block else 0, block)
        delta, total, count = (part.reshape(-1) for part in found)
        groups = np.abs(rows.reshape(len(delta), -1).astype(np.float64))
        kept = groups > delta[:, None]
        np.testing.assert_array_equal(count, kept.sum(axis=1))
        exact = [math.fsum(g[k]) for g, k in zip(groups, kept, strict=True)]
        known = ~np.isnan(total)
        assert known.sum() >= len(total) // 2
        np.testing.assert_array_equal(total[known], np.array(exact)[known])


def test_sums_that_may_round_are_added_again(monkeypatch, second_pass):
    # with 2^32 in place of 2^53 as the limit of exact sums, dense groups (sums of ~2^34
    # units of their smallest kept magnitude) go to the second pass, sparse ones (~2^30) not
    monkeypatch.setattr(ternary, "EXACT_UNITS", 2.0**32)
    w = np.concatenate([_long_groups("normal", (8, 2048)), _long_groups("mostly_zero", (8, 2048))])
    for axis, groups in ((0, w), (1, w.T)):
        assert _unknown(groups, axis, 0) == 8
        _same(quant.ternarize(groups, axis=axis), _ternary_reference(groups, axis, 0, "optimal"))
    rows = w.reshape(64, 512)  # sorted whole, not binned: the same check there
    assert _unknown(rows, 0, 0) == 32
    _same(quant.ternarize(rows, axis=0), _ternary_reference(rows, 0, 0, "optimal"))
    assert second_pass == [(16, True), (16, True), (64, True)]  # all groups, unknown taken


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_groups_with_nan_or_inf_are_added_again(dtype):
    # inf becomes the dtype's largest value in the search but stays inf in alpha's sum
    w = _long_groups("normal", (6, 2048))
    w[1, 7], w[3, 100], w[4, 5] = np.inf, np.nan, -np.inf
    w = w.astype(dtype)
    for axis, groups in ((0, w), (1, w.T)):
        assert _unknown(groups, axis, 0) == 3
        _same(quant.ternarize(groups, axis=axis), _ternary_reference(groups, axis, 0, "optimal"))
    assert _unknown(w, 1, 512) == 3  # blocks, sorted whole
    _same(quant.ternarize(w, axis=1, block_size=512), _ternary_reference(w, 1, 512, "optimal"))


def _sequential_sums(w: np.ndarray, threshold: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Per column, |w| (above threshold) added in float64 one row after another."""
    total = np.zeros(w.shape[1])
    count = np.zeros(w.shape[1])
    for row in np.abs(w.astype(np.float64)):
        kept = np.ones(row.shape, bool) if threshold is None else row > threshold
        total = total + np.where(kept, row, 0)
        count += kept
    return total, count


@pytest.mark.parametrize("shape", [(300, 2), (37, 9), (1, 5), (513, 130)])
def test_strided_channels_are_summed_row_after_row(monkeypatch, shape):
    # row blocks of a few rows, runs of a few channels (a last run of one joins the one
    # before); magnitudes over ~60 octaves, whose float64 sums depend on the order
    monkeypatch.setattr(linear, "PIECE_ELEMENTS", 64)
    monkeypatch.setattr(ternary, "COLUMN_RUN", 4)
    w = _weights("wide", shape, np.float32)
    threshold = np.median(np.abs(w), axis=0).astype(np.float64)
    for limit in (None, threshold):
        total, count = ternary._group_sums(w, 1, 0, limit)
        expected = _sequential_sums(w, limit)
        np.testing.assert_array_equal(total.view(np.int64), expected[0].view(np.int64))
        np.testing.assert_array_equal(count, expected[1] if limit is not None else shape[0])
    w[::7, 1] = np.nan  # left out of thresholded sums; a NaN sum without a threshold
    total, count = ternary._group_sums(w, 1, 0, threshold)
    expected = _sequential_sums(np.nan_to_num(w, nan=0.0), threshold)
    np.testing.assert_array_equal(total, expected[0])
    np.testing.assert_array_equal(count, expected[1])
    assert np.isnan(ternary._group_sums(w, 1, 0)[0][1])


def _reference_bins(rows, shift, top_key, bins):
    """Counts and exact sums (math.fsum) per bin, bit pattern by bit pattern."""
    counts = np.zeros((bins + 1, len(rows)))
    sums = np.zeros((bins + 1, len(rows)))
    for i, row in enumerate(rows):
        j = np.minimum(top_key[i] - (row.view(np.int32) >> shift[i]), bins)
        for b in range(bins + 1):
            counts[b, i] = (j == b).sum()
            sums[b, i] = math.fsum(row[j == b].astype(np.float64))
    return counts, sums


@pytest.mark.parametrize("length", [3000, (1 << 15) + 5])
def test_bins_count_and_sum_exactly(length):
    # normal, denormal and huge magnitudes; rows long enough for two bincounts (2^15 or more)
    rows = np.abs(np.stack([_long_groups(kind, (length,)) for kind in ("normal", "denormal", "huge",
                                                                    "few_values")]))  # fmt: skip
    top = rows.max(axis=1)
    shift = np.array([18, 20, 23, 16])
    top_key = top.view(np.int32).astype(np.int64) >> shift
    bins = 31
    counts, sums = ternary._bins(rows, shift, top_key, bins, rows.sum(axis=1, dtype=np.float64))
    expected_counts, expected_sums = _reference_bins(rows, shift, top_key, bins)
    np.testing.assert_array_equal(counts, expected_counts)
    np.testing.assert_array_equal(sums[:-1], expected_sums[:-1])  # all but the lumped bin
    np.testing.assert_allclose(sums[-1], expected_sums[-1], rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_twn_sums_come_from_the_coding_pass(second_pass, dtype):
    # finite groups on every layout (partial blocks, strided channels): no pass after coding
    w = _weights("normal" if dtype == np.float16 else "wide", (96, 70), dtype)  # finite
    for axis, block in ((None, 0), (0, 0), (1, 0), (1, 32), (0, 32)):
        ours = quant.ternarize(w, axis=axis, block_size=block, rule="twn")
        _same(ours, _ternary_reference(w, axis, block, "twn"))
    assert all(not thresholded for _, thresholded in second_pass)  # the means alone


def test_twn_sums_that_may_round_are_added_again(monkeypatch, second_pass):
    # with 2^31 in place of 2^53 as the limit of exact sums (of multiples of the smallest
    # kept magnitude's ulp, above delta 2^-24), sums above 64 delta are taken as rounded:
    # the dense groups' at delta 0.5, not the sparse ones'; ternarize adds them again
    monkeypatch.setattr(ternary, "EXACT_UNITS", 2.0**31)
    w = RNG.standard_normal((8, 600)).astype(np.float32)
    w[:4, 16:] = 0
    for axis, groups in ((0, w), (1, w.T)):
        total = ternary._ternary_codes(groups, np.full(8, 0.5), axis, 0, sums=True)[1]
        assert np.isnan(total).tolist() == [False] * 4 + [True] * 4
        ours = quant.ternarize(groups, axis=axis, rule="twn")
        _same(ours, _ternary_reference(groups, axis, 0, "twn"))
    assert [call for call in second_pass if call[1]] == [(8, True), (8, True)]


@pytest.mark.parametrize(("shape", "axis"), [((255, 2), 1), ((256, 2), 1), ((2, 65535), 0),
                                             ((2, 65536), 0), ((1, 65537), None)])  # fmt: skip
def test_twn_counts_past_narrow_integers(shape, axis):
    # all kept: a group's count in one piece at the limits of uint8 and uint16 sums
    w = np.where(RNG.random(shape) < 0.5, -1.5, 1.5).astype(np.float32)
    codes, alpha = quant.ternarize(w, axis=axis, rule="twn")
    np.testing.assert_array_equal(codes, np.sign(w).astype(np.int8))
    np.testing.assert_array_equal(alpha, np.full(alpha.shape, 1.5))


def test_twn_counts_past_float32_integers():
    # 2^24 + 3 kept (float32 cannot count them), five of them 3: alpha to the bit
    w = np.ones((1 << 24) + 3, np.float32)
    w[:5] = -3
    codes, alpha = quant.ternarize(w, axis=None, rule="twn")
    assert codes[:5].tolist() == [-1] * 5 and codes.min() == -1 and (codes[5:] == 1).all()
    assert alpha == np.float64(w.size + 10) / w.size


@pytest.mark.parametrize(("axis", "block"), [(None, 0), (0, 0), (1, 0), (1, 1000), (0, 16)])
def test_coded_sums_are_nanmeans_where_exact(axis, block):
    # any thresholds, tiny ones too: magnitudes over ~60 octaves whose float64 sums round
    # differently in the coding pass's order; those must be NaN, the others nanmean's sums
    w = _weights("wide", (64, 3000), np.float32)
    groups = np.asarray(_reduce(w, axis, block, lambda g, axis: np.nanmedian(np.abs(g), axis)))
    delta = groups * np.where(np.arange(groups.size) % 2, 1e-12, 1.0).reshape(groups.shape)
    codes, total, count = ternary._ternary_codes(w, delta, axis, block, sums=True)
    kept = np.where(np.abs(w) > quant.expand(delta, w.shape, axis, block), np.abs(w), np.nan)
    np.testing.assert_array_equal(codes, np.where(np.isnan(kept), 0, np.sign(w)).astype(np.int8))
    counted = _reduce(kept, axis, block, lambda g, axis: (g > 0).sum(axis))
    np.testing.assert_array_equal(count, counted)
    reference = _reduce(kept, axis, block, np.nansum)
    known = ~np.isnan(total)
    assert 0 < known.sum() < known.size or axis is None
    np.testing.assert_array_equal(total[known], reference[known])
