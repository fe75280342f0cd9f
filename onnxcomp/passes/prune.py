"""Magnitude pruning: unstructured (``prune``) and N:M semi-structured (``prune-nm``).

Both passes zero weights of Conv / Gemm / MatMul nodes (the op types are an option) and write
the zeros exactly into new tensors; the graph is otherwise unchanged. The dense file keeps its
size, so the stats also give the deflate size (zlib level 6, zip's default) of the rewritten
tensors before and after: the part of a zipped download that pruning shrinks.

- ``prune`` zeros the lowest-scoring ``sparsity`` share of each tensor (``scope=layer``) or of
  all pruned tensors under one threshold (``scope=global``). The score is ``|w|``, or with
  ``importance=entropy`` ``|w|`` times the normalised activation entropy of the weight's output
  channel (see :func:`entropy_factors`), so weights of low-information channels go first.
- ``prune-nm`` keeps the ``n`` largest ``|w|`` in every group of ``m`` consecutive weights along
  the layer's reduction axis: Conv's input channels (for each output channel and kernel position,
  as TensorRT and cuSPARSELt lay out sparse convolutions), Gemm's K (axis 1 with ``transB=1``,
  else 0), MatMul's K (axis -2). A reduction length that is not a multiple of ``m`` leaves a
  short last group, treated as zero-padded (see :mod:`onnxcomp.masks.nm`) and reported.

The first layer (weight layers no other weight layer feeds) and the last layer (weight layers
that feed no other) stay dense by default: they are small and the most sensitive. Outputs move;
the pipeline's numeric check reports by how much (recovering accuracy is distillation's job).

Tensors are scored, masked and rewritten one at a time (the source released as soon as it is
read, see :mod:`onnxcomp.passes._weights`), so a big model is pruned in the memory of a few
tensors; ``scope=global`` ranks all scores together and holds them all. The default (``|w|``
per layer) on float32 makes neither score nor mask: :func:`onnxcomp.masks.prune_smallest`
writes the same result in one threaded pass over the weight's bits, when the model streams
into the memory of a result already written to the scratch data. The deflate size of a tensor
past :data:`ZIP_SAMPLE_BYTES` is estimated from evenly spaced chunks of it, deflated on
background threads while the next tensors are pruned.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import weakref
import zlib
from collections import deque
from collections.abc import Callable, Collection, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Literal

import numpy as np
import onnx_ir as ir

from onnxcomp import masks
from onnxcomp.errors import UsageError
from onnxcomp.io import read_ahead
from onnxcomp.passes._base import CompressionPass, CompressionResult, PassOptions, option
from onnxcomp.passes._weights import (
    WEIGHT_INPUTS,
    Weight,
    WeightUse,
    find_weights,
    lift_constant_weights,
    lifted_note,
    release,
    set_weight,
    weight_tensor,
)

if TYPE_CHECKING:
    from onnxcomp.data import Dataset

PRUNABLE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Gather")
NM_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")  # ops with a reduction axis
DEFAULT_PRUNE_OPS = ("Conv", "Gemm", "MatMul")
ZIP_LEVEL = 6  # zip's and gzip's default deflate level
# Deflating runs at ~10 MB/s on random weights: bigger tensors are measured on chunks
# summing to this (deflate looks back 32 KB, so 64 KB chunks compress as in the whole).
ZIP_SAMPLE_BYTES = 1 << 19
_ZIP_CHUNKS = 8
_ZIP_THREADS = 2  # deflating beside the pruning (zlib runs at ~30 MB/s)
_ZIP_PENDING = 4  # tensors whose samples (up to 2 x 512 KB each) may wait to be deflated


@dataclasses.dataclass(frozen=True)
class MagnitudePruneOptions(PassOptions):
    """Options of ``prune``."""

    sparsity: float = option(0.5, "share of weights set to zero, 0 <= sparsity < 1")
    scope: Literal["layer", "global"] = option(
        "layer", "layer: every tensor reaches the sparsity; global: one threshold over all"
    )
    exclude: tuple[str, ...] = option((), "fnmatch patterns of node or weight names left dense")
    skip_first: bool = option(True, "leave the first layer (fed by no other weight layer) dense")
    skip_last: bool = option(True, "leave the last layer (feeding no other weight layer) dense")
    op_types: tuple[str, ...] = option(DEFAULT_PRUNE_OPS, "ops whose weights are pruned")
    min_size: int = option(0, "leave tensors with fewer elements dense")
    importance: Literal["magnitude", "entropy"] = option(
        "magnitude", "score: |w|, or |w| x activation entropy of its output channel (needs --data)"
    )
    bins: int = option(32, "histogram bins per channel for importance=entropy")
    samples: int = option(512, "samples of --data that importance=entropy runs")

    def validate(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise UsageError(f"prune:sparsity must be in [0, 1), got {self.sparsity}")
        _check_ops(self.op_types, PRUNABLE_OPS, "prune")
        if self.min_size < 0:
            raise UsageError(f"prune:min_size must be >= 0, got {self.min_size}")
        if self.bins < 2:
            raise UsageError(f"prune:bins must be >= 2, got {self.bins}")
        if self.samples < 1:
            raise UsageError(f"prune:samples must be >= 1, got {self.samples}")


@dataclasses.dataclass(frozen=True)
class NMPruneOptions(PassOptions):
    """Options of ``prune-nm``."""

    n: int = option(2, "weights kept in every group of m")
    m: int = option(4, "group size along the reduction axis")
    exclude: tuple[str, ...] = option((), "fnmatch patterns of node or weight names left dense")
    skip_first: bool = option(True, "leave the first layer (fed by no other weight layer) dense")
    skip_last: bool = option(True, "leave the last layer (feeding no other weight layer) dense")
    op_types: tuple[str, ...] = option(DEFAULT_PRUNE_OPS, "ops whose weights are pruned")
    min_size: int = option(0, "leave tensors with fewer elements dense")

    def validate(self) -> None:
        if not 1 <= self.n < self.m:
            raise UsageError(f"prune-nm needs 1 <= n < m, got n={self.n}, m={self.m}")
        _check_ops(self.op_types, NM_OPS, "prune-nm")
        if self.min_size < 0:
            raise UsageError(f"prune-nm:min_size must be >= 0, got {self.min_size}")


class MagnitudePrunePass(CompressionPass):
    """Zero the lowest-magnitude weights to a target sparsity, per tensor or globally."""

    summary = "zero the smallest Conv/Gemm/MatMul weights to a target sparsity (unstructured)"
    options_class = MagnitudePruneOptions
    options: MagnitudePruneOptions

    def preflight(self) -> None:
        super().preflight()
        if self.options.importance == "entropy" and self.data is None:
            raise UsageError(
                "prune:importance=entropy ranks channels by their activations on real inputs: "
                "pass --data FILE.npz"
            )

    def apply(self, model: ir.Model) -> CompressionResult:
        o = self.options
        weights, notes = select_weights(
            model, o.op_types, exclude=o.exclude, min_size=o.min_size,
            skip_first=o.skip_first, skip_last=o.skip_last,
        )  # fmt: skip
        factors: list[np.ndarray | None] = [None] * len(weights)
        if o.importance == "entropy" and weights:
            assert self.data is not None  # requires() checked
            found, entropy_notes = entropy_factors(
                model, weights, self.data, bins=o.bins, samples=o.samples
            )
            factors, notes = list(found), notes + entropy_notes
        stats = {"target_sparsity": o.sparsity, "scope": o.scope}
        if o.importance != "magnitude":
            stats["importance"] = o.importance
        if o.scope == "layer" and o.importance == "magnitude":
            memory = _ResultMemory()
            prune = functools.partial(_magnitude_pruned, sparsity=o.sparsity, memory=memory)
            return _write_pruned(model, weights, prune, notes, stats, memory)
        scores = (_score(w, f) for w, f in zip(weights, factors, strict=True))
        keep: Iterable[np.ndarray]
        if o.scope == "global":
            keep = masks.global_magnitude_masks(list(scores), o.sparsity)
        else:  # one tensor at a time: write_masks draws each mask as it gets to its tensor
            keep = map(functools.partial(masks.magnitude_mask, sparsity=o.sparsity), scores)
        return write_masks(model, weights, keep, notes, stats)


class NMPrunePass(CompressionPass):
    """Keep the n largest weights of every m along each layer's reduction axis (2:4 default)."""

    summary = "N:M sparsity (default 2:4) along the reduction axis, for sparse tensor cores"
    options_class = NMPruneOptions
    options: NMPruneOptions

    def apply(self, model: ir.Model) -> CompressionResult:
        o = self.options
        candidates, notes = select_weights(
            model, o.op_types, exclude=o.exclude, min_size=o.min_size,
            skip_first=o.skip_first, skip_last=o.skip_last,
        )  # fmt: skip
        weights, axes_of = [], []
        for weight in candidates:
            axes = {reduction_axis(use, len(weight.shape)) for use in weight.uses}
            if len(axes) != 1 or None in axes:
                notes.append(f"skipped {weight.name}: its consumers reduce over different axes")
                continue
            axis = axes.pop()
            length = weight.shape[axis] if weight.shape else 1
            if length % o.m:
                notes.append(
                    f"{weight.name}: reduction length {length} is not a multiple of {o.m}; "
                    f"its short last groups keep min({o.n}, length)"
                )
            weights.append(weight)
            axes_of.append(axis)
        keep = (
            masks.nm_mask(_score(w, None), o.n, o.m, axis)
            for w, axis in zip(weights, axes_of, strict=True)
        )
        stats = {"pattern": f"{o.n}:{o.m}", "target_sparsity": 1 - o.n / o.m}
        return write_masks(model, weights, keep, notes, stats)


