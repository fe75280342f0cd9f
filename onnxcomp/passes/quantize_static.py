"""Static int8 quantisation (``int8-static``): QDQ on activations and weights, calibrated on
``--data``, placed so that ONNX Runtime turns it into integer kernels.

Weights of Conv, Gemm and MatMul become per-output-channel symmetric codes (narrow range) read
through DequantizeLinear; Conv and Gemm biases become int32 with scale
``input_scale * weight_scale``, as ONNX Runtime's QLinearConv / QGemm fusions expect.
Activations get one QuantizeLinear -> DequantizeLinear pair per tensor, shared by all its
consumers, with a per-tensor scale from calibration (``minmax``, ``percentile``, ``entropy`` or
``mse``; :mod:`onnxcomp.quant.calibrate`). Signed tensors are symmetric (zero point 0, 128 in
uint8); tensors that never go negative (ReLU outputs, ...) use ``[0, max]``.

Integer layout (``layout``; ``auto`` follows the target, :mod:`onnxcomp.target`): ``u8s8``
(uint8 activations, int8 weights), ``u8s8-7bit`` (weight codes in [-63, 63]: ONNX Runtime's
u8·s8 kernels on AVX2 without VNNI add pairs of products in 16 bits and saturate with 8-bit
weights; the default, for ``portable``), ``u8u8`` (weights stored uint8 with zero point 128:
the same codes shifted, so scales and biases do not change) and ``s8s8`` (int8 activations, for
ARM64 / GPUs). ONNX Runtime 1.32 on x86 fuses u8s8, u8s8-7bit and u8u8 completely on the demo
models; s8s8 only in part there (Conv followed by Relu, QLinearAdd/Mul and MatMul of two
activations stay QDQ), which is why x86 targets never get it. The layout and target go into
the stats and the model's metadata.

Measured placement (``measure``; on by default for ``--target host``): int8 kernels are not
faster than float everywhere (AVX2 has no int8 dot product; at batch 1 the QuantizeLinear of
a small layer can cost more than its integer kernel saves). The pass then times, in ONNX Runtime
on this machine (:mod:`onnxcomp.passes._placement`), the model with all regions int8 against
float at batch 1 and ``search_batch``, puts each region (a connected group of quantised nodes)
back in float unless its int8 version is faster and not slower at either batch size, and leaves
the whole model float if the result is still slower than float at either (with a note).

Placement (why: a QDQ pair that ONNX Runtime cannot fuse costs two passes over the tensor and
makes int8 slower than fp32):

- Conv, MatMul and Gemm always get quantised inputs: they are where the time goes.
- Add, Mul, Concat, AveragePool, GlobalAveragePool, Sigmoid and LeakyRelu run in int8 only
  inside an int8 region: when every float input already arrives quantised (or is a constant)
  and every consumer of the output reads int8. Elsewhere they stay float, with no QDQ around
  them. LayerNormalization, Softmax, Erf, ... always stay float.
- HardSwish / HardSigmoid stay float by default (ONNX Runtime fuses them into a float Conv,
  so their Conv stays float too). With ``hard_activations=int8`` they are written as
  ``x * Clip(x + 3, 0, 6) / 6`` inside int8 regions: QLinearAdd (the Clip folds into its output
  range), the ``/ 6`` folded into a DequantizeLinear scale, QLinearMul; where no region forms
  the original node is put back. On the MobileNetV3-style demo block this is ~30% faster than
  fp32 at batch 32 and ~15% slower at batch 1 (ORT 1.32, one thread): ``search=true`` times
  both on ``search_batch`` samples and keeps the faster.
- A Mul by a positive scalar constant inside an int8 region costs nothing: the consumers read
  the same codes through a DequantizeLinear with the scale times the constant.
- Reshape, Transpose, Flatten, Squeeze, Unsqueeze, MaxPool, Resize, ... pass int8 through with
  the same scale, so ONNX Runtime drops their QDQ pair.
- A Relu or Clip that is the only consumer of an int8-producing op is folded into that op's
  output quantisation (range ``[0, max]``, zero point at the bottom of the range): no QDQ
  between Conv and Relu. A Conv always produces int8 (QLinearConv needs an output Q); MatMul
  and Gemm produce float unless their consumers read int8 (MatMulIntegerToFloat, QGemm).
- Tensors derived only from an attention-mask input and constants stay float (their range in
  calibration, with padding trimmed, is not their range at inference).

Calibration runs the model in ONNX Runtime on the first ``samples`` samples of ``--data``; for
token models (an integer input named ``*mask*``) samples are batched by unpadded length and each
batch is trimmed to its longest row, so padding positions do not enter the ranges. BatchNorm is
folded first (ONNX Runtime cannot fuse it into a quantised Conv). After the rewrite the pass asks
ONNX Runtime (extended optimisation) what it made of the model and reports the QDQ pairs it did
not fuse. Outputs move: this is lossy; on the demo CNN top-1 stays within 0.3 pt.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from typing import Literal

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common as common_passes

from onnxcomp import quant, runtime
from onnxcomp.data import Dataset, rows_of, static_batch
from onnxcomp.errors import UsageError
from onnxcomp.passes._base import CompressionPass, CompressionResult, PassOptions, option
from onnxcomp.passes._opset import upgrade_opset
from onnxcomp.passes._placement import (
    Placement,
    Region,
    Timer,
    choose_placement,
    ort_timer,
    replaces,
    to_ms,
)
from onnxcomp.passes._qdq import (
    add_dequantized_weight,
    add_quantize_dequantize,
    add_rescaled_dequantize,
    leave_quantized_alone,
    unfused_qdq,
)
from onnxcomp.passes._weights import (
    Skipped,
    Weight,
    add_initializer,
    describe_skips,
    find_weights,
    lift_constant_weights,
    lifted_note,
    matches,
)
from onnxcomp.passes.quantize_dynamic import (
    DYNAMIC_LAYOUTS,
    DynamicQuantizeOptions,
    DynamicQuantizePass,
)
from onnxcomp.quant import calibrate
from onnxcomp.target import LAYOUTS, IntegerLayout, Target, stamp

OPSET_QDQ = 13  # per-axis QuantizeLinear / DequantizeLinear
CORE_OPS = ("Conv", "MatMul", "Gemm")
# Ops whose outputs are bounded ([0, 1] or [-1, 1]): calibrated by their observed extremes.
BOUNDED_OPS = frozenset({"Softmax", "Sigmoid", "HardSigmoid", "Tanh"})
INT8_OPS = frozenset(
    {"Add", "Mul", "Concat", "AveragePool", "GlobalAveragePool", "Sigmoid", "LeakyRelu"}
)
PASS_THROUGH_OPS = frozenset(
    {"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "MaxPool", "Resize", "Identity",
     "Slice", "Expand", "DepthToSpace", "SpaceToDepth"}
)  # fmt: skip
FOLDABLE_OPS = frozenset({"Relu", "Clip"})
FLOAT_FUSED_ACTIVATIONS = frozenset(
    {"HardSwish", "HardSigmoid", "Tanh", "Elu", "Selu", "Softplus", "Mish", "Gelu"}
)
HARD_ACTIVATIONS = frozenset({"HardSwish", "HardSigmoid"})
HARD_MODES = ("float", "int8")
MAX_CALIBRATION_BATCH = 16


@dataclasses.dataclass(frozen=True)
class StaticQuantizeOptions(PassOptions):
    method: Literal["minmax", "percentile", "entropy", "mse"] = option(
        "minmax", "activation range: minmax, percentile, entropy (KL) or mse"
    )
    percentile: float = option(calibrate.DEFAULT_PERCENTILE, "kept share of |x| for percentile")
    symmetric: bool = option(
        True, "signed activations get zero point 0 (false: an asymmetric range)"
    )
    layout: Literal["auto", "u8s8", "u8s8-7bit", "u8u8", "s8s8"] = option(
        "auto",
        "integer layout: auto (the target's: u8s8-7bit for portable and x86-avx2, u8s8 with "
        "VNNI/AMX, s8s8 for arm64/cuda), u8s8, u8s8-7bit (weights in [-63, 63]: no 16-bit "
        "overflow on AVX2), u8u8 (uint8 weights, zero point 128) or s8s8 (int8 activations)",
    )
    per_channel: bool = option(True, "one weight scale per output channel (false: per tensor)")
    op_types: tuple[str, ...] = option(CORE_OPS, "compute ops whose inputs are quantised")
    exclude: tuple[str, ...] = option((), "node or tensor name patterns (fnmatch) to keep float")
    samples: int = option(512, "calibration samples taken from --data")
    trim_padding: bool = option(
        True, "token data: batch by unpadded length, trim padding columns before calibrating"
    )
    fold_bn: bool = option(True, "fold BatchNormalization into Conv/Gemm first")
    report_unfused: bool = option(
        True, "ask ONNX Runtime which QDQ pairs it could not fuse (one extra session)"
    )
    hard_activations: Literal["float", "int8"] = option(
        "float",
        "HardSwish/HardSigmoid next to quantised Convs: float (ONNX Runtime fuses them into a "
        "float Conv, so those Convs stay float) or int8 (QLinearAdd + QLinearMul, the Convs "
        "int8 too; faster at larger batches)",
    )
    measure: Literal["auto", "true", "false"] = option(
        "auto",
        "decide per region from ONNX Runtime timings on this machine (level all, one thread) "
        "whether int8 pays, so the model is not slower than float at batch 1 and search_batch; "
        "auto: when the target is host",
    )
    search: bool = option(
        False,
        "time both hard_activations placements in ONNX Runtime (level all, one thread) on "
        "search_batch samples and keep the faster (models with HardSwish/HardSigmoid; measure "
        "does this too)",
    )
    dynamic_fallback: bool = option(
        True,
        "with measure: also time the MatMul/Gemm left float with their activations quantised "
        "at run time (as int8-dynamic) and keep that where it pays (AVX2 CPUs, small batches)",
    )
    search_batch: int = option(0, "batch size measure/search time (0: the calibration batch)")
    search_seconds: float = option(
        10.0, "time budget of measure's/search's timing loops, all together"
    )

    def validate(self) -> None:
        if self.method not in calibrate.METHODS:
            raise UsageError(
                f"int8-static: unknown method '{self.method}' ({', '.join(calibrate.METHODS)})"
            )
        if not 50 < self.percentile <= 100:
            raise UsageError("int8-static: percentile must be in (50, 100]")
        unknown = sorted(set(self.op_types) - set(CORE_OPS))
        if unknown:
            raise UsageError(
                f"int8-static: op_types {', '.join(unknown)} not supported "
                f"(valid: {', '.join(CORE_OPS)})"
            )
        if self.samples < 1:
            raise UsageError("int8-static: samples must be >= 1")
        if self.hard_activations not in HARD_MODES:
            raise UsageError(
                f"int8-static: hard_activations must be float or int8, not "
                f"'{self.hard_activations}'"
            )
        if isinstance(self.measure, bool):  # the Python API may say measure=True
            object.__setattr__(self, "measure", "true" if self.measure else "false")
        if self.measure not in ("auto", "true", "false"):
            raise UsageError(f"int8-static: measure must be auto, true or false, not "
                             f"'{self.measure}'")  # fmt: skip
        if self.layout != "auto" and self.layout not in LAYOUTS:
            raise UsageError(
                f"int8-static: unknown layout '{self.layout}' (auto, {', '.join(LAYOUTS)})"
            )
        if self.search_batch < 0 or self.search_seconds <= 0:
            raise UsageError("int8-static: search_batch must be >= 0 and search_seconds > 0")


@dataclasses.dataclass
class _Plan:
    """Where QDQ goes: quantised nodes, values with their own range, aliased values."""

    nodes: set[ir.Node] = dataclasses.field(default_factory=set)
    int8_out: set[ir.Value] = dataclasses.field(default_factory=set)  # produced in int8
    boundary: set[ir.Value] = dataclasses.field(default_factory=set)  # float producer, Q added
    alias: dict[ir.Value, ir.Value] = dataclasses.field(default_factory=dict)  # same params
    # x * c for a positive scalar c: the codes of x, read with scale * c (no node left)
    rescale: dict[ir.Value, tuple[ir.Value, float]] = dataclasses.field(default_factory=dict)
    weights: list[Weight] = dataclasses.field(default_factory=list)

    def quantized(self, value: ir.Value) -> bool:
        return (
            value in self.int8_out
            or value in self.boundary
            or value in self.alias
            or value in self.rescale
        )

    def own_range(self) -> list[ir.Value]:
        return [v for v in (*self.int8_out, *self.boundary) if v not in self.alias]


class StaticQuantizePass(CompressionPass):
    """Calibrated int8 QDQ on activations and weights, placed for ONNX Runtime's fusions."""

    summary = "static int8: calibrated QDQ on activations + per-channel weights (needs --data)"
    options_class = StaticQuantizeOptions
    options: StaticQuantizeOptions
    lossless = False
    needs_data = True
    # How placements are timed (measure, search); tests hand in a deterministic one.
    timer: Timer = staticmethod(ort_timer)

    def apply(self, model: ir.Model) -> CompressionResult:
        options = self.options
        assert self.data is not None
        notes: list[str] = []
        left_alone = leave_quantized_alone(model)
        if left_alone is not None:
            return left_alone
        lifted = lift_constant_weights(model)
        notes.extend(lifted_note(lifted))
        upgraded = upgrade_opset(model, OPSET_QDQ, why="per-channel QuantizeLinear")
        notes.extend(upgraded)
        folded = None
        if options.fold_bn and any(n.op_type == "BatchNormalization" for n in model.graph):
            from onnxcomp.passes.fold_bn import FoldBatchNormPass

            folded = FoldBatchNormPass()(model)
            if folded.modified:
                notes.append(
                    f"folded {folded.stats['batchnorms_folded']} BatchNormalization first "
                    "(ONNX Runtime cannot fuse it into a quantised Conv)"
                )
            notes.extend(folded.notes)
        common_passes.ShapeInferencePass()(model)
        _name_values(model.graph)
        self._ranges: dict[str, tuple[float, float]] = {}  # by value name, shared by trials

        target = self.resolved_target()
        layout = self._layout = (
            target.layout if options.layout == "auto" else LAYOUTS[options.layout]
        )
        notes.extend(_layout_notes(target, layout, options.layout == "auto"))

        mode = options.hard_activations
        keep_float: frozenset[str] = frozenset()
        hard = any(n.op_type in HARD_ACTIVATIONS for n in model.graph)
        measured = options.measure == "true" or (
            options.measure == "auto" and target.name == "host"
        )
        search: dict[str, object] = {}
        placement = None
        use_dynamic = False
        if measured or (options.search and hard):
            started = time.perf_counter()
            feeds = self._timing_feeds(model, measured)
            placement = self._place(model, hard, measured, feeds)
            mode, keep_float = placement.mode, placement.keep_float
            search, placement_notes = _placement_report(placement, hard)
            notes.extend(placement_notes)
            if measured and options.dynamic_fallback:
                fallback = self._try_dynamic(model, placement, feeds)
                if fallback is not None:
                    search["dynamic_fallback"] = fallback
                    notes.append(_dynamic_note(fallback))
                    use_dynamic = bool(fallback["kept"])
            search["search_seconds"] = round(time.perf_counter() - started, 3)
        if placement is not None and placement.float_only:
            stats: dict[str, object] = {"weights_quantized": 0, "int8_layout": None,
                                        "target": target.kind, **search}  # fmt: skip
            modified = bool(lifted or upgraded or (folded and folded.modified))
            if use_dynamic:
                notes.extend(self._quantize_dynamic(model, stats))
            return CompressionResult(model, modified or use_dynamic, stats=stats, notes=notes)
        plan, skipped, stats, _ = self._rewrite(model, mode, keep_float)
        if use_dynamic:
            notes.extend(self._quantize_dynamic(model, stats))

        notes.extend(describe_skips(skipped))
        float_ops = Counter(
            n.op_type for n in model.graph if n.op_type in INT8_OPS and n not in plan.nodes
        )
        if float_ops:
            kept = ", ".join(f"{op} x{k}" for op, k in sorted(float_ops.items()))
            notes.append(f"left in float (not inside an int8 region): {kept}")
        hard_float = Counter(n.op_type for n in model.graph if n.op_type in HARD_ACTIVATIONS)
        if stats["hard_activations_int8"] or hard_float:
            kept = ", ".join(f"{op} x{k}" for op, k in sorted(hard_float.items())) or "none"
            notes.append(
                f"hard_activations={mode}: {stats['hard_activations_int8']} HardSwish/HardSigmoid "
                f"run in int8 (QLinearAdd, QLinearMul), in float: {kept}"
            )
        if any(g is not model.graph for g in model.graphs()):
            notes.append("activations inside If/Loop/Scan bodies are left in float")
        stats["int8_layout"] = layout.name if plan.nodes else None
        stats["target"] = target.kind
        stats.update(search)
        if plan.nodes:
            stamp(model, target, layout)
        if options.report_unfused and plan.nodes:
            stats.update(unfused_qdq(model))
            if stats["unfused_qdq_pairs"]:
                notes.append(
                    f"ONNX Runtime left {stats['unfused_qdq_pairs']} QDQ pairs unfused "
                    "(they run as float fake-quantisation)"
                )
        modified = bool(plan.nodes or lifted or upgraded or (folded and folded.modified))
        return CompressionResult(model, modified, stats=stats, notes=notes)

    def _rewrite(
        self, model: ir.Model, mode: str, keep_float: frozenset[str] = frozenset()
    ) -> tuple[_Plan, list[Skipped], dict, list[Region]]:
        """Plan, calibrate and insert QDQ; ``mode`` places HardSwish/HardSigmoid (float or
        int8), ``keep_float`` names (by output) Conv/MatMul/Gemm nodes to leave in float.
        Returns the plan, the weights left in float, the stats and the int8 regions."""
        options = self.options
        assert self.data is not None
        composites = _decompose_hard_activations(model.graph) if mode == "int8" else []
        plan, skipped = self._plan(model, keep_float)
        kept = [c for c in composites if c.planned(plan)]
        for composite in composites:
            if composite not in kept:
                composite.restore(model.graph, plan)
        regions = _regions(model.graph, plan)
        started = time.perf_counter()
        ranges = self._calibrate(model, plan)
        calibration_seconds = time.perf_counter() - started

        before = after = 0
        for weight in plan.weights:
            before += weight.nbytes
        params = {v: self._params(v, ranges[v]) for v in plan.own_range()}
        for value in [*plan.alias, *plan.rescale]:
            _derived_params(plan, params, value)
        weight_scales: dict[ir.Node, np.ndarray] = {}
        for weight in plan.weights:
            nbytes, scale = self._quantize_weight(model.graph, weight)
            after += nbytes
            weight_scales.update((use.node, scale) for use in weight.uses)
        biases = self._quantize_biases(model.graph, plan, params, weight_scales)
        after += biases
        self._insert_qdq(model.graph, plan, params)
        common_passes.TopologicalSortPass()(model)
        stats = {
            "weights_quantized": len(plan.weights),
            "weights_skipped": len(skipped),
            "weight_bytes_before": before,
            "weight_bytes_after": after,
            "activations_quantized": len(params),
            "nodes_quantized": dict(Counter(n.op_type for n in plan.nodes)),
            "hard_activations_int8": len(kept),
            "method": options.method,
            "calibration_samples": min(options.samples, self.data.num_samples),
            "calibration_seconds": round(calibration_seconds, 3),
            "int8_regions": len(regions),
        }
        return plan, skipped, stats, regions

    def _timing_feeds(self, model: ir.Model, measured: bool) -> dict[int, dict[str, np.ndarray]]:
        """Inputs to time placements on, by batch size: batch 1 (when ``measured``) and
        ``search_batch`` (the calibration batch by default)."""
        options = self.options
        assert self.data is not None
        # Timed on the data as given: calibration trims padding (and starts with the shortest
        # sequences), but the user runs the padded shapes, where int8 pays differently.
        feeds = next(_calibration_batches(model, self.data, options.samples, trim=False))
        static = static_batch(model)
        batch = static or options.search_batch or len(next(iter(feeds.values())))
        if static is None:
            feeds = {k: np.resize(v, (batch, *v.shape[1:])) for k, v in feeds.items()}
        sizes = [batch] if static is not None or not measured else sorted({1, batch})
        return {b: {k: v[:b] for k, v in feeds.items()} for b in sizes}

    def _dynamic_pass(self) -> DynamicQuantizePass:
        """int8-dynamic for the MatMul/Gemm left float, in the layout matching this pass's."""
        layout = self._layout.name if self._layout.name in DYNAMIC_LAYOUTS else "auto"
        options = DynamicQuantizeOptions(layout=layout, exclude=self.options.exclude,
                                         report_kernels=False)  # fmt: skip
        return DynamicQuantizePass(options, target=self.target)

    def _quantize_dynamic(self, model: ir.Model, stats: dict[str, object]) -> list[str]:
        """Quantise the MatMul/Gemm left float at run time (the kept dynamic fallback); adds
        its counts to ``stats`` and returns its notes."""
        result = self._dynamic_pass().quantize_float_weights(model)
        stats["dynamic_weights_quantized"] = result.stats["weights_quantized"]
        stats["int8_layout"] = stats.get("int8_layout") or result.stats["int8_layout"]
        stats["dynamic_nodes_quantized"] = result.stats["nodes_quantized"]
        for key in ("weights_quantized", "weight_bytes_before", "weight_bytes_after"):
            stats[key] = int(stats.get(key, 0)) + int(result.stats[key])
        return [f"dynamic fallback: {note}" for note in result.notes]

    def _try_dynamic(
        self, model: ir.Model, placement: Placement, feeds: dict[int, dict[str, np.ndarray]]
    ) -> dict[str, object] | None:
        """Time float, the chosen placement, and the chosen placement with the MatMul/Gemm it
        leaves float quantised at run time, in one loop. The last is kept (``kept``) when it
        is not slower than float at any batch size and faster than the placement overall."""
        placed = model.clone()
        if not placement.float_only:
            self._rewrite(placed, placement.mode, placement.keep_float)
        dynamic = placed.clone()
        quantized = self._dynamic_pass().quantize_float_weights(dynamic)
        count = int(quantized.stats.get("weights_quantized", 0))
        if not count:
            return None
        inputs = list(feeds.values())
        # one more loop than choose_placement's share: a fifth of the budget
        base, chosen, with_dynamic = self.timer([model, placed, dynamic], inputs,
                                                self.options.search_seconds / 5)  # fmt: skip
        kept = replaces(with_dynamic, base if placement.float_only else chosen, base)
        ms = [to_ms(times) for times in (base, chosen, with_dynamic)]
        return {"weights": count, "kept": kept, "batches": list(feeds),
                "fp32_ms": ms[0], "placement_ms": ms[1], "dynamic_ms": ms[2]}  # fmt: skip

    def _place(
        self, model: ir.Model, hard: bool, measured: bool, by_batch: dict[int, dict]
    ) -> Placement:
        """Time placements of ``model`` (a copy of it per trial) in ONNX Runtime and choose
        one: with ``measured``, which regions stay int8 at batch 1 and ``search_batch`` against
        float; else (``search``) only the hard_activations mode, at ``search_batch``."""
        options = self.options

        def build(mode: str, keep_float: frozenset[str]) -> tuple[ir.Model, list[Region]]:
            trial = model.clone()
            regions = self._rewrite(trial, mode, keep_float)[3]
            return trial, regions

        modes = HARD_MODES if hard else (options.hard_activations,)
        return choose_placement(
            build,
            modes,
            by_batch,
            timer=self.timer,
            seconds=options.search_seconds,
            float_model=model if measured else None,
        )

    # -- placement -------------------------------------------------------------------------

    def _plan(
        self, model: ir.Model, keep_float: frozenset[str] = frozenset()
    ) -> tuple[_Plan, list[Skipped]]:
        options = self.options
        graph = model.graph
        found, skipped = find_weights(model, ("Conv", "Gemm", "MatMul"), exclude=options.exclude)
        weight_of = {use.node: w for w in found for use in w.uses}
        masked = _mask_derived(graph)
        plan = _Plan()

        def is_float(value: ir.Value | None) -> bool:
            return (
                value is not None
                and value.dtype == ir.DataType.FLOAT
                and value.const_value is None
                and value not in masked
            )

        def excluded(node: ir.Node) -> bool:
            names = (node.name, *(v.name for v in node.outputs))
            return bool(options.exclude) and matches(options.exclude, *names)

        def core(node: ir.Node) -> bool:
            if node.op_type not in options.op_types or excluded(node):
                return False
            if node.outputs[0].name in keep_float:
                return False
            if not is_float(node.inputs[0]):
                return False
            if node.op_type == "Conv":
                return (
                    node in weight_of
                    and len(node.inputs[0].shape or ()) >= 3
                    and not _float_activation(node.outputs[0])
                )
            if node.op_type == "Gemm":
                return node in weight_of and not node.attributes.get_int("transA", 0)
            # MatMul: a 2-D constant weight, or two float activations
            if node in weight_of:
                return len(weight_of[node].shape) == 2
            return is_float(node.inputs[1])

        cores = {n for n in graph if core(n)}
        sinks: dict[ir.Value, bool] = {}

        def reads_int8(value: ir.Value) -> bool:
            """Whether every consumer of ``value`` can take it in int8."""
            if value in sinks:
                return sinks[value]
            sinks[value] = False  # cycles (none in a DAG) and recursion guard
            uses = list(value.uses())
            ok = bool(uses) and not value.is_graph_output()
            for node, index in uses:
                if not ok:
                    break
                if node in cores:
                    ok = index in (0, 1) and (index == 0 or node.op_type == "MatMul")
                elif _scalar_factor(node) is not None and not excluded(node):
                    ok = is_float(node.outputs[0]) and reads_int8(node.outputs[0])
                elif node.op_type in INT8_OPS and not excluded(node):
                    ok = all(
                        v is None or v.const_value is not None or _int8_capable(v, cores)
                        for v in node.inputs
                    ) and reads_int8(node.outputs[0])
                elif node.op_type in PASS_THROUGH_OPS and index == 0:
                    ok = is_float(node.outputs[0]) and reads_int8(node.outputs[0])
                elif node.op_type in FOLDABLE_OPS and index == 0:
                    ok = len(uses) == 1 and reads_int8(node.outputs[0])
                else:
                    ok = False
            sinks[value] = ok
            return ok

        def output_of(node: ir.Node) -> ir.Value:
            """The value that carries the node's output QDQ: past a sole Relu/Clip consumer."""
            value = node.outputs[0]
            uses = list(value.uses())
            if len(uses) == 1 and not value.is_graph_output():
                consumer, index = uses[0]
                if consumer.op_type in FOLDABLE_OPS and index == 0 and _clip_foldable(consumer):
                    return consumer.outputs[0]
            return value

        for node in graph:  # topological order
            if node in cores and node.op_type == "Conv":
                out = output_of(node)
                if not (
                    (plan.quantized(node.inputs[0]) and node.inputs[0] not in plan.boundary)
                    or reads_int8(out)
                ):
                    continue
            if node in cores:
                plan.nodes.add(node)
                activations = [node.inputs[0]]
                if node.op_type == "MatMul" and node not in weight_of:
                    activations.append(node.inputs[1])
                for value in activations:
                    if not plan.quantized(value):
                        plan.boundary.add(value)
                out = output_of(node)
                if not out.is_graph_output() and (node.op_type == "Conv" or reads_int8(out)):
                    plan.int8_out.add(out)
            elif (factor := _scalar_factor(node)) is not None and not excluded(node):
                source, out = _scaled_input(node), node.outputs[0]
                if (
                    plan.quantized(source)
                    and source not in plan.boundary
                    and is_float(out)
                    and reads_int8(out)
                ):
                    plan.nodes.add(node)
                    plan.rescale[out] = (source, factor)
            elif node.op_type in INT8_OPS and not excluded(node):
                inputs = [v for v in node.inputs if v is not None]
                arrive = all(v.const_value is not None or plan.quantized(v) for v in inputs)
                floats = [v for v in inputs if v.const_value is None]
                out = output_of(node)
                if (
                    arrive
                    and floats
                    and all(v.dtype == ir.DataType.FLOAT for v in inputs)
                    and is_float(node.outputs[0])
                    and reads_int8(out)
                ):
                    plan.nodes.add(node)
                    plan.int8_out.add(out)
                    for v in inputs:
                        if v.const_value is not None:
                            plan.boundary.add(v)
            elif node.op_type in PASS_THROUGH_OPS and node.inputs and not excluded(node):
                source, out = node.inputs[0], node.outputs[0]
                if (
                    source is not None
                    and plan.quantized(source)
                    and source not in plan.boundary
                    and is_float(out)
                    and reads_int8(out)
                ):
                    plan.nodes.add(node)
                    plan.alias[out] = source
                    plan.int8_out.add(out)

        for weight in found:
            users = {u.node for u in weight.uses}
            if users <= plan.nodes:
                plan.weights.append(weight)
            elif weight.value.const_value.dtype != ir.DataType.FLOAT:
                dtype = weight.value.const_value.dtype.name.lower()
                skipped.append(Skipped(weight.name, f"{dtype}, not float32: quantise before fp16"))
            else:
                others = sorted({n.op_type for n in users - plan.nodes})
                reason = f"its {'/'.join(others)} stays in float (not inside an int8 region)"
                skipped.append(Skipped(weight.name, reason))
        return plan, skipped

    # -- calibration -----------------------------------------------------------------------

    def _calibrate(self, model: ir.Model, plan: _Plan) -> dict[ir.Value, tuple[float, float]]:
        """Range of every value that gets its own quantisation parameters."""
        options = self.options
        values = plan.own_range()
        constants = {v for v in values if v.const_value is not None}
        ranges: dict[ir.Value, tuple[float, float]] = {}
        for value in constants:
            array = value.const_value.numpy().astype(np.float64)  # type: ignore[union-attr]
            ranges[value] = (float(min(array.min(), 0.0)), float(max(array.max(), 0.0)))
        cache = getattr(self, "_ranges", {})
        for value in values:
            if value not in constants and value.name in cache:
                ranges[value] = cache[value.name]
        live = [v for v in values if v not in constants and v not in ranges]
        if not live:
            return ranges
        assert self.data is not None
        by_name = {v.name: v for v in live}
        hists = {name: calibrate.Histogram() for name in by_name}
        minmax = options.method == "minmax"
        extremes: dict[str, list[float]] = {name: [np.inf, -np.inf] for name in by_name}
        batches = _calibration_batches(model, self.data, options.samples, options.trim_padding)
        for found in runtime.collect_activations(model, list(by_name), batches):
            for name, array in found.items():
                if minmax:
                    finite = array[np.isfinite(array)] if array.dtype.kind == "f" else array
                    if finite.size:
                        low, high = extremes[name]
                        extremes[name] = [min(low, float(finite.min())),
                                          max(high, float(finite.max()))]  # fmt: skip
                else:
                    hists[name].add(array)
        for name, value in by_name.items():
            if minmax:
                low, high = extremes[name]
                if not np.isfinite(low):
                    low = high = 0.0
                ranges[value] = (min(low, 0.0), max(high, 0.0))
                continue
            hist = hists[name]
            if hist.empty:
                ranges[value] = (0.0, 0.0)
                continue
            producer = value.producer()
            if producer is not None and producer.op_type in BOUNDED_OPS:
                # Outputs confined to [0, 1] or [-1, 1] have no outliers to clip: the rare
                # large values (attention weights near 1) are the information. KL clipped a
                # Softmax to [0, 0.25] and the encoder's cosine fell to 0.96.
                ranges[value] = (min(hist.low, 0.0), max(hist.high, 0.0))
                continue
            unsigned = hist.low >= 0
            ranges[value] = calibrate.compute_range(
                hist,
                options.method,  # type: ignore[arg-type]
                symmetric=options.symmetric and not unsigned,
                percentile=options.percentile,
            )
        cache.update((v.name, ranges[v]) for v in live)
        return ranges

    def _params(self, value: ir.Value, bounds: tuple[float, float]) -> tuple[float, int]:
        """Scale and zero point of an activation's per-tensor int8 quantisation."""
        low, high = bounds
        low, high = _clip_bounds(value, low, high)
        unsigned = low >= 0
        symmetric = self.options.symmetric and not unsigned
        if high - low <= 0:
            high = low + 1e-6 if not symmetric else 1e-6
        scale, zero_point, _, _ = calibrate.range_params(low, high, 8, symmetric)
        return scale, zero_point

    # -- rewrite ---------------------------------------------------------------------------

    def _quantize_weight(self, graph: ir.Graph, weight: Weight) -> tuple[int, np.ndarray]:
        """Per-channel symmetric weight behind DequantizeLinear, in the layout's storage:
        int8 codes in [-weight_max, weight_max] (zero point 0), or for uint8 weights the same
        codes plus 128 (zero point 128, so the scale and the int32 bias are unchanged).
        Returns (bytes, scale)."""
        array = weight.array
        layout = self._layout
        axis = weight.channel_axis if self.options.per_channel else None
        limit = layout.weight_max if layout.weight_max < 127 else None
        scale, _ = quant.linear_params(
            array, 8, axis=axis, symmetric=True, dtype=np.float32, limit=limit
        )
        codes = quant.quantize(array, scale, None, 8, axis=axis, limit=limit)
        # An explicit zero point: ONNX Runtime's Gemm fusion needs it to see the weight type.
        if layout.weight == "uint8":
            codes = (codes.astype(np.int16) + 128).astype(np.uint8)
            zero_point = np.full(np.shape(scale), 128, dtype=np.uint8)
        else:
            zero_point = np.zeros(np.shape(scale), dtype=np.int8)
        value, nbytes = add_dequantized_weight(
            graph, weight.name, codes, 8, np.asarray(scale), zero_point, axis=axis
        )
        weight.replace(value)
        graph.initializers.pop(weight.name)
        return nbytes, np.asarray(scale)

    def _quantize_biases(
        self,
        graph: ir.Graph,
        plan: _Plan,
        params: dict[ir.Value, tuple[float, int]],
        weight_scales: dict[ir.Node, np.ndarray],
    ) -> int:
        """Conv / Gemm biases as int32 with scale = input scale x weight scale; returns bytes.
        A bias shared by several nodes gets one int32 copy per node (their scales differ)."""
        nbytes = 0
        for node in plan.nodes:
            if node.op_type not in ("Conv", "Gemm") or len(node.inputs) < 3:
                continue
            bias, activation = node.inputs[2], node.inputs[0]
            if bias is None or bias.const_value is None or node not in weight_scales:
                continue
            if activation not in params or bias.const_value.dtype != ir.DataType.FLOAT:
                continue
            if node.op_type == "Gemm" and node.attributes.get_float("beta", 1.0) != 1.0:
                continue
            array = bias.const_value.numpy()
            if array.ndim != 1:
                continue
            codes, scale = quant.quantize_bias(array, params[activation][0], weight_scales[node])
            value, size = add_dequantized_weight(
                graph, bias.name or "bias", codes, 32, scale, None, axis=0 if scale.ndim else None
            )
            node.replace_input_with(2, value)
            nbytes += size
            if not bias.uses() and bias.name in graph.initializers:
                graph.initializers.pop(bias.name)
        return nbytes

    def _insert_qdq(
        self, graph: ir.Graph, plan: _Plan, params: dict[ir.Value, tuple[float, int]]
    ) -> None:
        unsigned = self._layout.activation == "uint8"
        dtype = ir.DataType.UINT8 if unsigned else ir.DataType.INT8
        dequantized: dict[ir.Value, ir.Value] = {}
        for value, (scale, zero_point) in params.items():
            if value in plan.rescale:
                continue
            uses = list(value.uses())
            dq = add_quantize_dequantize(
                graph,
                value,
                scale,
                zero_point + 128 if unsigned else zero_point,
                name=value.name or "activation",
                dtype=dtype,
            )
            int8_region = value in plan.int8_out
            for node, index in uses:
                if int8_region or node in plan.nodes:
                    node.replace_input_with(index, dq)
            dequantized[value] = dq
        for value, (source, factor) in plan.rescale.items():  # in topological order
            dq = add_rescaled_dequantize(
                graph, dequantized[source], factor, name=value.name or "rescaled"
            )
            dequantized[value] = dq
            node = value.producer()
            value.replace_all_uses_with(dq)
            if node is not None:
                graph.remove(node, safe=True)
        for dq in dequantized.values():  # a value read only through rescaled copies
            node = dq.producer()
            if node is not None and not dq.uses() and not dq.is_graph_output():
                graph.remove(node, safe=True)


