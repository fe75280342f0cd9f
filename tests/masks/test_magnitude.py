"""Unstructured magnitude masks: exact counts, lowest scores first, deterministic ties."""

from __future__ import annotations

import numpy as np
import pytest

from onnxcomp import chunks
from onnxcomp.masks import (
    global_magnitude_masks,
    magnitude,
    magnitude_mask,
    prune_count,
    prune_smallest,
)


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


# prune_smallest: the per-layer mask applied without making it, bit for bit the same result.


def _reference_pruned(array: np.ndarray, count: int) -> tuple[np.ndarray | None, int]:
    """The pruning ``prune`` did before prune_smallest, written plainly: rank ``|w|`` (float32)
    with a stable sort (NaN last, ties by flat position), zero the first ``count``; None for
    the array when that makes no new zero (the pass then leaves the tensor as it was)."""
    order = np.argsort(np.abs(array).astype(np.float32).reshape(-1), kind="stable")
    pruned = array.copy().reshape(-1)
    pruned[order[:count]] = 0
    zeros = pruned.size - int(np.count_nonzero(pruned))
    if zeros == array.size - int(np.count_nonzero(array)):
        return None, zeros
    return pruned.reshape(array.shape), zeros


def _cases() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    normal = rng.standard_normal((61, 83)).astype(np.float32) * 0.02
    nonfinite = rng.standard_normal(3001).astype(np.float32)
    nonfinite[rng.random(3001) < 0.2] = np.nan
    nonfinite[rng.random(3001) < 0.1] = np.inf
    nonfinite[rng.random(3001) < 0.1] = -np.inf
    bits = nonfinite.view(np.uint32)  # NaNs of other payloads and signs (also signalling)
    bits[:40] = np.array([0x7F800001, 0xFFC00000, 0x7FFFFFFF, 0xFF800123] * 10, np.uint32)
    zeros = rng.standard_normal(2000).astype(np.float32)
    zeros[rng.random(2000) < 0.5] = 0.0
    zeros[rng.random(2000) < 0.2] = -0.0
    tiny = (rng.standard_normal(1500) * 1e-39).astype(np.float32)  # subnormals
    tiny[::7] = np.float32(1e-45) * rng.integers(-3, 4, size=tiny[::7].size)
    steps = np.nextafter(np.float32(0.5), np.float32(1), dtype=np.float32)
    adjacent = np.float32(0.5) + (np.arange(900) % 5).astype(np.float32) * (steps - 0.5)
    return {
        "normal": normal,
        "one": np.array([3.0], np.float32),
        "two": np.array([-2.0, 2.0], np.float32),
        "ties": rng.integers(-3, 4, size=(40, 50)).astype(np.float32),
        "all_equal": np.full((30, 31), -0.25, np.float32),
        "all_zero": np.zeros(500, np.float32),
        "zeros": zeros,
        "subnormal": tiny,
        "adjacent_floats": rng.permutation(adjacent),
        "nonfinite": nonfinite,
        "all_nan": np.full(300, np.nan, np.float32),
        "tiled": np.tile(rng.standard_normal(64).astype(np.float32), 97),  # repeats every 64
        "conv": rng.standard_normal((16, 8, 3, 3)).astype(np.float32),
    }


CASES = _cases()


def _counts(size: int) -> list[int]:
    fractions = (0.0, 0.3, 0.5, 0.9, 0.97, 0.999)
    return sorted({0, 1, size // 2, size - 1, size, *(prune_count(size, f) for f in fractions)})


@pytest.fixture
def small_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pieces, slices and the sample small enough that these arrays span many of each (and
    slices run on threads), as a big weight does."""
    monkeypatch.setattr(chunks, "PIECE", 64)
    monkeypatch.setattr(chunks, "SLICE", 448)
    monkeypatch.setattr(magnitude, "SAMPLE", 256)


@pytest.mark.parametrize("name", list(CASES))
def test_prune_smallest_equals_the_reference_bit_for_bit(name, small_pieces, monkeypatch):
    array = CASES[name]
    for select in ("sampled", "whole", "counted"):
        if select == "whole":  # selected from all of it, as tensors up to SAMPLE elements are
            monkeypatch.setattr(magnitude, "SAMPLE", 1 << 20)
        if select == "counted":
            monkeypatch.setattr(magnitude, "sampled_threshold", lambda bits, count: None)
        for count in _counts(array.size):
            want, want_zeros = _reference_pruned(array, count)
            got, zeros = prune_smallest(array, count)
            assert zeros == want_zeros, (select, count)
            assert (got is None) == (want is None), (select, count)
            if want is not None:
                assert got.shape == array.shape and got.dtype == np.float32
                assert got.view(np.uint32).tobytes() == want.view(np.uint32).tobytes(), (
                    select,
                    count,
                )


@pytest.mark.parametrize("name", ["normal", "ties", "nonfinite", "zeros", "adjacent_floats"])
def test_reference_is_what_magnitude_mask_prunes(name):
    array = CASES[name]
    for count in _counts(array.size)[1:-1]:
        sparsity = count / array.size  # prune_count(size, count / size) == count
        keep = magnitude_mask(np.abs(array).astype(np.float32), sparsity)
        pruned = np.where(keep, array, np.zeros((), array.dtype))
        want, _ = _reference_pruned(array, count)
        expected = array if want is None else want
        if want is None:  # unchanged: np.where may only have turned -0.0 into +0.0
            assert np.array_equal(pruned, expected)
        else:
            assert pruned.view(np.uint32).tobytes() == expected.view(np.uint32).tobytes()


@pytest.mark.parametrize("name", list(CASES))
def test_sampled_threshold_is_the_counted_one_or_gives_up(name, small_pieces):
    bits = CASES[name].reshape(-1).view(np.uint32)
    found = 0
    for count in _counts(bits.size)[1:-1]:
        counted = magnitude.counted_threshold(bits, count)
        sampled = magnitude.sampled_threshold(bits, count)
        assert sampled is None or sampled == counted, count
        found += sampled is not None
    if name in ("normal", "conv", "subnormal", "tiled"):
        assert found  # the one-read path is the one smooth weights take


def test_counted_threshold_of_nan_counts_every_number_below_it():
    bits = np.array([np.nan, 1.0, np.inf, np.nan, -np.inf], np.float32).view(np.uint32)
    assert magnitude.counted_threshold(bits, 3) == (magnitude._INF, 1, 2)
    assert magnitude.counted_threshold(bits, 4) == (magnitude.NAN_KEY, 3, 2)


def test_prune_smallest_takes_float32_only():
    with pytest.raises(TypeError):
        prune_smallest(np.ones(4, np.float64), 2)