def reduction_axis(use: WeightUse, rank: int) -> int | None:
    """The weight axis a consumer sums over (the axis N:M groups run along), or None."""
    op = use.node.op_type
    if op == "Conv" and rank >= 2:
        return 1  # [O, I/g, k...]: input channels
    if op == "ConvTranspose" and rank >= 2:
        return 0  # [I, O/g, k...]
    if op == "Gemm" and rank == 2:
        return 1 if use.node.attributes.get_int("transB", 0) else 0
    if op == "MatMul":
        return rank - 2 if rank >= 2 else 0
    return None


def select_weights(
    model: ir.Model,
    op_types: Collection[str],
    *,
    exclude: Sequence[str] = (),
    min_size: int = 0,
    skip_first: bool = False,
    skip_last: bool = False,
) -> tuple[list[Weight], list[str]]:
    """Weights a pruning pass may rewrite, and a note for each weight it may not.

    Weights held in Constant nodes are lifted to initializers first (a note says so)."""
    lifted = lift_constant_weights(model)
    weights, skipped = find_weights(model, op_types, exclude=exclude, min_size=min_size)
    notes = [str(s) for s in skipped]
    notes = lifted_note(lifted) + notes
    first, last = boundary_layers(model, op_types)
    selected = []
    for weight in weights:
        nodes = {use.node for use in weight.uses}
        if skip_first and nodes & first:
            notes.append(f"skipped {weight.name}: first layer (skip_first=true)")
        elif skip_last and nodes & last:
            notes.append(f"skipped {weight.name}: last layer (skip_last=true)")
        else:
            selected.append(weight)
    return selected, notes