def _calibration_batches(
    model: ir.Model, data: Dataset, samples: int, trim: bool
) -> Iterator[dict[str, np.ndarray]]:
    """Feeds of up to MAX_CALIBRATION_BATCH samples. With a mask input (and ``trim``), samples
    of equal unpadded length are batched together and trimmed to it: no padding positions."""
    static = static_batch(model)
    total = min(samples, data.num_samples)
    if static is not None or not trim:
        yield from data.batches(static or MAX_CALIBRATION_BATCH, total)
        return
    inputs = rows_of(data.inputs, slice(0, total))
    masks = [n for n, a in inputs.items() if "mask" in n.lower() and a.ndim == 2
             and a.dtype.kind in "iub"]  # fmt: skip
    if not masks or _static_sequence(model, masks[0]):
        yield from data.batches(MAX_CALIBRATION_BATCH, total)
        return
    lengths = calibrate.unpadded_lengths(inputs[masks[0]])
    groups: dict[int, list[int]] = defaultdict(list)
    for index, length in enumerate(lengths):
        groups[int(length)].append(index)
    for length in sorted(groups):
        rows = np.array(groups[length])
        for start in range(0, len(rows), MAX_CALIBRATION_BATCH):
            chunk = rows[start : start + MAX_CALIBRATION_BATCH]
            feeds = rows_of(inputs, chunk)
            yield calibrate.trim_padding(feeds, tuple(masks))


