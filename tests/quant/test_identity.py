"""The piecewise float32 codes are bit for bit those of the plain float64 formulation.

The references below are the algorithms as first written (whole-array float64, NaN-padded
groups, np.nanmean): clear, slow, and the definition of the expected codes and scales.
"""

from __future__ import annotations

import functools
import warnings

import ml_dtypes
import numpy as np
import pytest

from onnxcomp import quant
from onnxcomp.quant import linear, ternary

RNG = np.random.default_rng(7)
BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = [np.float32, np.float16, ml_dtypes.bfloat16]
# (shape, [(axis, block_size)]): per tensor, per channel on either side, whole and partial
# blocks along the first, middle and last axis, lone channels
LAYOUTS = [
    ((24, 40), [(None, 0), (0, 0), (1, 0), (1, 16), (0, 16), (1, 7)]),
    ((6, 40, 3, 1), [(0, 0), (1, 0), (1, 16), (2, 0)]),
    ((300, 3), [(1, 0), (0, 32)]),
    ((40, 1), [(1, 0), (0, 16)]),
    ((37,), [(0, 16)]),
]
CASES = [(shape, axis, block) for shape, layouts in LAYOUTS for axis, block in layouts]


def _groups(w: np.ndarray, axis: int | None, block: int) -> np.ndarray:
    """Groups sharing a parameter along the last axis, a partial block padded with NaN."""
    if axis is None:
        return w.reshape(1, -1)
    if block == 0:
        return np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    blocks = -(-w.shape[axis] // block)
    padding = [(0, 0)] * w.ndim
    padding[axis] = (0, blocks * block - w.shape[axis])
    padded = np.pad(w, padding, constant_values=np.nan)
    split = padded.reshape((*w.shape[:axis], blocks, block, *w.shape[axis + 1 :]))
    return np.moveaxis(split, axis + 1, -1)


def _reduce(w, axis, block, reducer, dtype=np.float64):
    reduced = np.asarray(reducer(_groups(np.asarray(w, dtype), axis, block), axis=-1), np.float64)
    return reduced.reshape(()) if axis is None else reduced


def _linear_reference(w, bits, axis, block, symmetric):
    qmin, qmax = quant.qrange(bits, symmetric)
    dtype = w.dtype
    if symmetric:
        amax = _reduce(w, axis, block, lambda g, axis: np.nanmax(np.abs(g), axis=axis), dtype)
        scale, zero = linear.store_scale(amax / qmax, dtype), None
    else:
        low = np.minimum(_reduce(w, axis, block, np.nanmin, dtype), 0.0)
        high = np.maximum(_reduce(w, axis, block, np.nanmax, dtype), 0.0)
        scale = linear.store_scale((high - low) / (qmax - qmin), dtype)
        zero = np.clip(np.rint(qmin - low / scale.astype(np.float64)), qmin, qmax)
        zero = zero.astype(np.int8)
    return scale, zero, _codes_reference(w, scale, zero, bits, axis, block)


def _codes_reference(w, scale, zero, bits, axis, block):
    qmin, qmax = quant.qrange(bits, zero is None)
    s = quant.expand(np.asarray(scale, np.float64), w.shape, axis, block)
    q = np.rint(np.asarray(w, np.float64) / s)
    if zero is not None:
        q += quant.expand(zero.astype(np.float64), w.shape, axis, block)
    return np.clip(q, qmin, qmax).astype(np.int8)


def _binary_reference(w, axis, block):
    alpha = _reduce(w, axis, block, lambda g, axis: np.nanmean(np.abs(g), axis))
    return np.where(np.asarray(w) >= 0, 1, -1).astype(np.int8), alpha


def _optimal(groups, axis=-1, largest=None):
    magnitudes = np.nan_to_num(np.abs(groups), nan=0.0, posinf=largest)
    magnitudes = np.sort(magnitudes, axis=-1)[..., ::-1]
    magnitudes = magnitudes.astype(np.float64)
    f = np.cumsum(magnitudes, axis=-1) ** 2 / np.arange(1, magnitudes.shape[-1] + 1)
    best = np.argmax(f, axis=-1)[..., None]
    padded = np.concatenate([magnitudes, np.zeros_like(magnitudes[..., :1])], axis=-1)
    last = np.take_along_axis(magnitudes, best, -1)[..., 0]
    return (last + np.take_along_axis(padded, best + 1, -1)[..., 0]) / 2


def _ternary_reference(w, axis, block, rule):
    w64 = np.asarray(w, np.float64)
    if rule == "twn":
        delta = 0.7 * _reduce(w, axis, block, lambda g, axis: np.nanmean(np.abs(g), axis))
    else:
        # bfloat16 in float32 (the same values; inf becomes bfloat16's largest, as float32's
        # becomes float32's): np.nan_to_num leaves ml_dtypes' NaN and inf alone, so the
        # first formulation sorted a partial block's NaN padding as NaN, which made that
        # block's threshold NaN and all its codes 0
        largest = float(ml_dtypes.finfo(w.dtype).max)
        optimal = functools.partial(_optimal, largest=largest)
        delta = _reduce(w, axis, block, optimal, np.float32 if w.dtype == BF16 else w.dtype)
    keep = np.abs(w64) > quant.expand(delta, w.shape, axis, block)
    kept = np.where(keep, np.abs(w64), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        alpha = _reduce(kept, axis, block, np.nanmean)
    return np.where(keep, np.sign(w64), 0).astype(np.int8), np.nan_to_num(alpha, nan=0.0)


def _weights(kind: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    """Random weights, or adversarial ones: ties, signed zeros, denormals, NaN and inf, a
    wide dynamic range, a constant group."""
    w = RNG.standard_normal(shape).astype(np.float32)
    if kind == "wide":
        w *= np.exp(RNG.standard_normal(shape) * 6).astype(np.float32)
    elif kind == "ties":
        w = np.sign(w) * np.float32(2.0)
    elif kind == "zeros":
        w[...] = 0.0
        w.reshape(-1)[::3] = -0.0
    elif kind == "denormal":
        w *= np.float32(1e-40)
    elif kind == "nonfinite":
        w.reshape(-1)[::7] = np.nan
        w.reshape(-1)[::11] = np.inf
        w.reshape(-1)[::13] = -np.inf
    with np.errstate(over="ignore"):  # wide magnitudes overflow float16 to inf
        return w.astype(dtype)


def _same(ours, reference):
    for a, b in zip(ours, reference, strict=True):
        if b is None:
            assert a is None
            continue
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["normal", "wide", "ties", "zeros", "denormal"])
@pytest.mark.parametrize(("shape", "axis", "block"), CASES)
def test_linear_codes_match_the_float64_formulation(dtype, kind, shape, axis, block):
    w = _weights(kind, shape, dtype)
    for bits, symmetric in ((8, True), (4, True), (4, False), (2, False)):
        scale, zero = quant.linear_params(
            w, bits, axis=axis, block_size=block, symmetric=symmetric, dtype=dtype
        )
        codes = quant.quantize(w, scale, zero, bits, axis=axis, block_size=block)
        _same((scale, zero, codes), _linear_reference(w, bits, axis, block, symmetric))


def test_float32_quotients_on_a_half_integer_are_redone_in_float64():
    # w = (k + 1/2) s rounded to float32: w / s is within float32 rounding of k + 1/2 but
    # mostly not on it, so rounding the float32 quotient alone gets ~40% of these wrong
    scale = RNG.uniform(0.001, 1, (1, 512)).astype(np.float32)
    k = RNG.integers(-127, 127, (64, 512))
    w = ((k + 0.5) * scale.astype(np.float64)).astype(np.float32)
    naive = np.rint(w / scale)
    reference = _codes_reference(w, scale[0], None, 8, 1, 0)
    assert (naive != reference).mean() > 0.2
    np.testing.assert_array_equal(quant.quantize(w, scale[0], None, 8, axis=1), reference)
    exact_halves = np.float32([0.5, 1.5, 2.5, -0.5, -2.5, 126.5, 300.0])  # ties to even
    np.testing.assert_array_equal(
        quant.quantize(exact_halves, np.float32(1), None, 8, axis=None), [0, 2, 2, 0, -2, 126, 127]
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["normal", "wide", "ties", "zeros", "denormal", "nonfinite"])
@pytest.mark.parametrize(("shape", "axis", "block"), CASES)
def test_binary_and_ternary_match_the_float64_formulation(dtype, kind, shape, axis, block):
    w = _weights(kind, shape, dtype)
    _same(quant.binarize(w, axis=axis, block_size=block), _binary_reference(w, axis, block))
    for rule in ("optimal", "twn"):
        ours = quant.ternarize(w, axis=axis, block_size=block, rule=rule)
        _same(ours, _ternary_reference(w, axis, block, rule))


@pytest.mark.parametrize("piece", [64, 1000])
def test_results_do_not_depend_on_the_piece_size(monkeypatch, piece):
    # several pieces per call, the last ones partial; float64 sums of wide-range magnitudes
    # whose last bit changes with the order they are added in
    monkeypatch.setattr(linear, "PIECE_ELEMENTS", piece)
    for shape, layouts in [((300, 77), [(0, 0), (1, 0), (1, 32), (0, 32)]),
                           ((33, 65, 3), [(1, 0), (1, 16)]), ((129, 2), [(1, 0)])]:  # fmt: skip
        w = _weights("wide", shape, np.float32)
        for axis, block in layouts:
            _same(quant.binarize(w, axis=axis, block_size=block), _binary_reference(w, axis, block))
            for rule in ("optimal", "twn"):
                ours = quant.ternarize(w, axis=axis, block_size=block, rule=rule)
                _same(ours, _ternary_reference(w, axis, block, rule))
            ours = quant.linear_params(w, 4, axis=axis, block_size=block, symmetric=False)
            codes = quant.quantize(w, *ours, 4, axis=axis, block_size=block)
            _same((*ours, codes), _linear_reference(w, 4, axis, block, False))


def test_by_groups_slices_match_the_reference_on_the_same_slices(monkeypatch):
    # numpy sums one channel strided across rows pairwise, several one row after another: a
    # last slice of one channel (33 = 4 x 8 + 1) is summed as the reference sums it there
    monkeypatch.setattr(linear, "CHUNK_ELEMENTS", 1 << 12)
    w = _weights("wide", (512, 33), np.float32)
    for rule in ("optimal", "twn"):
        ours = quant.by_groups(
            lambda part, rule=rule: (*quant.ternarize(part, axis=1, rule=rule), None), w, axis=1
        )
        reference = quant.by_groups(
            lambda part, rule=rule: (*_ternary_reference(part, 1, 0, rule), None), w, axis=1
        )
        _same(ours[:2], reference[:2])


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("count", [0, 1, 5, 8, 1 << 17, (1 << 17) + 3])
def test_packing_matches_the_byte_by_byte_formulation(bits, count):
    high = 2 ** (bits - 1)
    values = RNG.integers(-high, high, count).astype(np.int8)
    per_byte = 8 // bits
    codes = np.pad(values.astype(np.uint8) & (2**bits - 1), (0, -count % per_byte))
    codes = codes.reshape(-1, per_byte).astype(np.uint16)
    reference = sum(codes[:, i] << (i * bits) for i in range(per_byte))
    np.testing.assert_array_equal(quant.pack(values, bits), np.asarray(reference, np.uint8))
    strided = np.repeat(values, 2)[::2]  # not contiguous
    np.testing.assert_array_equal(quant.pack(strided, bits), quant.pack(values, bits))


def _long_groups(kind: str, shape: tuple[int, ...]) -> np.ndarray:
    """Weights whose groups are long enough to be thresholded from bins (ternary's
    ``_binned_rows``): smooth, heavy-tailed, sparse and discrete distributions, exact ties
    between the f(k) the threshold maximises, and the extremes of float32."""
    normal = RNG.standard_normal(shape)
    if kind == "normal":
        return normal.astype(np.float32)
    if kind == "uniform":
        return RNG.uniform(-1, 1, shape).astype(np.float32)
    if kind == "student2":
        return RNG.standard_t(2, shape).astype(np.float32)
    if kind == "cauchy":
        return RNG.standard_cauchy(shape).astype(np.float32)
    if kind == "lognormal":  # magnitudes over ~30 octaves: float64 sums that round
        return (normal * RNG.lognormal(0, 4, shape)).astype(np.float32)
    if kind == "mostly_zero":
        return np.where(RNG.random(shape) < 0.95, 0, normal).astype(np.float32)
    if kind == "few_values":  # every bin one value, many ties
        return (RNG.integers(-3, 4, shape) * 0.25).astype(np.float32)
    if kind == "constant":
        return np.full(shape, -0.3, np.float32)
    if kind == "outliers":  # a few per group 100x the rest
        return (normal * np.where(RNG.random(shape) < 1e-3, 100, 1)).astype(np.float32)
    if kind == "tied_f":  # f(1) = 3^2 = f(4) = 6^2 / 4 exactly: the first k wins
        w = np.zeros(shape, np.float32)
        flat = w.reshape(-1, shape[-1])
        scale = 2.0 ** RNG.integers(-20, 20, len(flat))
        flat[:, 0], flat[:, 1:4] = 3 * scale, -scale[:, None]
        return w
    if kind == "denormal":
        return (normal * 1e-40).astype(np.float32)
    if kind == "huge":  # float32 sums overflow
        return (normal * 1e37).astype(np.float32)
    if kind == "nonfinite":
        w = normal.astype(np.float32)
        w.reshape(-1)[::97] = np.nan
        w.reshape(-1)[::89] = np.inf
        w.reshape(-1)[::83] = -np.inf
        return w
    raise AssertionError(kind)


LONG_KINDS = ["normal", "uniform", "student2", "cauchy", "lognormal", "mostly_zero", "few_values",
              "constant", "outliers", "tied_f", "denormal", "huge", "nonfinite"]  # fmt: skip


def _reference_thresholds(w: np.ndarray, axis: int | None, block: int) -> np.ndarray:
    largest = float(ml_dtypes.finfo(w.dtype).max)
    optimal = functools.partial(_optimal, largest=largest)
    return _reduce(w, axis, block, optimal, np.float32 if w.dtype == BF16 else w.dtype)


@pytest.mark.parametrize("kind", LONG_KINDS)
def test_binned_thresholds_of_long_groups_are_the_sorted_ones(kind):
    # channels of 4096 along either axis, one group of 64K, blocks of 2048 (a partial one)
    for shape, axis, block in [((24, 4096), 0, 0), ((4096, 12), 1, 0), ((16, 4096), None, 0),
                               ((3, 5000), 1, 2048)]:  # fmt: skip
        w = _long_groups(kind, shape)
        reference = _reference_thresholds(w, axis, block)
        thresholds = ternary._optimal_thresholds(w, axis, block)[0].reshape(reference.shape)
        np.testing.assert_array_equal(thresholds.view(np.int64), reference.view(np.int64))
        ours = quant.ternarize(w, axis=axis, block_size=block)
        _same(ours, _ternary_reference(w, axis, block, "optimal"))


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16])
@pytest.mark.parametrize("kind", ["normal", "few_values", "outliers", "nonfinite"])
def test_binned_thresholds_of_narrow_floats_are_the_sorted_ones(dtype, kind):
    w = _long_groups(kind, (8, 2048)).astype(dtype)
    for axis in (0, None):
        ours = quant.ternarize(w, axis=axis)
        _same(ours, _ternary_reference(w, axis, 0, "optimal"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["normal", "wide", "ties", "zeros", "denormal", "nonfinite"])
def test_binned_thresholds_on_every_layout(monkeypatch, dtype, kind):
    # every group binned, in pieces of a few rows or of part of one: the small layouts above
    monkeypatch.setattr(ternary, "BINNED_MIN", 1)
    monkeypatch.setattr(ternary, "BIN_ELEMENTS", 50)
    for shape, axis, block in CASES:
        w = _weights(kind, shape, dtype)
        ours = quant.ternarize(w, axis=axis, block_size=block)
        _same(ours, _ternary_reference(w, axis, block, "optimal"))


def test_groups_whose_sums_may_round_are_sorted_whole(monkeypatch):
    # the bins' float64 sums stand for the sort's only where they are exact (below 2^53
    # units of the smallest magnitude summed); with 2^32 in its place, the dense channels
    # (sums of ~2^34 units) are sorted whole, the sparse ones (~2^30) binned, in one call
    monkeypatch.setattr(ternary, "EXACT_UNITS", 2.0**32)
    whole = []
    sort = ternary._sorted_rows
    monkeypatch.setattr(
        ternary,
        "_sorted_rows",
        lambda rows, largest: whole.append(len(rows)) or sort(rows, largest),
    )
    w = np.concatenate([_long_groups("normal", (8, 2048)), _long_groups("mostly_zero", (8, 2048))])
    reference = _reference_thresholds(w, 0, 0)
    np.testing.assert_array_equal(ternary._optimal_thresholds(w, 0, 0)[0], reference)
    assert sum(whole) == 8


def _twn_groups(dtype) -> np.ndarray:
    """Groups of 40 (rows) that TWN's one pass after the mean could get wrong: magnitudes
    on the threshold (``0.7 * 10.0`` is ``7.0`` in float64) and either side of its float32
    rounding, zeros, an all-equal group, a lone nonzero, denormals, float32's extremes
    together (float16 makes them inf and zeros), Gaussian and wide-range ones."""
    g = RNG.standard_normal((9, 40)).astype(np.float32)
    g[0] = np.repeat(np.float32([7, 10, 13, 10]), 10)  # mean 10: delta 7, on the 7s
    g[1, :36] = 1.0
    for _ in range(12):  # probes one float32 step either side of delta and on its rounding
        delta = np.float32(0.7 * np.abs(g[1].astype(np.float64)).mean())
        g[1, 36:] = [np.nextafter(delta, 0), delta, np.nextafter(delta, 1), delta]
    g[2] = 0.0
    g[2, ::3] = -0.0
    g[3] = -0.3
    g[4] = 0.0
    g[4, 17] = 5.0
    g[5] = g[5] * np.float32(1e-40)
    g[5, ::4] = 0.0
    g[6] = np.resize(np.float32([3e38, 1e-38, -3e38, -1e-38, 1e-30]), 40)
    g[8] *= np.exp(RNG.standard_normal(40) * 6).astype(np.float32)
    g *= np.where(RNG.random(g.shape) < 0.5, -1, 1).astype(np.float32)
    with np.errstate(over="ignore"):
        return g.astype(dtype)


@pytest.mark.parametrize("piece", [0, 16])
@pytest.mark.parametrize("dtype", DTYPES)
def test_twn_on_adversarial_groups_matches_the_float64_formulation(monkeypatch, dtype, piece):
    # alpha's sums come out of the coding pass in pieces (16 elements: groups over several
    # pieces), in another order than nanmean's: every layout, bit for bit
    if piece:
        monkeypatch.setattr(linear, "PIECE_ELEMENTS", piece)
    g = _twn_groups(dtype)
    strided = np.ascontiguousarray(g.T)
    cases = [(g, 0, 0), (strided, 1, 0), (g.T, 1, 0), (g, 1, 40), (g, 1, 16), (strided, 0, 16),
             (g.reshape(9, 4, 10), 0, 0), (g.reshape(3, 3, 40), 1, 0), (g, None, 0)]  # fmt: skip
    cases += [(row, None, 0) for row in g]
    for w, axis, block in cases:
        ours = quant.ternarize(w, axis=axis, block_size=block, rule="twn")
        _same(ours, _ternary_reference(w, axis, block, "twn"))
    if dtype == np.float32:  # the cases are what they say
        delta = 0.7 * np.abs(g.astype(np.float64)).mean(axis=1)
        assert delta[0] == 7.0 and (np.abs(g[0]) == 7.0).sum() == 10
        probes = np.abs(g[1, 36:]).astype(np.float64)
        assert probes[0] < delta[1] < probes[2] and probes[1] != delta[1]
