"""Low-rank factorisation math in pure numpy, free of ONNX, so it is unit-tested on its own.

:mod:`onnxcomp.factor.svd`: truncated SVD ``W ≈ L·R`` with the rank chosen by an energy
threshold or a ratio, the break-even rank below which factoring saves parameters, and the
relative Frobenius error (exactly the norm of the dropped singular values).
"""

from onnxcomp.factor.svd import (
    Factors,
    break_even_rank,
    factorize,
    rank_for_energy,
    rank_for_ratio,
    relative_error,
    singular_values,
)

__all__ = [
    "Factors",
    "break_even_rank",
    "factorize",
    "rank_for_energy",
    "rank_for_ratio",
    "relative_error",
    "singular_values",
]