def _regions(graph: ir.Graph, plan: _Plan) -> list[Region]:
    """Connected groups of quantised nodes that hold a Conv/MatMul/Gemm, in graph order.

    Two quantised nodes are in one region when one reads the other's int8 output (also past a
    Relu/Clip folded into it) or both read one QDQ pair: a region goes to float as a whole
    without moving the QDQ of any other region."""
    parent: dict[object, object] = {}

    def find(item: object) -> object:
        parent.setdefault(item, item)
        while parent[item] is not item:
            parent[item] = parent[parent[item]]
            item = parent[item]
        return item

    def union(a: object, b: object) -> None:
        parent[find(a)] = find(b)

    def carried(value: ir.Value) -> ir.Value:
        """The value holding ``value``'s quantisation: past a sole folded Relu/Clip."""
        uses = list(value.uses())
        if not plan.quantized(value) and len(uses) == 1 and uses[0][0].op_type in FOLDABLE_OPS:
            return uses[0][0].outputs[0]
        return value

    ordered = [n for n in graph if n in plan.nodes]
    for node in ordered:
        find(node)
        values = [v for v in node.inputs if v is not None and v.const_value is None]
        values += [carried(v) for v in node.outputs]
        for value in values:
            if plan.quantized(value):
                union(node, value)
    groups: dict[object, list[ir.Node]] = defaultdict(list)
    for node in ordered:
        groups[find(node)].append(node)
    regions = []
    for nodes in groups.values():
        cores = [n for n in nodes if n.op_type in CORE_OPS]
        if not cores:
            continue
        first = cores[0]
        name = first.name or first.outputs[0].name or first.op_type
        regions.append(
            Region(name, frozenset(str(n.outputs[0].name) for n in cores),
                   dict(Counter(n.op_type for n in nodes)))
        )  # fmt: skip
    return regions