def boundary_layers(
    model: ir.Model, op_types: Collection[str]
) -> tuple[set[ir.Node], set[ir.Node]]:
    """The first layer (weight layers no other weight layer feeds) and the last (weight layers
    that feed no other), over main-graph nodes of ``op_types`` with a constant weight.

    Relies on the graph's node order being topological, as ONNX requires and the pipeline keeps.
    """
    nodes = list(model.graph)
    layers = {node for node in nodes if _has_constant_weight(node, op_types)}
    first: set[ir.Node] = set()
    fed: set[ir.Value] = set()  # values computed from some layer's output
    for node in nodes:
        upstream = any(v in fed for v in node.inputs if v is not None)
        if node in layers and not upstream:
            first.add(node)
        if upstream or node in layers:
            fed.update(node.outputs)
    last: set[ir.Node] = set()
    feeding: set[ir.Value] = set()  # values some layer reads, directly or not
    for node in reversed(nodes):
        downstream = any(v in feeding for v in node.outputs)
        if node in layers and not downstream:
            last.add(node)
        if downstream or node in layers:
            feeding.update(v for v in node.inputs if v is not None)
    return first, last


def write_masks(
    model: ir.Model,
    weights: Sequence[Weight],
    keep: Iterable[np.ndarray],
    notes: list[str],
    stats: dict,
) -> CompressionResult:
    """Zero each weight where its mask is False, in a new tensor, and report what changed.

    ``keep`` may be a generator: each mask is drawn when its tensor's turn comes, so only one
    tensor's score, mask and pruned copy exist at a time."""
    drawn = iter(keep)
    # not zip(): it would keep the last mask alive while drawing one
    return _write_pruned(model, weights, lambda weight: _pruned(weight, next(drawn)), notes, stats)


