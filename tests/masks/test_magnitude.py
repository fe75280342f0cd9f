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
            monkeypatch.setattr(magnitude, "sample_window", lambda bits, count: None)
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
            # Into memory a result was made in before (NaN bits, as garbage): overwritten.
            out = np.full(array.shape, np.nan, np.float32)
            got, zeros = prune_smallest(array, count, out=out)
            assert zeros == want_zeros and (got is None) == (want is None)
            if want is not None:
                assert got is out and got.tobytes() == want.tobytes(), (select, count)


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


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The counts :func:`magnitude.counted_threshold` is called with (it still runs)."""
    calls: list[int] = []
    real = magnitude.counted_threshold

    def spy(bits: np.ndarray, count: int) -> tuple[int, int, int]:
        calls.append(count)
        return real(bits, count)

    monkeypatch.setattr(magnitude, "counted_threshold", spy)
    return calls


def _sorted_keys(array: np.ndarray) -> np.ndarray:
    """The ranking keys of ``|w|``, sorted: the bits with the sign cleared, every NaN one key."""
    return np.sort(np.minimum(array.view(np.uint32) & 0x7FFFFFFF, magnitude.NAN_KEY), axis=None)


def _windows(keys: np.ndarray, count: int) -> list[tuple[int, int, float]]:
    """Windows ``(low, high, share)`` of keys around, at, beside and far from the count-th
    smallest of the sorted ``keys``: what a sample may give, right or wrong."""
    key = int(keys[count - 1])
    top = magnitude.NAN_KEY
    windows = [
        (0, top, 1.0),  # everything below the NaNs
        (key, key + 1, 1.0),  # the threshold alone: every tie gathered
        (max(key - 3, 0), min(key + 4, top), 0.5),
        (
            int(keys[max(count - 40, 0)]),
            min(int(keys[min(count + 40, keys.size - 1)]) + 1, top),
            0.1,
        ),
        (key + 1, top, 1.0),  # misses: the threshold is below it
        (0, key, 1.0) if key else (1, 2, 1.0),  # misses: above it
        (0, top, 1e-9),  # gathers far past what its share promised
    ]
    return [(low, high, share) for low, high, share in windows if 0 <= low < high <= top]


@pytest.mark.parametrize("name", list(CASES))
def test_one_read_pruning_equals_the_reference_for_any_window(
    name, small_pieces, counted, monkeypatch
):
    # Whatever window the sample gives (holding the threshold, missing it, full of ties),
    # the result is the reference's; a window holding it is used without the counted select.
    monkeypatch.setattr(magnitude, "SAMPLE", 0)  # tiny tensors take the one-read path too
    array = CASES[name]
    keys = _sorted_keys(array)
    for count in _counts(array.size)[1:-1]:
        want, want_zeros = _reference_pruned(array, count)
        for window in _windows(keys, count):
            monkeypatch.setattr(magnitude, "sample_window", lambda bits, count, w=window: w)
            counted.clear()
            got, zeros = prune_smallest(array, count)
            assert zeros == want_zeros, (count, window)
            assert (got is None) == (want is None), (count, window)
            if want is not None:
                assert got.shape == array.shape and got.dtype == np.float32
                assert got.tobytes() == want.tobytes(), (count, window)
            low, high, share = window
            key = int(keys[count - 1])
            if low <= key < high and share == 1.0 and key != magnitude.NAN_KEY:
                assert not counted, (count, window)


@pytest.mark.parametrize("name", ["normal", "conv", "subnormal", "tiled", "zeros"])
def test_smooth_weights_take_the_one_read_path(name, small_pieces, counted):
    # The sample's window holds the threshold: the counted select (two more reads) is not run.
    counts = _counts(CASES[name].size)[1:-1]
    for count in counts:
        prune_smallest(CASES[name], count)
    assert not counted, counted


def test_counted_threshold_of_nan_counts_every_number_below_it():
    bits = np.array([np.nan, 1.0, np.inf, np.nan, -np.inf], np.float32).view(np.uint32)
    assert magnitude.counted_threshold(bits, 3) == (magnitude._INF, 1, 2)
    assert magnitude.counted_threshold(bits, 4) == (magnitude.NAN_KEY, 3, 2)


def test_prune_smallest_takes_float32_only():
    with pytest.raises(TypeError):
        prune_smallest(np.ones(4, np.float64), 2)
    with pytest.raises(ValueError):
        prune_smallest(np.ones(4, np.float32), 2, out=np.empty(5, np.float32))