def _layout_notes(target: Target, layout: IntegerLayout, auto: bool) -> list[str]:
    """Which layout and why; a warning where the chosen one overflows on the target."""
    how = "the target's" if auto else "asked for"
    notes = [f"int8 layout {layout.name} ({how}; target {target.describe()}): {layout.summary}"]
    if target.saturates and layout.weight == "int8" and layout.weight_max > 63:
        notes.append(
            f"layout {layout.name} on target {target.kind}: ONNX Runtime's u8·s8 kernels on AVX2 "
            "without VNNI add pairs of products in 16 bits and saturate; outputs may move a lot "
            "there (u8s8-7bit or u8u8 do not overflow)"
        )
    return notes


def _dynamic_note(fallback: dict[str, object]) -> str:
    """One line on the dynamic fallback: what was timed and whether it was kept."""
    batches = "/".join(str(b) for b in fallback["batches"])  # type: ignore[union-attr]
    timed = (f"float {_per_batch(fallback['fp32_ms'])}, placement "
             f"{_per_batch(fallback['placement_ms'])}, with dynamic "
             f"{_per_batch(fallback['dynamic_ms'])} ms at batch {batches}")  # fmt: skip
    verdict = "kept" if fallback["kept"] else "not kept (it does not pay here)"
    return (
        f"dynamic fallback ({fallback['weights']} MatMul/Gemm weights left float, "
        f"activations quantised at run time): {verdict}; {timed}"
    )


