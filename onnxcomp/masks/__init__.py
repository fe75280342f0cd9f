"""Pruning masks in pure numpy: which weights to zero, decided from scores, with no ONNX in sight.

Every function takes scores (larger = more important; usually ``|w|``) and returns a boolean
*keep* mask of the same shape (True = keep, False = set to zero). Counts are exact and ties are
broken deterministically (see each module), so the same weights always give the same mask.
"""

from onnxcomp.masks.magnitude import (
    global_magnitude_masks,
    magnitude_mask,
    prune_count,
    prune_smallest,
)
from onnxcomp.masks.nm import group_nonzeros, nm_mask, satisfies_nm

__all__ = [
    "global_magnitude_masks",
    "group_nonzeros",
    "magnitude_mask",
    "nm_mask",
    "prune_count",
    "prune_smallest",
    "satisfies_nm",
]
