"""Truncated-SVD math: rank rules, break-even rank, factor error equal to the dropped spectrum."""

from __future__ import annotations

import numpy as np
import pytest

from onnxcomp import factor

RNG = np.random.default_rng(0)


@pytest.mark.parametrize("rank", [1, 5, 17, 24])
def test_relative_error_is_the_norm_of_the_dropped_singular_values(rank):
    w = RNG.standard_normal((24, 40)).astype(np.float32)
    factors = factor.factorize(w, rank)
    actual = np.linalg.norm(w - factors.left @ factors.right) / np.linalg.norm(w)
    s = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    assert factors.relative_error == pytest.approx(np.sqrt(np.sum(s[rank:] ** 2) / np.sum(s**2)))
    assert factors.relative_error == pytest.approx(actual, abs=1e-5)
    assert factors.energy == pytest.approx(1 - factors.relative_error**2)


@pytest.mark.parametrize(("energy", "rank"), [(0.5, 1), (0.9, 2), (0.95, 3), (1.0, 3)])
def test_energy_rule_on_a_known_spectrum(energy, rank):
    # squares 9, 4, 1, 0 of 14: 64%, 93%, 100%
    assert factor.rank_for_energy(np.asarray([3.0, 2.0, 1.0, 0.0]), energy) == rank


def test_energy_rule_on_zero_matrix_and_bad_values():
    assert factor.rank_for_energy(np.zeros(4), 0.9) == 0
    with pytest.raises(ValueError):
        factor.rank_for_energy(np.ones(3), 0.0)


def test_ratio_rule_rounds_and_keeps_one():
    assert factor.rank_for_ratio(64, 128, 0.5) == 32
    assert factor.rank_for_ratio(64, 10, 0.01) == 1
    assert factor.rank_for_ratio(7, 9, 0.5) == 4  # round(3.5) is 4


def test_break_even_rank_is_the_last_rank_that_saves():
    for m, n in [(64, 64), (64, 128), (10, 3000), (5, 5)]:
        r = factor.break_even_rank(m, n)
        assert r * (m + n) < m * n <= (r + 1) * (m + n)


def test_exactly_low_rank_matrix_is_recovered_with_balanced_factors():
    w = (RNG.standard_normal((30, 6)) @ RNG.standard_normal((6, 50))).astype(np.float32)
    singular = factor.singular_values(w)
    assert factor.rank_for_energy(singular, 1.0) == 6
    factors = factor.factorize(w, 6)
    assert factors.left.dtype == np.float32 and factors.rank == 6
    np.testing.assert_allclose(factors.left @ factors.right, w, atol=1e-4)
    assert factors.relative_error < 1e-6
    # sqrt(S) on each side: column norms of L equal row norms of R
    np.testing.assert_allclose(
        np.linalg.norm(factors.left, axis=0), np.linalg.norm(factors.right, axis=1), rtol=1e-4
    )


def test_factorize_rejects_bad_rank_and_shape():
    with pytest.raises(ValueError):
        factor.factorize(np.ones((3, 4)), 4)
    with pytest.raises(ValueError):
        factor.factorize(np.ones((2, 3, 4)), 1)