def _placement_report(placement: Placement, hard: bool) -> tuple[dict[str, object], list[str]]:
    """Stats and notes for a measured placement / hard_activations search."""
    batches = "/".join(str(b) for b in placement.batches)
    stats: dict[str, object] = {
        "search_batch": placement.batches[-1],
        "search_ms": placement.mode_ms,
    }
    notes = []
    if hard:
        timings = ", ".join(f"{k} {'/'.join(map(str, v))} ms" for k, v in placement.mode_ms.items())
        notes.append(
            f"search: hard_activations={placement.mode} (ONNX Runtime, batch {batches}, one "
            f"thread, medians: {timings})"
        )
    if not placement.final_ms:
        return stats, notes
    ratios = placement.ratios()
    stats |= {
        "measured_batches": list(placement.batches),
        "measured_ms": placement.final_ms,
        "measured_ratio": [round(r, 3) for r in ratios],
        "region_decisions": placement.regions,
        "float_only": placement.float_only,
    }
    for decision in placement.regions if len(placement.regions) > 1 else ():
        verdict = "int8" if decision["int8"] else "float"
        notes.append(
            f"region {decision['region']}: {verdict} (model with it int8 "
            f"{_per_batch(decision['int8_ms'])} ms, float {_per_batch(decision['float_ms'])} ms "
            f"at batch {batches})"
        )
    figures = ", ".join(f"batch {b}: {r:.2f}x" for b, r in zip(placement.batches, ratios,
                                                                  strict=True))  # fmt: skip
    kept = sum(1 for d in placement.regions if d["int8"])
    if placement.float_only and not kept:
        notes.append("measured: no region's static int8 version pays on this machine; the "
                     "regions are left in float")
    elif placement.float_only:
        notes.append(
            f"measured: int8 with {kept} of {len(placement.regions)} regions is slower than float "
            f"on this machine (int8 / float latency {figures}); the regions are left in float"
        )
    else:
        notes.append(
            f"measured: {kept} of {len(placement.regions)} int8 regions kept; int8 / float "
            f"latency {figures} (ONNX Runtime level all, one thread)"
        )
    return stats, notes