def _write_pruned(
    model: ir.Model,
    weights: Sequence[Weight],
    prune: Callable[[Weight], tuple[np.ndarray | None, int, _ZipSample | None]],
    notes: list[str],
    stats: dict,
    memory: _ResultMemory | None = None,
) -> CompressionResult:
    """Give each weight the new tensor ``prune(weight)`` makes (see :func:`_pruned`), one
    weight at a time, and report what changed; the tensors of results made in ``memory``
    are lent it (:meth:`_ResultMemory.lend`).

    The deflate sizes are measured on background threads (zlib frees the GIL) from copies of
    the sampled bytes, while the next tensors are pruned and written; at most
    :data:`_ZIP_PENDING` tensors' samples wait (small tensors are pruned faster than zlib
    deflates them)."""
    per_tensor: dict[str, float] = {}
    zeros = total = rewritten = dense_bytes = 0
    zip_sizes = [0, 0]  # before, after
    pending: deque[tuple[Future[int], Future[int]]] = deque()
    with ThreadPoolExecutor(_ZIP_THREADS) as deflating:
        # The next weight is read from disk while this one is pruned.
        for weight in read_ahead(weights, weight_tensor):
            pruned, new_zeros, before = prune(weight)
            size = weight.size
            per_tensor[weight.name] = round(new_zeros / max(size, 1), 4)
            zeros += new_zeros
            total += size
            if new_zeros == size:
                notes.append(f"{weight.name}: every weight is zero; its layer now outputs its bias")
            if pruned is None:
                release(weight.value.const_value)
                continue  # nothing new to zero
            assert before is not None
            pending.append((deflating.submit(before.deflated),
                            deflating.submit(_ZipSample.of(pruned).deflated)))  # fmt: skip
            while len(pending) > _ZIP_PENDING:
                _add_sizes(zip_sizes, pending.popleft())
            dense_bytes += pruned.nbytes
            # A new tensor, never a write into the old one: loaded tensors are read-only views.
            tensor = ir.tensor(pruned)
            if memory is not None:
                memory.lend(pruned, tensor)
            set_weight(weight.value, tensor)
            del tensor
            rewritten += 1
            del pruned  # before the next weight is pruned
        while pending:
            _add_sizes(zip_sizes, pending.popleft())
    stats = {
        **stats,
        "tensors": rewritten,
        "sparsity": round(zeros / total, 4) if total else 0.0,
        "per_tensor": per_tensor,
        "dense_bytes": dense_bytes,
        "zip_bytes_before": zip_sizes[0],
        "zip_bytes_after": zip_sizes[1],
    }
    if not weights:
        notes.append("no weights to prune")
    return CompressionResult(model, rewritten > 0, stats=stats, notes=notes)


