"""Verification the pipeline runs around passes: the ONNX checker and numeric comparison.

The numeric check runs the input model once (reference) and each result on the same inputs in
ONNX Runtime, and reports per output: max abs error, cosine similarity, and non-finite values
that were not in the reference. A lossless pass must stay within :class:`Tolerance`.

A model too big to run whole within bounded memory is checked on a sample instead
(:class:`LayerSample`): a few of its layers (a weight and the node reading it), each run alone
on random inputs, before and after, compared the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common as common_passes

from onnxcomp import runtime
from onnxcomp.data import Dataset
from onnxcomp.errors import OnnxcompError, UsageError

NUMERIC_KINDS = "fciub"
# Defaults of the loss bound. A collapse fails: an int8 kernel saturating gave cosine 0.75,
# ternary weights without fine-tuning cosine 0.57 and -72 points. int8/int4 (cosine >= 0.995,
# within a point) pass, and so do pruned-then-distilled pipelines: they keep top-1 within a
# point or two but their logits move (cosine 0.77 on the demo CNN), which is why the cosine
# bound applies by default only when the data has no labels to measure accuracy with.
DEFAULT_MAX_DROP = 5.0
DEFAULT_MIN_COSINE = 0.9


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """Outputs match when max |new - ref| <= atol + rtol * max |ref| (integers: exactly)."""

    atol: float = 1e-4
    rtol: float = 1e-3

    def __post_init__(self) -> None:
        if not (self.atol >= 0 and self.rtol >= 0):  # also refuses NaN
            raise UsageError(f"tolerances must be >= 0 (atol {self.atol}, rtol {self.rtol})")

    def __str__(self) -> str:
        return f"|err| <= {self.atol:g} + {self.rtol:g}*max|ref|"


@dataclasses.dataclass(frozen=True)
class LossBound:
    """How far the final model may fall below the input model: top-1 points (``max_drop``,
    when the data has labels) and the cosine of every float output (``min_cosine``; None: 0.9
    when the data has no labels, not checked when it has). ``max_drop=None`` turns the accuracy
    bound off, ``min_cosine=-1`` the cosine one. With ``allow_loss`` a result outside the bound
    is still written."""

    max_drop: float | None = DEFAULT_MAX_DROP
    min_cosine: float | None = None
    allow_loss: bool = False

    def cosine_limit(self, has_labels: bool) -> float | None:
        """The cosine bound in force: the given one, else the default when there are no labels."""
        if self.min_cosine is not None:
            return self.min_cosine
        return None if has_labels else DEFAULT_MIN_COSINE

    def __post_init__(self) -> None:
        if self.max_drop is not None and not 0 <= self.max_drop <= 100:
            raise UsageError(f"--max-drop must be in [0, 100] points, not {self.max_drop}")
        if self.min_cosine is not None and not -1 <= self.min_cosine <= 1:
            raise UsageError(f"--min-cosine must be in [-1, 1], not {self.min_cosine}")

    def __str__(self) -> str:
        parts = []
        if self.max_drop is not None:
            parts.append(f"top-1 drop <= {self.max_drop:g} pt")
        if self.min_cosine is not None:
            parts.append(f"output cosine >= {self.min_cosine:g}")
        else:
            parts.append(f"output cosine >= {DEFAULT_MIN_COSINE:g} without labels")
        return ", ".join(parts)


@dataclasses.dataclass
class OutputDiff:
    """How one output of the compressed model differs from the reference."""

    name: str
    max_abs: float
    cosine: float
    ref_scale: float  # max |ref|
    new_nonfinite: int  # NaN/Inf where the reference was finite
    shape_mismatch: str | None = None
    exact: bool = False  # integer, bool or string output: compared for equality

    def within(self, tolerance: Tolerance) -> bool:
        if self.shape_mismatch or self.new_nonfinite:
            return False
        if self.exact:
            return self.max_abs == 0
        return self.max_abs <= tolerance.atol + tolerance.rtol * self.ref_scale

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class Reference:
    """The input model's outputs on fixed inputs, computed once and compared against later."""

    def __init__(
        self,
        model: ir.Model,
        inputs: Dataset,
        *,
        batch_size: int,
        level: str = "basic",
        limit: int | None = None,
    ):
        self.inputs = inputs
        self.batch_size = batch_size
        self.level = level
        self.limit = limit
        self.names: list[str] | None = None
        self.outputs = self.run(model)
        self.labels = None if inputs.labels is None else inputs.labels[:limit]
        self.accuracy = self.accuracy_of(self.outputs)

    def run(self, model: ir.Model) -> list[list[np.ndarray]]:
        """``model``'s outputs on the reference inputs, one list per batch."""
        session = runtime.make_session(model, level=self.level)
        names = runtime.output_names(session)
        if self.names is not None and names != self.names:
            raise ValueError(f"graph outputs changed from {self.names} to {names}")
        self.names = names
        return runtime.run_batches(session, self.inputs.batches(self.batch_size, self.limit))

    def compare(
        self, outputs: list[list[np.ndarray]], baseline: list[list[np.ndarray]] | None = None
    ) -> list[OutputDiff]:
        """Per-output differences of ``outputs`` from ``baseline`` (default: the input model's)."""
        baseline = self.outputs if baseline is None else baseline
        return [
            compare_arrays(name, [b[i] for b in baseline], [b[i] for b in outputs])
            for i, name in enumerate(self.names or [])
        ]

    def accuracy_of(self, outputs: list[list[np.ndarray]]) -> float | None:
        """Top-1 accuracy of ``outputs`` on the reference labels, if there are any."""
        return top1_accuracy(outputs, self.labels)