def _per_batch(times: object) -> str:
    return "/".join(str(t) for t in times)  # type: ignore[attr-defined]


def _static_sequence(model: ir.Model, mask_name: str) -> bool:
    for value in model.graph.inputs:
        if value.name == mask_name and value.shape is not None and len(value.shape) >= 2:
            return isinstance(value.shape[1], int)
    return False


def _mask_derived(graph: ir.Graph) -> set[ir.Value]:
    """Values computed only from integer graph inputs named like masks, and constants."""
    derived = {v for v in graph.inputs if "mask" in (v.name or "").lower()
               and v.dtype is not None and not v.dtype.is_floating_point()}  # fmt: skip
    if not derived:
        return derived
    for node in graph:
        inputs = [v for v in node.inputs if v is not None]
        if (
            inputs
            and any(v in derived for v in inputs)
            and all(v in derived or v.const_value is not None for v in inputs)
        ):
            derived.update(node.outputs)
    return derived


def _scalar_factor(node: ir.Node) -> float | None:
    """``c`` when ``node`` is ``Mul(x, c)`` with a positive scalar constant ``c`` and a float
    activation ``x``: int8 codes of ``x`` read with the scale times ``c`` give the output."""
    if node.op_type != "Mul" or len(node.inputs) != 2 or None in node.inputs:
        return None
    constants = [v for v in node.inputs if v is not None and v.const_value is not None]
    if len(constants) != 1:
        return None
    tensor = constants[0].const_value
    other = _scaled_input(node)
    if tensor is None or tensor.dtype != ir.DataType.FLOAT or tensor.size != 1:
        return None
    if len(tensor.shape) and (other.shape is None or len(tensor.shape) > len(other.shape)):
        return None  # the constant would add axes by broadcasting
    factor = float(tensor.numpy().reshape(()))
    return factor if np.isfinite(factor) and factor > 0 else None