def _add_sizes(totals: list[int], sizes: tuple[Future[int], Future[int]]) -> None:
    for index, size in enumerate(sizes):
        totals[index] += size.result()


def entropy_factors(
    model: ir.Model, weights: Sequence[Weight], data: Dataset, *, bins: int, samples: int
) -> tuple[list[np.ndarray], list[str]]:
    """Per-weight multipliers for ``|w|``: each output channel's activation entropy divided by
    the largest entropy among the tensor's channels, broadcast along its channel axis.

    A channel whose activation never varies (entropy 0) gets 0, so its weights are pruned first;
    the tensor's most informative channel keeps its plain magnitudes. Entropies come from
    :func:`onnxcomp.analysis.importance.channel_entropy` at each consumer's output (followed
    through per-channel ops such as BatchNormalization and Relu); shared weights average theirs.
    """
    from onnxcomp.analysis.importance import channel_entropy, probe_point

    points = {}
    for weight in weights:
        for use in weight.uses:
            points[use.node] = probe_point(use.node)
    entropies = channel_entropy(
        model, data, {v.name: axis for v, axis in points.values()}, bins=bins, samples=samples
    )
    factors, notes = [], []
    for weight in weights:
        axis = weight.channel_axis
        channels = weight.shape[axis] if axis is not None else None
        per_use = [entropies.get(points[use.node][0].name) for use in weight.uses]
        usable = [e for e in per_use if e is not None and len(e) == channels]
        if axis is None or not usable or len(usable) != len(per_use):
            notes.append(f"{weight.name}: no per-channel activation entropy; ranked by |w| alone")
            factors.append(np.ones((), np.float32))
            continue
        entropy = np.mean(usable, axis=0)
        peak = float(entropy.max())
        factor = entropy / peak if peak > 0 else np.ones_like(entropy)
        shape = [1] * len(weight.shape)
        shape[axis] = channels
        factors.append(factor.reshape(shape).astype(np.float32))
    return factors, notes


def _score(weight: Weight, factor: np.ndarray | None) -> np.ndarray:
    """``|w|`` (times ``factor``) in float32; the weight's source is released after."""
    score = np.abs(weight.array).astype(np.float32, copy=False)
    release(weight.value.const_value)
    return score if factor is None else score * factor


def _pruned(weight: Weight, mask: np.ndarray) -> tuple[np.ndarray | None, int, _ZipSample | None]:
    """The weight with zeros where ``mask`` is False (None when that adds no zero), its zero
    count and the bytes of the original that its deflate size is measured on (the original is
    read here, and only here, before it is released)."""
    array = weight.array
    pruned = np.where(mask, array, np.zeros((), array.dtype))
    new_zeros = int(pruned.size - np.count_nonzero(pruned))
    if new_zeros == int(array.size - np.count_nonzero(array)):
        return None, new_zeros, None
    return pruned, new_zeros, _ZipSample.of(array)


def _magnitude_pruned(
    weight: Weight, sparsity: float, memory: _ResultMemory
) -> tuple[np.ndarray | None, int, _ZipSample | None]:
    """:func:`_pruned` with the weight's :func:`~onnxcomp.masks.magnitude_mask` of ``|w|``,
    made without the mask for float32 (:func:`~onnxcomp.masks.prune_smallest`, same result),
    in ``memory``."""
    array = weight.array
    if array.dtype != np.float32:
        return _pruned(weight, masks.magnitude_mask(_score(weight, None), sparsity))
    count = masks.prune_count(array.size, sparsity)
    pruned, new_zeros = masks.prune_smallest(array, count, out=memory.take(array.shape))
    return pruned, new_zeros, (_ZipSample.of(array) if pruned is not None else None)


