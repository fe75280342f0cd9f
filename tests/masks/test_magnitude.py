"""Unstructured magnitude masks: exact counts, lowest scores first, deterministic ties."""

from __future__ import annotations

import numpy as np
import pytest

from onnxcomp.masks import global_magnitude_masks, magnitude_mask, prune_count


@pytest.mark.parametrize(
    ("size", "sparsity", "count"),
    [(100, 0.29, 29), (10, 0.7, 7), (10, 0.25, 3), (7, 0.5, 4), (5, 0.0, 0), (3, 1.0, 3)],
)
def test_prune_count_is_the_nearest_integer_half_up(size, sparsity, count):
    assert prune_count(size, sparsity) == count


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.8, 0.97])
def test_layer_mask_zeros_exactly_the_lowest_scores(sparsity):
    scores = np.abs(np.random.default_rng(0).standard_normal((16, 3, 3, 3)))
    keep = magnitude_mask(scores, sparsity)
    assert keep.shape == scores.shape
    assert np.count_nonzero(~keep) == prune_count(scores.size, sparsity)
    assert scores[~keep].max() <= scores[keep].min()


def test_ties_prune_the_earliest_positions_first():
    scores = np.array([[1.0, 0.5, 0.5], [0.5, 0.5, 2.0]])
    keep = magnitude_mask(scores, 0.5)  # 3 of the four 0.5s go, in row-major order
    assert keep.tolist() == [[True, False, False], [False, True, True]]


def test_global_masks_share_one_threshold_and_an_exact_total():
    rng = np.random.default_rng(1)
    scores = [np.abs(rng.standard_normal(shape)) * scale for shape, scale in
              [((8, 8), 1.0), ((4, 16), 0.1), ((30,), 3.0)]]  # fmt: skip
    keep = global_magnitude_masks(scores, 0.6)
    assert [k.shape for k in keep] == [s.shape for s in scores]
    pruned = sum(int(np.count_nonzero(~k)) for k in keep)
    assert pruned == prune_count(8 * 8 + 4 * 16 + 30, 0.6)
    highest_pruned = max(s[~k].max() for s, k in zip(scores, keep, strict=True) if (~k).any())
    lowest_kept = min(s[k].min() for s, k in zip(scores, keep, strict=True) if k.any())
    assert highest_pruned <= lowest_kept
    assert np.count_nonzero(~keep[1]) == 64  # the small-scale tensor goes first, entirely


def test_global_ties_prune_earlier_tensors_first():
    keep = global_magnitude_masks([np.ones(3), np.ones(3)], 0.5)
    assert [k.tolist() for k in keep] == [[False, False, False], [True, True, True]]


def test_zero_sparsity_keeps_everything_and_nan_scores_go_last():
    scores = np.array([np.nan, 1.0, 2.0, np.nan])
    assert magnitude_mask(scores, 0.0).all()
    assert magnitude_mask(scores, 0.75).tolist() == [False, False, False, True]