def _scaled_input(node: ir.Node) -> ir.Value:
    """The activation input of a :func:`_scalar_factor` Mul."""
    first, second = node.inputs
    assert first is not None and second is not None
    return second if first.const_value is not None else first


def _derived_params(
    plan: _Plan, params: dict[ir.Value, tuple[float, int]], value: ir.Value
) -> tuple[float, int]:
    """Parameters of an aliased value (its source's) or a rescaled one (scale times factor)."""
    if value not in params:
        if value in plan.alias:
            params[value] = _derived_params(plan, params, plan.alias[value])
        else:
            source, factor = plan.rescale[value]
            scale, zero_point = _derived_params(plan, params, source)
            params[value] = (scale * factor, zero_point)
    return params[value]


@dataclasses.dataclass
class _Composite:
    """A HardSwish / HardSigmoid written as ``Mul(Clip(Add(x, beta/alpha), 0, 1/alpha), alpha)``
    (HardSwish: ``x`` times that, alpha 1/6, beta 1/2) so that it can run in int8: the Clip
    folds into the Add's output quantisation, the scalar Mul into a DequantizeLinear scale.
    :meth:`restore` puts the original node back where no int8 region formed."""

    op_type: str
    attributes: dict[str, ir.Attr]
    name: str | None
    source: ir.Value
    nodes: list[ir.Node]

    def planned(self, plan: _Plan) -> bool:
        return all(n in plan.nodes for n in self.nodes if n.op_type != "Clip")

    def restore(self, graph: ir.Graph, plan: _Plan) -> None:
        output = self.nodes[-1].outputs[0]
        node = ir.node(self.op_type, [self.source], attributes=self.attributes, name=self.name)
        new = node.outputs[0]
        new.dtype, new.shape, name = output.dtype, output.shape, output.name
        graph.insert_before(self.nodes[0], node)
        output.replace_all_uses_with(new)
        graph.remove(self.nodes, safe=True)
        for value in (v for n in self.nodes for v in n.inputs if v is not None):
            if value.const_value is not None and not value.uses() and value.name:
                graph.initializers.pop(value.name, None)
        output.name, new.name = None, name
        removed = {v for n in self.nodes for v in n.outputs}
        plan.nodes.difference_update(self.nodes)
        for values in (plan.int8_out, plan.boundary):
            values.difference_update(removed)
        for mapping in (plan.alias, plan.rescale):
            for value in removed & set(mapping):
                del mapping[value]