class _ResultMemory:
    """Memory for pruned float32 weights, reused once no tensor holds what was made in it.

    A streamed model's new weight is written to its scratch data behind the pass and then
    let go: its memory serves the weight after next, where fresh pages would cost a fault and
    a zeroing each on their first write (a third of the time :func:`masks.prune_smallest`
    takes on a memory-mapped weight). A weak reference to the tensor made of a result says
    when it is gone; a result a model keeps in memory keeps its memory. At most two blocks are
    kept, the one being made and the latest being written, as without reuse; free memory too
    small for a weight is let go before new memory is made."""

    def __init__(self) -> None:
        # [flat float32 memory, weak reference to the tensor made in it or None (free)]
        self._blocks: list[tuple[np.ndarray, list[weakref.ref | None]]] = []

    def take(self, shape: tuple[int, ...]) -> np.ndarray:
        """Float32 memory of ``shape`` (contents undefined), free until :meth:`lend`."""
        size = math.prod(shape)
        held = [block for block in self._blocks if not _is_free(block)]
        fits = [block for block in self._blocks  # not much bigger: a tensor holds all of it
                if _is_free(block) and size <= block[0].size <= 2 * size]  # fmt: skip
        chosen = min(fits, key=lambda block: block[0].size) if fits else None
        if chosen is None:
            chosen = (np.empty(size, np.float32), [None])
        chosen[1][0] = None
        # Free memory other than the one chosen goes; of the held, only the latest (being
        # written) is kept for later: an older one is let go with its tensor, as without reuse.
        self._blocks = [*held[-1:], chosen]
        return chosen[0][:size].reshape(shape)

    def lend(self, array: np.ndarray, tensor: ir.TensorProtocol) -> None:
        """Mark the memory ``array`` was taken from as held until ``tensor`` is gone."""
        for memory, user in self._blocks:
            if array.base is memory or array is memory:
                user[0] = weakref.ref(tensor)


def _is_free(block: tuple[np.ndarray, list[weakref.ref | None]]) -> bool:
    user = block[1][0]
    return user is None or user() is None


@dataclasses.dataclass(frozen=True)
class _ZipSample:
    """The bytes of an array its deflate size is measured on: all of them, or for an array
    past :data:`ZIP_SAMPLE_BYTES` evenly spaced chunks summing to that (copied: the array
    may be released before they are deflated)."""

    chunks: list[bytes]
    nbytes: int

    @classmethod
    def of(cls, array: np.ndarray) -> _ZipSample:
        flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        if flat.size <= ZIP_SAMPLE_BYTES:
            return cls([flat.tobytes()], flat.size)
        chunk = ZIP_SAMPLE_BYTES // _ZIP_CHUNKS
        starts = np.linspace(0, flat.size - chunk, _ZIP_CHUNKS).astype(np.int64)
        return cls([flat[s : s + chunk].tobytes() for s in starts], flat.size)

    def deflated(self) -> int:
        """Deflate size of the array (zlib level :data:`ZIP_LEVEL`), estimated from the
        chunks when it was sampled."""
        sampled = sum(len(zlib.compress(chunk, ZIP_LEVEL)) for chunk in self.chunks)
        if self.nbytes <= ZIP_SAMPLE_BYTES:
            return sampled
        return int(sampled * self.nbytes / (ZIP_SAMPLE_BYTES // _ZIP_CHUNKS * _ZIP_CHUNKS))


def _has_constant_weight(node: ir.Node, op_types: Collection[str]) -> bool:
    if node.op_type not in op_types:
        return False
    for index in WEIGHT_INPUTS.get(node.op_type, ()):
        if index < len(node.inputs):
            value = node.inputs[index]
            if value is not None and value.const_value is not None:
                return True
    return False


def _check_ops(op_types: Sequence[str], valid: Sequence[str], pass_name: str) -> None:
    unknown = [op for op in op_types if op not in valid]
    if unknown or not op_types:
        raise UsageError(
            f"{pass_name}:op_types {'+'.join(unknown) or '(empty)'} not supported "
            f"(choose from {'+'.join(valid)})"
        )
