"""N:M masks: n kept in every group of m along the axis, short groups, ties, verification."""

from __future__ import annotations

import numpy as np
import pytest

from onnxcomp.masks import group_nonzeros, nm_mask, satisfies_nm


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (4, 8), (1, 2)])
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_every_group_keeps_its_n_largest(n, m, axis):
    scores = np.abs(np.random.default_rng(0).standard_normal((8, 16, 8)))
    keep = nm_mask(scores, n, m, axis)
    moved = np.moveaxis(scores, axis, -1)
    kept = np.moveaxis(keep, axis, -1)
    groups = moved.reshape(*moved.shape[:-1], -1, m)
    kept_groups = kept.reshape(*kept.shape[:-1], -1, m)
    assert np.all(kept_groups.sum(axis=-1) == n)
    largest = np.sort(groups, axis=-1)[..., m - n :]
    assert np.array_equal(np.sort(np.where(kept_groups, groups, -1), axis=-1)[..., m - n :],
                          largest)  # fmt: skip
    assert satisfies_nm(np.where(keep, scores, 0), n, m, axis)


def test_groups_run_along_the_axis_not_across_it():
    # Along axis 0 each column is a group; along axis 1 each row (ties: the later one is kept).
    scores = np.array([[4.0, 1, 1, 1], [3, 2, 2, 2], [2, 3, 3, 3], [1, 4, 4, 4]])
    assert nm_mask(scores, 2, 4, axis=0)[:, 0].tolist() == [True, True, False, False]
    assert nm_mask(scores, 2, 4, axis=1)[0].tolist() == [
        True,
        False,
        False,
        True,
    ]


def test_short_last_group_is_treated_as_zero_padded():
    scores = np.array([[5.0, 4, 3, 2, 1, 9, 8], [1, 1, 1, 1, 7, 6, 0.5]])  # length 7: 4 + 3
    keep = nm_mask(scores, 2, 4, axis=1)
    assert keep.tolist() == [
        [True, True, False, False, False, True, True],
        [False, False, True, True, True, True, False],  # ties: earlier ones are pruned first
    ]
    assert nm_mask(np.ones((3, 1)), 2, 4, axis=1).all()  # one element: min(n, 1) kept
    assert group_nonzeros(np.where(keep, scores, 0), 4, axis=1).tolist() == [[2, 2], [2, 2]]


def test_satisfies_nm_catches_a_dense_group():
    array = np.array([[1.0, 0, 0, 1, 1, 1, 0, 0]])
    assert satisfies_nm(array, 2, 4, axis=1)
    array[0, 1] = 1
    assert not satisfies_nm(array, 2, 4, axis=1)


@pytest.mark.parametrize(("n", "m"), [(4, 4), (5, 4), (-1, 4)])
def test_bad_n_m_is_refused(n, m):
    with pytest.raises(ValueError, match="0 <= n < m"):
        nm_mask(np.ones((4, 4)), n, m, axis=0)