def _decompose_hard_activations(graph: ir.Graph) -> list[_Composite]:
    """Write each float HardSwish / HardSigmoid (alpha > 0) of ``graph`` as a
    :class:`_Composite`, in place; returns them."""
    composites = []
    for node in list(graph):
        if node.op_type not in HARD_ACTIVATIONS or node.domain not in ("", "ai.onnx"):
            continue
        source, output = node.inputs[0], node.outputs[0]
        if source is None or source.dtype != ir.DataType.FLOAT or output.is_graph_output():
            continue
        if node.op_type == "HardSwish":
            alpha, beta = 1 / 6, 0.5
        else:
            alpha = node.attributes.get_float("alpha", 0.2)
            beta = node.attributes.get_float("beta", 0.5)
        if alpha <= 0:
            continue
        name = output.name or "hard"

        def constant(suffix: str, number: float, name: str = name) -> ir.Value:
            return add_initializer(graph, f"{name}_{suffix}", ir.tensor(np.float32(number)))

        shifted = ir.node("Add", [source, constant("shift", beta / alpha)],
                          name=f"{name}_shift")  # fmt: skip
        clipped = ir.node(
            "Clip",
            [shifted.outputs[0], constant("low", 0.0), constant("high", 1 / alpha)],
            name=f"{name}_clip",
        )
        gate = ir.node("Mul", [clipped.outputs[0], constant("alpha", alpha)],
                       name=f"{name}_gate")  # fmt: skip
        nodes = [shifted, clipped, gate]
        if node.op_type == "HardSwish":
            nodes.append(ir.node("Mul", [source, gate.outputs[0]], name=f"{name}_mul"))
        for step, suffix in zip(nodes, ("shifted", "clipped", "gated", "product"), strict=False):
            step.outputs[0].dtype, step.outputs[0].shape = ir.DataType.FLOAT, output.shape
            step.outputs[0].name = f"{name}_{suffix}"
        composite = _Composite(node.op_type, dict(node.attributes), node.name, source, nodes)
        graph.insert_before(node, nodes)
        output.replace_all_uses_with(nodes[-1].outputs[0])
        graph.remove(node, safe=True)
        nodes[-1].outputs[0].name, output.name = output.name, None
        composites.append(composite)
    return composites


def _float_activation(value: ir.Value) -> bool:
    """Whether ``value`` feeds only an activation ONNX Runtime fuses into a float Conv but has
    no int8 kernel for: quantising the Conv would unfuse it (DQ, activation, Q: three passes
    over the tensor instead of none)."""
    uses = list(value.uses())
    return len(uses) == 1 and uses[0][0].op_type in FLOAT_FUSED_ACTIVATIONS


def _int8_capable(value: ir.Value, cores: set[ir.Node]) -> bool:
    """Whether ``value``'s producer could emit int8 (a syntactic check, ahead of planning)."""
    producer = value.producer()
    if producer is None:
        return False
    if producer.op_type in FOLDABLE_OPS | PASS_THROUGH_OPS:
        source = producer.inputs[0]
        return source is not None and _int8_capable(source, cores)
    return producer in cores or producer.op_type in INT8_OPS


def _clip_foldable(node: ir.Node) -> bool:
    """Relu always; Clip when its bounds are constants with min >= 0 (a ReLU6-like clip)."""
    if node.op_type == "Relu":
        return True
    low = node.inputs[1] if len(node.inputs) > 1 else None
    if low is None:
        return node.attributes.get_float("min", -np.inf) >= 0
    return low.const_value is not None and float(low.const_value.numpy()) >= 0


def _clip_bounds(value: ir.Value, low: float, high: float) -> tuple[float, float]:
    """A Clip output's range stays within the Clip's bounds (so ONNX Runtime can drop it)."""
    producer = value.producer()
    if producer is not None and producer.op_type == "Relu":
        return max(low, 0.0), max(high, 0.0)
    if producer is None or producer.op_type != "Clip":
        return low, high
    bounds = [producer.inputs[i] if len(producer.inputs) > i else None for i in (1, 2)]
    cmin = (
        float(bounds[0].const_value.numpy())
        if bounds[0] is not None and bounds[0].const_value is not None
        else producer.attributes.get_float("min", -np.inf)
    )
    cmax = (
        float(bounds[1].const_value.numpy())
        if bounds[1] is not None and bounds[1].const_value is not None
        else producer.attributes.get_float("max", np.inf)
    )
    return max(low, cmin), min(high, cmax * (1 - 1e-6))


def _root(plan: _Plan, value: ir.Value) -> ir.Value:
    while value in plan.alias:
        value = plan.alias[value]
    return value


def _name_values(graph: ir.Graph) -> None:
    index = 0
    for node in graph:
        for value in node.outputs:
            if not value.name:
                value.name = f"_onnxcomp_value_{index}"
                index += 1


__all__ = ["StaticQuantizeOptions", "StaticQuantizePass"]
