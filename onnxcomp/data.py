"""Real and random inputs for a model: the ``--data FILE.npz`` format and its checks.

A data file holds one array per graph input, keyed by the input's name, first axis = samples,
and optionally a ``labels`` array. Without a data file, :func:`random_inputs` makes inputs of
the declared shapes, with dynamic dimensions filled in from ``--shape`` or a stated default.
"""

from __future__ import annotations

import dataclasses
import os
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxcomp.errors import OnnxcompError, UsageError

LABELS_KEY = "labels"
DEFAULT_BATCH_DIM = 2
DEFAULT_OTHER_DIM = 32
# Random check inputs larger than this are refused rather than allocated: a declared dim of
# 10^12 (a corrupt or hostile file) must not take the machine's memory.
MAX_RANDOM_BYTES = 1 << 30


@dataclasses.dataclass
class Dataset:
    """Inputs keyed by graph-input name (first axis = samples) and optional labels.

    A 0-d array feeds a scalar graph input: it has no sample axis and is the same in every
    batch.
    """

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    description: str = ""
    # Other arrays of the data file (targets of a custom metric), kept only on request.
    extras: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        """Length of the sample axis; 1 when every input is a scalar (or there are none:
        a model without inputs still runs once)."""
        batched = [a for a in self.inputs.values() if np.ndim(a)]
        return len(batched[0]) if batched else 1

    def take(self, indices: np.ndarray, description: str) -> Dataset:
        """The samples at ``indices``; extras with a sample axis are cut alike, others kept."""
        n = self.num_samples
        return Dataset(
            inputs=rows_of(self.inputs, indices),
            labels=None if self.labels is None else self.labels[indices],
            description=description,
            extras={name: array[indices] if array.ndim and len(array) == n else array
                    for name, array in self.extras.items()},
        )  # fmt: skip

    def batches(self, batch_size: int, limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Feeds of at most ``batch_size`` samples, covering the first ``limit`` samples; one
        feed of the arrays as they are when the sample axis is empty (declared size 0)."""
        total = self.num_samples if limit is None else min(limit, self.num_samples)
        if total == 0:
            yield dict(self.inputs)
            return
        for start in range(0, total, batch_size):
            stop = min(start + batch_size, total)
            yield rows_of(self.inputs, slice(start, stop))


def rows_of(inputs: Mapping[str, np.ndarray], rows: slice | np.ndarray) -> dict[str, np.ndarray]:
    """``rows`` of the sample axis of every input; a 0-d input (no sample axis) as it is."""
    return {name: array[rows] if np.ndim(array) else array for name, array in inputs.items()}


def static_batch(model: ir.Model) -> int | None:
    """The batch size a model fixes with a static leading input dim, or None if it is free."""
    for value in graph_inputs(model):
        if value.shape is not None and len(value.shape) and static_dim(value.shape[0]):
            return value.shape[0]
    return None


def static_dim(dim: int | ir.SymbolicDim) -> bool:
    """Whether a declared dim fixes a size: an int >= 1. Named and unnamed dims are dynamic,
    and so is -1 (as Paddle2ONNX writes a dynamic dim); 0 fixes nothing a batch can use."""
    return isinstance(dim, int) and dim >= 1


def run_batch_size(model: ir.Model, num_samples: int, cap: int = 16) -> int:
    """Samples per ORT run: the model's static batch if it has one, else up to ``cap``."""
    return static_batch(model) or min(cap, max(1, num_samples))


def graph_inputs(model: ir.Model) -> list[ir.Value]:
    """Inputs a caller must feed (initializers listed as inputs are not among them)."""
    return [v for v in model.graph.inputs if not v.is_initializer()]


def load_data(path: str | os.PathLike, model: ir.Model, *, extras: bool = False) -> Dataset:
    """Read an ``.npz`` data file and check it against the model's inputs. With ``extras``,
    arrays that are not graph inputs are kept in ``Dataset.extras`` (the targets a custom metric
    reads) instead of being refused."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"no such data file: {path}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise OnnxcompError(f"{path} is not a readable .npz data file ({e})") from None
    labels = arrays.pop(LABELS_KEY, None)
    kept = {}
    if extras:
        names = {v.name for v in graph_inputs(model)}
        kept = {key: arrays.pop(key) for key in list(arrays) if key not in names}
    dataset = Dataset(inputs=arrays, labels=labels, description=f"--data {path.name}",
                      extras=kept)
    check_data(dataset, model, source=str(path))
    return dataset


def check_data(dataset: Dataset, model: ir.Model, *, source: str = "data") -> None:
    """Check names, sample counts, ranks, static dims and dtypes; cast safe integer widenings."""
    expected = {v.name: v for v in graph_inputs(model)}
    missing = sorted(set(expected) - set(dataset.inputs))
    extra = sorted(set(dataset.inputs) - set(expected))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing)}")
        if extra:
            parts.append(f"unexpected {', '.join(extra)}")
        raise OnnxcompError(
            f"{source} does not match the model's inputs ({'; '.join(parts)}); "
            f"the model expects: {', '.join(expected)}"
        )
    scalars = [n for n, a in dataset.inputs.items() if not a.ndim]
    for name in scalars:
        shape = expected[name].shape
        if shape is None or len(shape):
            raise OnnxcompError(f"{source}: '{name}' is a single value (0-d), the model expects "
                                f"{'an array' if shape is None else f'rank {len(shape)}'}")
    counts = {name: len(a) for name, a in dataset.inputs.items() if a.ndim}
    if len(set(counts.values())) > 1 or 0 in counts.values():
        raise OnnxcompError(
            f"{source}: arrays must share a non-empty first (sample) axis: {counts}"
        )
    if dataset.labels is not None and len(dataset.labels) != dataset.num_samples:
        raise OnnxcompError(f"{source}: labels has {len(dataset.labels)} rows, inputs have "
                            f"{dataset.num_samples}")
    for name, value in expected.items():
        array = dataset.inputs[name]
        shape = value.shape
        if shape is not None:
            if array.ndim != len(shape):
                raise OnnxcompError(
                    f"{source}: '{name}' has rank {array.ndim}, the model expects {len(shape)}"
                )
            for axis, (dim, got) in enumerate(zip(shape, array.shape, strict=True)):
                if axis and static_dim(dim) and dim != got:
                    raise OnnxcompError(
                        f"{source}: '{name}' has size {got} on axis {axis}, the model expects {dim}"
                    )
        dtype = _numpy_dtype(value)
        if dtype is not None and array.dtype != dtype:
            if not np.can_cast(array.dtype, dtype, casting="same_kind"):
                raise OnnxcompError(
                    f"{source}: '{name}' is {array.dtype}, the model expects {dtype}"
                )
            dataset.inputs[name] = array.astype(dtype)


def parse_shapes(specs: list[str] | tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    """Parse ``name=1x128`` shape overrides."""
    shapes = {}
    for spec in specs:
        name, sep, dims = spec.partition("=")
        try:
            if not sep or not name:
                raise ValueError
            shapes[name] = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            raise UsageError(
                f"bad --shape '{spec}': expected NAME=DIMxDIM, e.g. input_ids=1x128"
            ) from None
    return shapes


def random_inputs(
    model: ir.Model,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    *,
    seed: int = 0,
) -> Dataset:
    """One batch of random inputs of the declared shapes, with a description of what was chosen.

    Dynamic dims come from ``shapes`` or default to 2 (batch axis) and 32 (other axes). Float
    inputs are standard normal. Integer inputs that index a constant Gather table take values in
    its range; inputs named like masks are all ones; other integers are 0 or 1.
    """
    shapes = dict(shapes or {})
    known = {v.name for v in graph_inputs(model)}
    unknown = sorted(set(shapes) - known)
    if unknown:
        raise UsageError(f"--shape names unknown inputs {', '.join(unknown)}; "
                         f"inputs are: {', '.join(sorted(known))}")
    rng = np.random.default_rng(seed)
    inputs, chosen = {}, []
    for value in graph_inputs(model):
        shape = shapes.get(value.name) or _default_shape(value)
        if value.shape is not None and len(shape) != len(value.shape):
            raise UsageError(f"--shape {value.name} has rank {len(shape)}, "
                             f"the model expects {len(value.shape)}")
        chosen.append(f"{value.name}={'x'.join(map(str, shape)) or 'scalar'}")
        dtype = _numpy_dtype(value) or np.dtype(np.float32)
        nbytes = float(np.prod([float(d) for d in shape])) * dtype.itemsize
        if nbytes > MAX_RANDOM_BYTES:
            raise OnnxcompError(
                f"input '{value.name}' of shape {'x'.join(map(str, shape))} would take "
                f"{nbytes / 2**30:.3g} GiB of random data; give --data or --shape, or --check none"
            )
        # np.asarray: numpy's generators return scalars, not 0-d arrays, for shape ().
        inputs[value.name] = np.asarray(_random_array(value, shape, dtype, rng))
    return Dataset(inputs=inputs, description="random inputs " + ", ".join(chosen))


def _default_shape(value: ir.Value) -> tuple[int, ...]:
    if value.shape is None:
        return ()
    return tuple(
        dim if static_dim(dim) or dim == 0
        else (DEFAULT_BATCH_DIM if axis == 0 else DEFAULT_OTHER_DIM)
        for axis, dim in enumerate(value.shape)
    )


def _random_array(value: ir.Value, shape: tuple[int, ...], dtype: np.dtype, rng) -> np.ndarray:
    if dtype == np.bool_:
        return rng.random(shape) < 0.5
    if np.issubdtype(dtype, np.floating):
        return rng.standard_normal(shape).astype(dtype)
    if np.issubdtype(dtype, np.integer):
        if "mask" in (value.name or "").lower():
            return np.ones(shape, dtype=dtype)
        return rng.integers(0, _index_bound(value), size=shape).astype(dtype)
    if dtype.kind in "SUO":
        return np.array(rng.choice(["a", "b"], size=shape), dtype=object)
    return np.zeros(shape, dtype=dtype)


def _index_bound(value: ir.Value) -> int:
    """Rows of the smallest constant table this value indexes through Gather, else 2."""
    bounds = []
    for node, index in value.uses():
        if node.op_type == "Gather" and index == 1 and node.inputs[0] is not None:
            table = node.inputs[0].const_value
            axis = node.attributes.get_int("axis", 0)
            if table is not None and table.shape is not None:
                bounds.append(int(table.shape[axis]))
    return min(bounds) if bounds else 2


def _numpy_dtype(value: ir.Value) -> np.dtype | None:
    if value.dtype is None:
        return None
    try:
        return np.dtype(value.dtype.numpy())
    except (TypeError, ValueError, AttributeError):
        return None