# Layers a LayerSample may pick: op type -> the input slot of its weight.
LAYER_WEIGHT_INPUT = {"MatMul": 1, "Gemm": 1, "Conv": 1, "ConvTranspose": 1, "Gather": 0}
SAMPLE_LAYERS = 4
# A sampled layer's weight is held by ONNX Runtime (twice, when it folds a DequantizeLinear):
# larger weights are not sampled, and the layers added after one of each op type stay within
# this in all, so the check stays within a few hundred MB and about a second.
SAMPLE_MAX_WEIGHT_BYTES = 256 << 20
_SAMPLE_ROWS = 2  # batch rows of a sampled layer's random input


class LayerSample:
    """The numeric check of a model too big to run whole in memory: up to ``count`` layers (a
    weight of at most ``max_weight_bytes`` and the node reading it), the smallest of each op
    type first, then others spread over the graph while the sampled weights stay within
    ``max_weight_bytes`` in all, each run alone in ONNX Runtime on random inputs. In a result
    the slice that computes the same output from the same inputs (the node with its
    DequantizeLinear, a MatMulNBits, Casts) is run instead. Same interface as
    :class:`Reference`, one "output" per layer; there are no labels, so no accuracy.

    A layer the result no longer computes from the same inputs (a pass renamed or fused it)
    drops out of the comparison and is listed in ``missing``.

    The input model's layers run on a background thread (``background=True``, the
    pipeline's choice): the first pass starts at once, and ``outputs`` waits for them. Only
    ONNX Runtime works on that thread; the layers are cut out of the model before.
    """

    def __init__(
        self,
        model: ir.Model,
        *,
        level: str = "basic",
        count: int = SAMPLE_LAYERS,
        max_weight_bytes: int = SAMPLE_MAX_WEIGHT_BYTES,
        seed: int = 0,
        background: bool = False,
    ):
        self.level = level
        self.labels = None
        self.missing: list[str] = []
        rng = np.random.default_rng(seed)
        self.layers: list[tuple[str, dict[str, np.ndarray]]] = []
        self.names: list[str] = []
        for node in _sample_layers(model.graph, count, max_weight_bytes):
            feeds = _layer_feeds(node, rng)
            if feeds is not None:
                self.layers.append((node.outputs[0].name or "", feeds))
                self.names.append(f"{node.name or node.op_type} ({node.op_type})")
        if not self.layers:
            raise OnnxcompError(
                f"no layer (a {'/'.join(LAYER_WEIGHT_INPUT)} with a weight of at most "
                f"{max_weight_bytes / 2**20:.0f} MiB) to run alone for the sampled check"
            )
        runs = self._sessions(model, spin=not background)
        if background:
            worker = ThreadPoolExecutor(1, thread_name_prefix="onnxcomp-sample")
            self._pending: Future | None = worker.submit(_run_layers, runs)
            worker.shutdown(wait=False)  # its thread ends with this one task
        else:
            self._outputs = _run_layers(runs)
            self._pending = None
        self.accuracy = None

    @property
    def outputs(self) -> list[list[np.ndarray]]:
        """The input model's sampled outputs (waits for the background run)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            try:
                self._outputs = pending.result()
            except OnnxcompError as e:
                raise OnnxcompError(f"{e}; --check none skips the check") from None
        return self._outputs

    @property
    def description(self) -> str:
        return (
            f"random inputs of {len(self.layers)} sampled layers, each run alone: "
            f"{', '.join(self.names)}"
        )

    def run(self, model: ir.Model) -> list[list[np.ndarray]]:
        """Each sampled layer's output as ``model`` computes it (None where it cannot be cut
        out of ``model``), as one batch."""
        return _run_layers(self._sessions(model))

    def _sessions(self, model: ir.Model, spin: bool = True) -> list[tuple[Callable, dict] | None]:
        """Per sampled layer, a session factory (:func:`runtime.session_factory`) and its
        feeds, or None where the layer cannot be cut out of ``model``."""
        runs: list[tuple[Callable, dict] | None] = []
        for (output, feeds), name in zip(self.layers, self.names, strict=True):
            sub = _layer_model(model, output, feeds)
            if sub is None:
                if name not in self.missing:
                    self.missing.append(name)
                runs.append(None)
                continue
            typed = {
                v.name: feeds[v.name].astype(v.dtype.numpy() if v.dtype else np.float32)
                for v in sub.graph.inputs
            }
            # Run once: repacking each weight for speed would only cost a copy of it.
            factory = runtime.session_factory(sub, level=self.level, prepack=False, spin=spin)
            runs.append((factory, typed))
        return runs

    def compare(
        self, outputs: list[list[np.ndarray]], baseline: list[list[np.ndarray]] | None = None
    ) -> list[OutputDiff]:
        """Per-layer differences, leaving out layers missing from either side."""
        baseline = self.outputs if baseline is None else baseline
        return [
            compare_arrays(name, [base], [new])
            for name, base, new in zip(self.names, baseline[0], outputs[0], strict=True)
            if base is not None and new is not None
        ]

    def accuracy_of(self, outputs: list[list[np.ndarray]]) -> float | None:
        return None


def _run_layers(runs: list[tuple[Callable, dict] | None]) -> list[list[np.ndarray | None]]:
    """Each layer's session built and run (one at a time: one layer's weights held at once),
    the outputs as one batch; None for a layer without a session."""
    results: list[np.ndarray | None] = []
    for run in runs:
        if run is None:
            results.append(None)
            continue
        factory, feeds = run
        session = factory()
        results.extend(runtime.run_batches(session, [feeds])[0])
        del session
    return [results]


def _sample_layers(graph: ir.Graph, count: int, max_bytes: int) -> list[ir.Node]:
    """Layers to sample, in graph order: the one with the smallest weight of each op type (the
    middle one among equals: every op type is checked, at the least cost), then others spread
    evenly over the graph while the sampled weights stay within ``max_bytes`` in all (running
    them costs time in proportion)."""
    candidates = []
    for node in graph:
        slot = LAYER_WEIGHT_INPUT.get(node.op_type)
        if node.domain not in ("", "ai.onnx") or slot is None or slot >= len(node.inputs):
            continue
        weight = node.inputs[slot]
        if weight is None or weight.const_value is None or not weight.is_initializer():
            continue
        tensor = weight.const_value
        if not tensor.dtype.is_floating_point() or tensor.nbytes > max_bytes:
            continue
        activations = [v for v in node.inputs if v is not None and v.const_value is None]
        if len(activations) == 1 and len(node.outputs) == 1 and node.outputs[0].name:
            candidates.append(node)

    def weight_bytes(node: ir.Node) -> int:
        return node.inputs[LAYER_WEIGHT_INPUT[node.op_type]].const_value.nbytes  # type: ignore[union-attr]

    by_type: dict[str, list[ir.Node]] = {}
    for node in candidates:
        by_type.setdefault(node.op_type, []).append(node)
    chosen = []
    for nodes in by_type.values():
        smallest = min(map(weight_bytes, nodes))
        equals = [n for n in nodes if weight_bytes(n) == smallest]
        chosen.append(equals[len(equals) // 2])
    chosen = chosen[:count]
    total = sum(map(weight_bytes, chosen))
    rest = [n for n in candidates if n not in chosen]
    wanted = count - len(chosen)
    if wanted > 0 and rest:
        step = len(rest) / wanted
        for node in dict.fromkeys(rest[min(int(i * step), len(rest) - 1)] for i in range(wanted)):
            if total + weight_bytes(node) <= max_bytes:
                chosen.append(node)
                total += weight_bytes(node)
    order = {node: i for i, node in enumerate(candidates)}
    return sorted(chosen, key=order.__getitem__)


def _layer_feeds(node: ir.Node, rng: np.random.Generator) -> dict[str, np.ndarray] | None:
    """Random inputs of a small batch for ``node``'s activation input, shaped by its weight
    (float32; integer indices for Gather), or None when the shape cannot be worked out."""
    slot = LAYER_WEIGHT_INPUT[node.op_type]
    weight = node.inputs[slot]
    assert weight is not None and weight.const_value is not None
    shape = [int(d) for d in weight.const_value.shape]
    x = next(v for v in node.inputs if v is not None and v.const_value is None)
    attrs = node.attributes
    rows = _SAMPLE_ROWS
    if node.op_type == "Gather":
        axis = attrs.get_int("axis", 0) % max(len(shape), 1)
        dtype = x.dtype.numpy() if x.dtype is not None else np.int64
        return {x.name or "": rng.integers(0, shape[axis], size=(rows, 3)).astype(dtype)}
    if node.op_type == "MatMul":
        if len(shape) == 1:
            x_shape = [rows, shape[0]]
        else:
            rank = len(x.shape) if x.shape is not None else 2
            x_shape = [*shape[:-2], rows, shape[-2]] if len(shape) > 2 else (
                [rows] * max(rank - 1, 1) + [shape[0]])  # fmt: skip
    elif node.op_type == "Gemm":
        k = shape[1] if attrs.get_int("transB", 0) else shape[0]
        x_shape = [k, rows] if attrs.get_int("transA", 0) else [rows, k]
    elif node.op_type == "Conv":
        kernel = shape[2:]
        dilations = attrs.get_ints("dilations", [1] * len(kernel))
        x_shape = [1, shape[1] * attrs.get_int("group", 1)]
        x_shape += [(k - 1) * d + 1 + 3 for k, d in zip(kernel, dilations, strict=False)]
    elif node.op_type == "ConvTranspose":
        x_shape = [1, shape[0], *([3] * (len(shape) - 2))]
    else:
        return None
    return {x.name or "": rng.standard_normal(x_shape).astype(np.float32)}


def _layer_model(
    model: ir.Model, output: str, feeds: dict[str, np.ndarray]
) -> ir.Model | None:
    """The part of ``model`` that computes value ``output`` from the values named in ``feeds``
    and constants, as a model of its own (tensors shared, not copied), or None."""
    try:
        graph = ir.convenience.extract(model.graph, list(feeds), [output])
    except ValueError:
        return None
    if len(graph) > 32:  # not one layer any more
        return None
    for value in graph.inputs:
        value.shape = None  # the sample's batch is not the model's
        if value.dtype is None:  # untyped in a model without value_info: as fed
            value.dtype = ir.DataType.from_numpy(feeds[value.name or ""].dtype)
    for node in graph:
        for value in node.outputs:
            value.shape = None
    graph.opset_imports.update(model.opset_imports)
    return ir.Model(graph, ir_version=model.ir_version)


def min_cosine(diffs: list[OutputDiff]) -> float | None:
    """The lowest cosine over the float outputs (integer and string outputs compare exactly and
    are judged by ``within``); None when there are none."""
    values = [d.cosine if not d.shape_mismatch else 0.0 for d in diffs if not d.exact]
    return min(values) if values else None


def top1_accuracy(outputs: list[list[np.ndarray]], labels: np.ndarray | None) -> float | None:
    """Share of samples whose first output's argmax is the label; None unless that output is
    class scores, one row per sample ([N, classes])."""
    if labels is None or not outputs:
        return None
    scores = [batch[0] for batch in outputs]
    if any(np.ndim(s) != 2 for s in scores):
        return None
    predicted = np.concatenate([np.argmax(s, axis=1) for s in scores])
    if predicted.shape != np.shape(labels):
        return None
    return float(np.mean(predicted == labels))


def compare_arrays(name: str, refs: list[np.ndarray], news: list[np.ndarray]) -> OutputDiff:
    """Compare one output across batches."""
    for ref, new in zip(refs, news, strict=True):
        if np.shape(ref) != np.shape(new):
            return OutputDiff(name, float("inf"), 0.0, 0.0, 0,
                              shape_mismatch=f"{np.shape(ref)} -> {np.shape(new)}")
    ref = _flat(refs)
    new = _flat(news)
    if ref.dtype.kind not in NUMERIC_KINDS or new.dtype.kind not in NUMERIC_KINDS:
        equal = ref.shape == new.shape and bool(np.all(ref == new))
        return OutputDiff(name, 0.0 if equal else float("inf"), 1.0 if equal else 0.0, 0.0, 0,
                          exact=True)
    exact = ref.dtype.kind in "iub" and new.dtype.kind in "iub"
    ref64 = ref.astype(np.complex128 if ref.dtype.kind == "c" else np.float64)
    new64 = new.astype(ref64.dtype)
    ref_finite = np.isfinite(ref64)
    new_nonfinite = int(np.count_nonzero(ref_finite & ~np.isfinite(new64)))
    # Where the reference is NaN/Inf the new model must match it exactly (same NaN, same Inf).
    special_mismatch = np.count_nonzero(
        ~ref_finite & ~((np.isnan(ref64) & np.isnan(new64)) | (ref64 == new64))
    )
    both = ref_finite & np.isfinite(new64)
    diff = np.abs(ref64[both] - new64[both])
    max_abs = float(diff.max()) if diff.size else 0.0
    if special_mismatch:
        max_abs = float("inf")
    scale = float(np.abs(ref64[ref_finite]).max()) if ref_finite.any() else 0.0
    return OutputDiff(name, max_abs, _cosine(ref64[both], new64[both]), scale, new_nonfinite,
                      exact=exact)


def check_model(model: ir.Model, *, full: bool) -> str | None:
    """Run ``onnx.checker`` (``full`` adds strict shape inference); the error text or None.

    Weights still in external data files are left out of the check: the checker resolves
    their relative locations against the working directory, not the model's folder, and
    failed every model with external data when run from elsewhere. The loader has already
    checked that those files exist and stay inside the model's folder.
    """
    external = [
        v for v in model.graph.initializers.values()
        if isinstance(v.const_value, ir.ExternalTensor)
    ]  # fmt: skip
    tensors = [v.const_value for v in external]
    try:
        for value in external:
            value.const_value = None
        common_passes.CheckerPass(full_check=full)(model)
    except Exception as e:
        cause = e.__cause__ or e
        text = str(cause).strip() or type(cause).__name__
        return text.splitlines()[0][:400]
    finally:
        for value, tensor in zip(external, tensors, strict=True):
            value.const_value = tensor
    return None


def _flat(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(a).reshape(-1) for a in arrays]) if arrays else np.zeros(0)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    if a.size == 0:
        return 1.0
    a, b = np.real(a), np.real(b)
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0:
        return 0.0
    return float(np.dot(a, b) / (na * nb))
