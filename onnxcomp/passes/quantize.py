"""Weight-only quantisation: float weights become integer initializers + DequantizeLinear.

``int8`` (per output channel), ``int4`` (blocks along the input axis), ``ternary`` and
``binary`` (INT2 storage, one scale per channel) all run :class:`WeightQuantizePass` with
different presets. Each weight of a Conv, ConvTranspose, Gemm, MatMul, Gather (embedding
table) or Slice (a position table read as ``table[:seq]``) is *replaced*: its float
initializer is removed and the consumers read ``DequantizeLinear(q, scale[, zero_point])`` of
the same dtype, so no float copy stays in the file. Weights held in Constant nodes are lifted
first; a tensor shared by several nodes is quantised once; weights inside If/Loop/Scan
bodies, excluded, too small or non-finite ones are left in float and listed in the notes. A
model whose opset is too old for the quantised form is
upgraded with onnx's version converter (and the notes say so), or the pass fails with
:class:`UnsupportedModelError`. Weights already quantised are left as they are.

BatchNorm parameters would be what is left in float (ShuffleNet, DenseNet: 0.27-0.30x for
int8): with linear codes, BatchNorms first fold into the Conv / Gemm / MatMul before them, with a
Caffe ``Scale`` layer's Mul / Add (exact; per-channel and per-block codes do not change under a
per-channel factor, so this is skipped for per-tensor scales); those with nothing to fold into
(after a Concat or a pooling) become ``x * s + b`` with float16 vectors
(:mod:`onnxcomp.passes._batchnorm`; DenseNet-121 int8 output cosine 0.99985 with float16 or
float32 vectors, 0.99977 with int8 ones). Ternary and binary keep BatchNorms by default: the
distillation that follows them trains BatchNorm's scale and shift.

Weights are quantised one at a time, each a slice of channels or blocks at a time
(:func:`onnxcomp.quant.by_groups`), the float source released once read and the codes handed
to the pipeline's scratch data when it streams a big model (:mod:`onnxcomp.passes._weights`):
memory stays within a few tensors whatever the model's size (gptq/awq excepted: their
statistics come from running the model).

Outputs move: linear quantisation keeps each weight within half a quantisation step
(``|w - w'| <= scale / 2``); binary and ternary weights lose accuracy without fine-tuning.

Linear codes can be chosen with the layer's inputs in mind (``method``, from ``--data`` run
through ONNX Runtime; decoders get their mask, positions and empty cache made up from token
ids): ``gptq`` compensates each input row's rounding error with the rows not yet quantised
(:mod:`onnxcomp.quant.gptq`), ``awq`` scales input channels by activation size, exactly (the
``1 / s`` folded into the norm weight that makes the input, or a Mul), and clips each block's
range by output error (:mod:`onnxcomp.quant.awq`, :mod:`onnxcomp.quant.clip`); these two drop
the half-step bound for clipped or compensated weights in exchange for a smaller output error
(``stats[method + "_error_vs_rtn"]``). ``format=matmulnbits`` writes ONNX Runtime's own kernels
(MatMulNBits, GatherBlockQuantized) with the same codes instead of DequantizeLinear.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Literal

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common as common_passes

from onnxcomp import decoder, quant, runtime
from onnxcomp.data import run_batch_size
from onnxcomp.errors import UnsupportedModelError, UsageError
from onnxcomp.io import read_ahead
from onnxcomp.passes._base import (
    CompressionPass,
    CompressionResult,
    PassOptions,
    name_list,
    option,
)
from onnxcomp.passes._batchnorm import (
    affine_reason,
    batchnorms,
    batchnorms_to_affine,
    fold_batchnorms,
    fold_channel_affines,
)
from onnxcomp.passes._opset import upgrade_opset
from onnxcomp.passes._qdq import (
    add_dequantized_weight,
    integer_tensor,
    quantized_weight_count,
)
from onnxcomp.passes._weights import (
    WEIGHT_INPUTS,
    Skipped,
    Weight,
    add_initializer,
    all_finite,
    describe_skips,
    find_weights,
    lift_constant_weights,
    lifted_note,
    release,
    weight_tensor,
)

# The scale carries the weight's dtype (DequantizeLinear's output dtype is the scale's).
SCALE_DTYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
TABLE_OPS = frozenset({"Gather", "Slice"})  # embedding and position tables
# Lowest opsets: per-axis DequantizeLinear, float16/bfloat16 scales, blocked scales + INT4, INT2.
OPSET_PER_AXIS, OPSET_HALF_SCALES, OPSET_BLOCKED, OPSET_INT2 = 13, 19, 21, 25
MS_DOMAIN = "com.microsoft"
NBITS_BLOCK = 128  # MatMulNBits needs blocks; per-channel requests (int8) get blocks of this


@dataclasses.dataclass(frozen=True)
class WeightQuantizeOptions(PassOptions):
    bits: int = option(8, "bits per stored weight: 8, 4 or 2")
    scheme: Literal["linear", "ternary", "binary"] = option(
        "linear", "linear (scale, optional zero point), ternary {-1,0,1} or binary {-1,1}"
    )
    block_size: int = option(
        0, "0: one scale per output channel; else one per block of this many input elements"
    )
    per_channel: bool = option(True, "one scale per output channel (false: per tensor)")
    symmetric: bool = option(True, "zero point 0 (false: a zero point per channel or block)")
    op_types: tuple[str, ...] = option(
        ("Conv", "ConvTranspose", "Gemm", "MatMul", "Gather", "Slice"),
        "ops whose weights are quantised (Gather, Slice: embedding and position tables)",
    )
    include_embeddings: bool = option(
        True, "quantise embedding and position tables (read by Gather or Slice)"
    )
    exclude: tuple[str, ...] = option((), "node or weight name patterns (fnmatch) to keep float")
    min_size: int = option(0, "keep weights with fewer elements than this in float")
    ternary_rule: Literal["optimal", "twn"] = option(
        "optimal", "ternary threshold: least-squares per channel, or TWN's 0.7*mean|w|"
    )
    method: Literal["rtn", "gptq", "awq"] = option(
        "rtn",
        "rounding of linear codes: rtn (round to nearest), gptq (error compensation with the "
        "inputs' inverse Hessian) or awq (activation-aware input scaling); gptq/awq need --data",
    )
    format: Literal["auto", "qdq", "matmulnbits"] = option(
        "auto",
        "qdq (DequantizeLinear + MatMul, standard ONNX), matmulnbits (ONNX Runtime's "
        "com.microsoft kernels: MatMulNBits for 2-D MatMul weights, 4/8 bits, and "
        "GatherBlockQuantized for 4-bit embedding tables) or auto (matmulnbits for CPU "
        "targets x86-*/arm64/host, qdq for portable/cuda)",
    )
    accuracy_level: int = option(
        0, "MatMulNBits accuracy_level: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 activations"
    )
    include_head: bool = option(
        True, "quantise the output projection (LM head: a MatMul producing a graph output)"
    )
    calib_samples: int = option(64, "samples of --data used for gptq/awq statistics")
    sequential: bool = option(
        False,
        "gptq/awq: each layer's input statistics from the model with the layers before it "
        "quantised (one ONNX Runtime pass per group of layers sharing an input; slower)",
    )
    damp: float = option(0.01, "gptq: fraction of the mean Hessian diagonal added to it")
    act_order: bool = option(True, "gptq: quantise input rows by decreasing activation energy")
    clip: bool | None = option(
        None, "gptq/awq: each block's range chosen by output error (default: awq yes, gptq no)"
    )
    batchnorm: Literal["auto", "compact", "fold", "keep"] = option(
        "auto",
        "BatchNormalization: fold into the Conv/Gemm/MatMul before it (exact; not with "
        "per-tensor scales) and rewrite the rest as x*s+b with float16 s, b (compact); fold "
        "only; keep as is; auto: compact for linear codes, keep for ternary/binary (which "
        "distillation fine-tunes: it trains BatchNorm's scale and shift)",
    )

    def validate(self) -> None:
        if self.bits not in (8, 4, 2):
            raise UsageError(f"weight quantisation: bits must be 8, 4 or 2, not {self.bits}")
        if self.scheme not in ("linear", "ternary", "binary"):
            raise UsageError(f"weight quantisation: unknown scheme '{self.scheme}'")
        if self.scheme != "linear" and self.bits != 2:
            raise UsageError(f"weight quantisation: scheme {self.scheme} needs bits=2")
        if self.scheme != "linear" and not self.symmetric:
            raise UsageError(f"weight quantisation: scheme {self.scheme} has no zero point")
        if self.block_size and (self.block_size < 16 or self.block_size & (self.block_size - 1)):
            raise UsageError(
                "weight quantisation: block_size must be 0 (per channel) or a power of two "
                f">= 16, not {self.block_size}"
            )
        unknown = sorted(set(self.op_types) - set(WEIGHT_INPUTS))
        if unknown:
            raise UsageError(
                f"weight quantisation: no weights known for op_types {', '.join(unknown)} "
                f"(valid: {', '.join(WEIGHT_INPUTS)})"
            )
        if self.min_size < 0:
            raise UsageError("weight quantisation: min_size must be >= 0")
        if self.ternary_rule not in ("optimal", "twn"):
            raise UsageError(f"weight quantisation: unknown ternary_rule '{self.ternary_rule}'")
        if self.method != "rtn" and (self.scheme != "linear" or self.bits == 2):
            raise UsageError(
                f"weight quantisation: method {self.method} needs linear 8- or 4-bit codes"
            )
        if self.format == "matmulnbits" and self.bits == 2:
            raise UsageError("weight quantisation: format matmulnbits takes 8 or 4 bits")
        if not 0 <= self.accuracy_level <= 4:
            raise UsageError("weight quantisation: accuracy_level must be 0..4")
        if self.calib_samples < 1 or not 0 < self.damp < 1:
            raise UsageError("weight quantisation: calib_samples >= 1 and 0 < damp < 1")


@dataclasses.dataclass(frozen=True)
class _Layout:
    axis: int | None
    block_size: int
    fallback: str | None = None  # why the requested layout could not be used

    @property
    def kind(self) -> str:
        if self.block_size:
            return "per-block"
        return "per-channel" if self.axis is not None else "per-tensor"


class WeightQuantizePass(CompressionPass):
    """Replace float weights by int8 / int4 / int2 initializers feeding DequantizeLinear, or
    ONNX Runtime's MatMulNBits / GatherBlockQuantized (``format``)."""

    summary = (
        "weight-only quantisation (int8/int4/int2): integer weights + DequantizeLinear or "
        "ONNX Runtime's MatMulNBits; rtn, gptq or awq rounding"
    )
    options_class = WeightQuantizeOptions
    options: WeightQuantizeOptions
    lossless = False

    def preflight(self) -> None:
        super().preflight()
        if self.options.method != "rtn" and self.data is None:
            raise UsageError(
                f"weight quantisation: method={self.options.method} needs real inputs "
                "(calibration activations): pass --data FILE.npz"
            )

    def apply(self, model: ir.Model) -> CompressionResult:
        options = self.options
        notes: list[str] = []
        lifted = lift_constant_weights(model)
        notes.extend(lifted_note(lifted))
        bn_stats, bn_notes = self._batchnorms(model)
        notes.extend(bn_notes)
        already = quantized_weight_count(model)
        if already:
            notes.append(f"the model already has {already} quantised weights; left them alone")
        weights, skipped = self._find(model)
        if options.method != "rtn":
            # gptq/awq calibrate and scale the weights they quantise: leave out first those
            # that will not be (rtn checks each as it comes, reading it once).
            weights = _drop_nonfinite(weights, skipped)
        # Weights going to ONNX Runtime's kernels need no newer opset (and a 1 B model should
        # not go through the version converter, which serialises it whole).
        qdq = [w for w in weights if self._format(w, self._layout(w))[0] == "qdq"]
        if qdq:
            upgraded = upgrade_opset(model, self._needed_opset(qdq), why=self._form())
            if upgraded:
                notes.extend(upgraded)
                weights, skipped = self._find(model)  # the converter rebuilt the graph
                if options.method != "rtn":
                    weights = _drop_nonfinite(weights, skipped)
        if not weights and not already:
            notes.append("no float weights to quantise")

        layouts: Counter = Counter()
        formats: Counter = Counter()
        fallbacks: dict[str, list[str]] = defaultdict(list)
        gains: list[float] = []
        awq: Counter = Counter()
        before = after = 0
        quantized: list[str] = []

        def quantize_one(weight: Weight, stats: _InputStats | None) -> None:
            nonlocal before, after
            # masks: -inf has no code (gptq/awq left such weights out already; the coders
            # see inf/NaN in the extremes or sums they take anyway, and raise NonFiniteWeight)
            layout = self._layout(weight)
            fmt, why = self._format(weight, layout)
            if fmt == "matmulnbits" and not layout.block_size and "Gather" not in weight.op_types:
                layout = _Layout(0, NBITS_BLOCK, "MatMulNBits needs blocks: blocks of 128")
            nbytes_before = weight.nbytes
            source = weight.value.const_value
            try:
                nbytes, gain = self._quantize(model, weight, layout, fmt, stats)
            except quant.NonFiniteWeight:
                skipped.append(Skipped(weight.name, NONFINITE))
                nbytes = None
            release(source)  # after the except block: its traceback held views of the weight
            if nbytes is None:
                return
            quantized.append(weight.name)
            if why:
                fallbacks[why].append(weight.name)
            layouts[layout.kind] += 1
            formats[fmt] += 1
            if layout.fallback:
                fallbacks[layout.fallback].append(weight.name)
            before += nbytes_before
            after += nbytes
            if gain is not None:
                gains.append(gain)

        calibrated: dict[str, _InputStats] = {}
        stages = self._stages(model, weights) if options.method != "rtn" else []
        if stages and not options.sequential:
            stages = [[w for stage in stages for w in stage]]
        for stage in stages:
            # Sequential: the statistics of each stage's inputs come from the model with every
            # earlier stage already quantised, so later layers compensate earlier errors.
            found = self._calibrate(model, stage)
            calibrated.update(found)
            if options.method == "awq":
                awq.update(self._apply_awq(model.graph, stage, found))
            for weight in stage:
                quantize_one(weight, found.get(weight.name))
            if options.sequential:
                common_passes.TopologicalSortPass()(model)
        if stages:
            notes.append(
                f"{options.method}: input statistics of {len(stages)} activation groups from "
                f"{min(options.calib_samples, self.data.num_samples)} samples of "  # type: ignore[union-attr]
                f"{self.data.description or '--data'}"  # type: ignore[union-attr]
                + (", each from the model quantised up to it" if options.sequential else "")
            )
        done = {w.name for stage in stages for w in stage}
        pending = [w for w in weights if w.name not in done]
        # The next weight is read from disk while this one is coded (a model in external data
        # that is not in the page cache yet).
        for weight in read_ahead(pending, weight_tensor):
            quantize_one(weight, None)
        if weights:
            common_passes.TopologicalSortPass()(model)

        for reason, names in fallbacks.items():
            notes.append(f"{reason} for {len(names)} weights: {name_list(names)}")
        notes.extend(describe_skips(skipped))
        if weights and options.scheme != "linear":
            notes.append(
                f"{options.scheme} weights lose accuracy without fine-tuning; "
                "recover it with distillation"
            )
        if options.method != "rtn":
            rest = sum(1 for w in weights if w.name not in calibrated)
            if rest:
                notes.append(
                    f"{rest} weights rounded to nearest ({options.method} covers 2-D MatMul "
                    "weights read by one node; embedding tables and shared weights are not)"
                )
        stats = {
            "weights_quantized": len(quantized),
            "weights_skipped": len(skipped),
            "weight_bytes_before": before,
            "weight_bytes_after": after,
            "bits": options.bits,
            "scheme": options.scheme,
            "method": options.method,
            "layouts": dict(layouts),
            "formats": dict(formats),
        }
        if gains:
            # Output error on the calibration inputs relative to round-to-nearest's (< 1: better).
            stats[f"{options.method}_error_vs_rtn"] = round(float(np.mean(gains)), 4)
        if awq:
            stats["awq_scales"] = dict(awq)
        stats.update(bn_stats)
        changed = bool(quantized) or lifted > 0 or any(bn_stats.values())
        return CompressionResult(model, changed, stats=stats, notes=notes)

    def _batchnorms(self, model: ir.Model) -> tuple[dict[str, int], list[str]]:
        """Fold BatchNorms into the layer before them, then (``compact``) rewrite the others as
        ``x * s + b`` with float16 vectors; their four float vectors would otherwise be what
        is left of the model's size (DenseNet's pre-activation BNs follow a Concat)."""
        mode = self.options.batchnorm
        if mode == "auto":
            mode = "compact" if self.options.scheme == "linear" else "keep"
        if mode == "keep" or not batchnorms(model):
            return {}, []
        notes: list[str] = []
        folded = affines = 0
        if self.options.per_channel or self.options.block_size:
            # A per-channel factor leaves per-channel (and per-block) codes as they were; a
            # single scale per tensor would have to cover BN's spread of channel scales.
            try:
                folded, notes = fold_batchnorms(model)
            except UnsupportedModelError as e:  # BatchNormalization older than opset 9
                return {}, [f"BatchNormalization left as it was: {e}"]
            affines = fold_channel_affines(model.graph)
            if folded:
                notes.append(f"folded {folded} BatchNormalization into the layers before them")
            if affines:
                notes.append(f"folded {affines} Mul/Add by per-channel constants (e.g. a Caffe "
                             "Scale layer) into the Conv before them")  # fmt: skip
        else:
            notes.append("BatchNormalization not folded: per-tensor scales would have to "
                         "cover its spread of channel scales")  # fmt: skip
        left = [n for n in model.graph if n.op_type == "BatchNormalization"]
        stats = {"batchnorms_folded": folded, "affines_folded": affines}
        if mode == "fold" or not left:
            common_passes.RemoveUnusedNodesPass()(model)
            return stats, notes
        if any(n.inputs[0] is not None and n.inputs[0].shape is None for n in left):
            with contextlib.suppress(Exception):  # else those BatchNorms stay as they are
                common_passes.ShapeInferencePass()(model)
            left = [n for n in model.graph if n.op_type == "BatchNormalization"]
        kept: dict[str, list[str]] = defaultdict(list)
        ready = []
        for node in left:
            why = affine_reason(node)
            if why is None:
                ready.append(node)
            else:
                kept[why].append(node.name or "?")
        follows = Counter(
            p.op_type if (p := n.inputs[0].producer()) is not None else "a graph input"  # type: ignore[union-attr]
            for n in ready
        )
        compacted, nbytes = batchnorms_to_affine(model.graph, ready)
        if compacted:
            after = ", ".join(f"{count} after {op}" for op, count in follows.most_common())
            notes.append(
                f"{compacted} BatchNormalization with nothing to fold into ({after}) rewritten "
                f"as x*s+b: 2 vectors (float16 where they fit), {nbytes} bytes"
            )
        for why, names in kept.items():
            notes.append(f"kept {len(names)} BatchNormalization ({why}): {name_list(names)}")
        common_passes.RemoveUnusedNodesPass()(model)  # the old vectors
        return {**stats, "batchnorms_compacted": compacted}, notes

    def _format(self, weight: Weight, layout: _Layout) -> tuple[str, str | None]:
        """``qdq`` or ``matmulnbits`` for this weight, and why not the one asked for (if so)."""
        options = self.options
        wanted = options.format
        if wanted == "auto":  # the target decides (Target.weight_only_format)
            wanted = self.resolved_target().weight_only_format
        if wanted == "qdq" or options.scheme != "linear" or options.bits == 2:
            return "qdq", None
        reason = None
        gathers = all(
            u.node.op_type == "Gather" and u.index == 0 and not u.node.attributes.get_int("axis", 0)
            for u in weight.uses
        )
        if gathers and len(weight.shape) == 2:
            if options.bits != 4:
                reason = "GatherBlockQuantized tables need 4 bits"
            elif layout.axis != 1 or not layout.block_size:
                reason = "table rows not in blocks"
        elif len(weight.shape) != 2 or any(
            u.node.op_type != "MatMul" or u.index != 1 for u in weight.uses
        ):
            reason = "not a 2-D weight read only by MatMul or Gather"
        elif weight.value.const_value.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
            reason = "MatMulNBits takes float32/float16 weights"
        elif layout.block_size and layout.axis != 0:
            reason = "blocks not along the input axis"
        elif layout.fallback and layout.block_size == 0 and options.block_size:
            reason = "input axis shorter than the block"
        if reason is None:
            return "matmulnbits", None
        explicit = options.format == "matmulnbits"
        return "qdq", (f"DequantizeLinear instead of ONNX Runtime's kernels ({reason})"
                       if explicit else None)  # fmt: skip

    @staticmethod
    def _stages(model: ir.Model, weights: list[Weight]) -> list[list[Weight]]:
        """The weights gptq/awq handle, grouped by the activation they multiply, in graph
        order (q/k/v of a layer form one stage, gate/up another)."""
        position = {id(node): i for i, node in enumerate(model.graph)}
        groups: dict[ir.Value, list[Weight]] = defaultdict(list)
        for weight in weights:
            x = _single_matmul_input(weight)
            if x is not None:
                groups[x].append(weight)
        return sorted(groups.values(), key=lambda g: min(position[id(w.uses[0].node)] for w in g))

    def _calibrate(self, model: ir.Model, weights: list[Weight]) -> dict[str, _InputStats]:
        """Second moment and mean |x| of the inputs of the weights gptq/awq handle, from
        ``--data`` run through ONNX Runtime (decoder inputs completed from the token ids)."""
        assert self.data is not None
        inputs = {w.name: x for w in weights if (x := _single_matmul_input(w)) is not None}
        if not inputs:
            return {}
        sizes = {x.name: w.shape[0] for w in weights if (x := inputs.get(w.name)) is not None}
        stats = {name: _InputStats(quant.Hessian(size), np.zeros(size), 0)
                 for name, size in sizes.items()}  # fmt: skip
        sig = decoder.signature(model)
        total = min(self.options.calib_samples, self.data.num_samples)
        batch = run_batch_size(model, total, cap=8)
        feeds = (decoder.complete_feeds(sig, f) if sig else f
                 for f in self.data.batches(batch, total))  # fmt: skip
        for values in runtime.collect_activations(model, list(sizes), feeds):
            for name, x in values.items():
                rows = np.asarray(x, dtype=np.float64).reshape(-1, sizes[name])
                entry = stats[name]
                entry.hessian.add(rows)
                entry.abs_sum += np.abs(rows).sum(axis=0)
                entry.count += len(rows)
        return {w: stats[x.name] for w, x in inputs.items()}

    def _apply_awq(
        self, graph: ir.Graph, weights: list[Weight], calibrated: dict[str, _InputStats]
    ) -> dict[str, int]:
        """Scale the inputs of each group of weights sharing an activation by ``1 / s`` and
        their rows by ``s`` (exact before rounding); ``s`` from :func:`quant.awq_scale`.
        The ``1 / s`` goes into the constant of a Mul or a LayerNormalization making the
        activation when nothing else reads it, else into a new Mul in front of the group."""
        groups: dict[ir.Value, list[Weight]] = defaultdict(list)
        for weight in weights:
            if weight.name in calibrated:
                groups[weight.uses[0].node.inputs[0]].append(weight)  # type: ignore[index]
        counts: Counter = Counter()
        for x, group in groups.items():
            entry = calibrated[group[0].name]
            layout = self._layout(group[0])
            s, alpha, _ = quant.awq_scale(
                [w.array.astype(np.float64) for w in group],
                entry.mean_abs,
                entry.hessian.matrix,
                self._rounder(layout),
            )
            if alpha == 0:
                counts["unscaled"] += 1
                continue
            nodes = [w.uses[0].node for w in group]
            if _fold_input_scale(x, 1.0 / s, nodes):
                counts["folded"] += 1
            else:
                _insert_input_scale(graph, x, 1.0 / s, nodes)
                counts["mul_inserted"] += 1
            for weight in group:
                array = weight.array
                scaled = (array.astype(np.float64) * s[:, None]).astype(array.dtype)
                weight.value.const_value = ir.tensor(scaled, name=weight.name)
                calibrated[weight.name].awq = s
        return dict(counts)

    def _rounder(
        self, layout: _Layout, symmetric: bool | None = None
    ) -> Callable[[np.ndarray], np.ndarray]:
        """Round-to-nearest and back with this pass's bits and ``layout`` (AWQ's search, and
        the baseline gptq/awq are compared with)."""
        options = self.options
        symmetric = options.symmetric if symmetric is None else symmetric

        def rounder(w: np.ndarray) -> np.ndarray:
            axis, block = layout.axis, layout.block_size
            scale, zero = quant.linear_params(
                w, options.bits, axis=axis, block_size=block, symmetric=symmetric,
                dtype=np.float32,
            )  # fmt: skip
            codes = quant.quantize(w, scale, zero, options.bits, axis=axis, block_size=block)
            return quant.dequantize(codes, scale, zero, axis=axis, block_size=block).astype(
                np.float64
            )

        return rounder

    def _form(self) -> str:
        options = self.options
        if options.bits == 2:
            return f"{options.scheme} INT2 storage"
        if options.bits == 4 or options.block_size:
            return f"INT{options.bits} with blocked scales"
        return "per-channel DequantizeLinear"

    def _needed_opset(self, weights: list[Weight]) -> int:
        options = self.options
        if options.bits == 2:
            return OPSET_INT2
        if options.bits == 4 or options.block_size:
            return OPSET_BLOCKED
        if any(w.value.const_value.dtype != ir.DataType.FLOAT for w in weights):
            return OPSET_HALF_SCALES
        return OPSET_PER_AXIS

    def _find(self, model: ir.Model) -> tuple[list[Weight], list[Skipped]]:
        """Weights this pass quantises, and every weight-like tensor it leaves, with why."""
        options = self.options
        wanted = set(options.op_types) - (set() if options.include_embeddings else TABLE_OPS)
        found, skipped = find_weights(
            model, tuple(WEIGHT_INPUTS), exclude=options.exclude, min_size=options.min_size
        )
        weights = []
        for weight in found:
            dtype = weight.value.const_value.dtype
            unwanted = sorted(weight.op_types - wanted)
            if unwanted and set(unwanted) <= TABLE_OPS and not options.include_embeddings:
                skipped.append(Skipped(weight.name, "embedding table (include_embeddings=false)"))
            elif unwanted:
                reason = f"read by {'/'.join(unwanted)}, not in op_types"
                skipped.append(Skipped(weight.name, reason))
            elif dtype not in SCALE_DTYPES:
                reason = f"{dtype.name.lower()}, which DequantizeLinear cannot output"
                skipped.append(Skipped(weight.name, reason))
            elif weight.value.is_graph_output():
                skipped.append(Skipped(weight.name, "also a graph output"))
            elif not options.include_head and any(
                u.node.op_type == "MatMul" and u.node.outputs[0].is_graph_output()
                for u in weight.uses
            ):
                skipped.append(Skipped(weight.name, "output projection (include_head=false)"))
            else:
                weights.append(weight)
        return weights, skipped

    def _layout(self, weight: Weight) -> _Layout:
        """Blocks along the input axis, else per output channel, else one scale (with why)."""
        options = self.options
        fallback = None
        if options.block_size:
            axes = {_input_axis(use.node, len(weight.shape)) for use in weight.uses}
            axis = axes.pop() if len(axes) == 1 else None
            if axis is None:
                fallback = "consumers disagree on the input axis"
            elif weight.shape[axis] < options.block_size:
                fallback = f"input axis shorter than block_size {options.block_size}"
            else:
                return _Layout(axis, options.block_size)
        if options.per_channel or fallback:
            if weight.channel_axis is not None:
                if fallback:
                    fallback = f"per-channel scales instead of blocks ({fallback})"
                return _Layout(weight.channel_axis, 0, fallback)
            return _Layout(None, 0, "one scale per tensor (consumers share no channel axis)")
        return _Layout(None, 0)

    def _quantize(
        self,
        model: ir.Model,
        weight: Weight,
        layout: _Layout,
        fmt: str,
        stats: _InputStats | None,
    ) -> tuple[int, float | None]:
        """Replace ``weight`` by its codes (DequantizeLinear or MatMulNBits); returns the new
        bytes and, for gptq/awq, the output error relative to round-to-nearest's."""
        options = self.options
        graph = model.graph
        array = weight.array
        axis, block = layout.axis, layout.block_size
        zero_point = None
        gain = None
        if options.scheme == "linear":
            # Position tables are not centred on zero (rows carry offsets): below 8 bits a zero
            # point per block (tiny_encoder, int4: 96.7% top-1, 96.55% without; 256-sample
            # check 96.9% vs 95.3%).
            position_table = weight.op_types <= {"Slice", "Gather"}
            symmetric = options.symmetric and not (options.bits < 8 and position_table)

            def rtn(part: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
                scale, zero_point = quant.linear_params(
                    part, options.bits, axis=axis, block_size=block, symmetric=symmetric,
                    dtype=array.dtype, finite=True,
                )  # fmt: skip
                codes = quant.quantize(
                    part, scale, zero_point, options.bits, axis=axis, block_size=block
                )
                return codes, scale, zero_point

            if array.dtype in quant.FLOAT32_EXACT:
                # Coded in float32 a cache-sized piece at a time on a thread per core: whole,
                # which is faster than column slices of a row-major weight.
                codes, scale, zero_point = rtn(array)
            else:
                # A slice of channels or blocks at a time: a big weight's float64 temporaries
                # would otherwise be several times its size.
                codes, scale, zero_point = quant.by_groups(rtn, array, axis=axis, block_size=block)
            if stats is not None:
                hessian = stats.hessian.matrix
                if options.method == "gptq":
                    codes, scale, zero_point = quant.gptq_quantize(
                        array,
                        hessian,
                        options.bits,
                        block_size=block if axis == 0 else 0,
                        symmetric=symmetric,
                        dtype=array.dtype,
                        clip=bool(options.clip),
                        act_order=options.act_order,
                        factor=stats.factor(options.damp, options.act_order),
                    )
                    axis = axis if block else 1
                else:  # awq: the rows were scaled by s, so the inputs are x / s
                    scaled = hessian if stats.awq is None else hessian / np.outer(
                        stats.awq, stats.awq
                    )
                    scale, zero_point = quant.clip_search(
                        array, scaled, options.bits, block_size=block if axis == 0 else 0,
                        symmetric=symmetric, dtype=array.dtype,
                        ratios=quant.CLIP_RATIOS if options.clip is not False else (1.0,),
                    )  # fmt: skip
                    axis = axis if block else 1
                    codes = quant.quantize(
                        array, scale, zero_point, options.bits, axis=axis, block_size=block
                    )
                ours = quant.dequantize(codes, scale, zero_point, axis=axis, block_size=block)
                original = _unscale(array.astype(np.float64), stats)
                rtn = self._rounder(layout, symmetric)(original)
                base = quant.output_error(original, rtn, hessian)
                err = quant.output_error(original, _unscale(ours, stats), hessian)
                gain = err / base if base > 0 else 1.0
        elif options.scheme == "binary":
            codes, alpha, _ = quant.by_groups(
                lambda part: (
                    *quant.binarize(part, axis=axis, block_size=block, finite=True), None
                ),
                array, axis=axis, block_size=block,
            )  # fmt: skip
            scale = alpha.astype(array.dtype)
        else:
            rule = options.ternary_rule
            codes, alpha, _ = quant.by_groups(
                lambda part: (
                    *quant.ternarize(
                        part, axis=axis, block_size=block, rule=rule, finite=True
                    ),
                    None,
                ),
                array, axis=axis, block_size=block,
            )  # fmt: skip
            scale = alpha.astype(array.dtype)
        if fmt == "matmulnbits" and weight.op_types == {"Gather"}:
            nbytes = _add_gather_block_quantized(
                model, weight, codes, np.asarray(scale), zero_point, options.bits, block
            )
            graph.initializers.pop(weight.name)
            return nbytes, gain
        if fmt == "matmulnbits":
            nbytes = _add_matmulnbits(
                model, weight, codes, np.asarray(scale), zero_point, options.bits, block,
                options.accuracy_level,
            )  # fmt: skip
            graph.initializers.pop(weight.name)
            return nbytes, gain
        value, nbytes = add_dequantized_weight(
            graph,
            weight.name,
            codes,
            options.bits,
            np.asarray(scale),
            zero_point,
            axis=axis,
            block_size=block,
        )
        weight.replace(value)
        graph.initializers.pop(weight.name)
        return nbytes, gain


@dataclasses.dataclass
class _InputStats:
    """Calibration statistics of one MatMul input (of the float model): second moment, sum of
    |x|, row count, and the AWQ scale its weight's rows were multiplied by (None: not scaled)."""

    hessian: quant.Hessian
    abs_sum: np.ndarray
    count: int
    awq: np.ndarray | None = None
    _factors: dict[bool, tuple[np.ndarray, np.ndarray]] = dataclasses.field(
        default_factory=dict
    )

    @property
    def mean_abs(self) -> np.ndarray:
        return self.abs_sum / max(self.count, 1)

    def factor(self, damp: float, act_order: bool) -> tuple[np.ndarray, np.ndarray]:
        """GPTQ's inverse Hessian factor (rows in act-order when asked), once per activation:
        q/k/v projections share theirs."""
        if act_order not in self._factors:
            h = self.hessian.matrix
            if act_order:
                order = quant.act_order_permutation(h)
                h = h[np.ix_(order, order)]
            self._factors[act_order] = quant.inverse_hessian_factor(h, damp)
        return self._factors[act_order]


NONFINITE = "holds inf or NaN"


def _drop_nonfinite(weights: list[Weight], skipped: list[Skipped]) -> list[Weight]:
    """``weights`` without those holding inf or NaN, which go to ``skipped``."""
    finite = [w for w in weights if _finite(w)]
    skipped.extend(Skipped(w.name, NONFINITE) for w in weights if w not in finite)
    return finite


def _finite(weight: Weight) -> bool:
    array = weight.array
    finite = all_finite(array)
    del array  # a live view keeps the mapping: release could not unmap it
    release(weight.value.const_value)
    return finite


def _unscale(w: np.ndarray, stats: _InputStats) -> np.ndarray:
    return w if stats.awq is None else w / stats.awq[:, None]


def _single_matmul_input(weight: Weight) -> ir.Value | None:
    """The activation a 2-D weight multiplies, when one MatMul reads it (gptq/awq's case)."""
    if len(weight.uses) != 1 or len(weight.shape) != 2:
        return None
    use = weight.uses[0]
    if use.node.op_type != "MatMul" or use.index != 1:
        return None
    x = use.node.inputs[0]
    return x if x is not None and x.name else None


def _fold_input_scale(x: ir.Value, factor: np.ndarray, consumers: list[ir.Node]) -> bool:
    """Multiply the per-channel constant of the Mul / LayerNormalization that makes ``x`` by
    ``factor``, when only ``consumers`` read ``x`` and only that node reads the constant."""
    readers = {id(node) for node, _ in x.uses()}
    if x.is_graph_output() or readers != {id(n) for n in consumers}:
        return False
    producer = x.producer()
    if producer is None:
        return False
    if producer.op_type == "Mul":
        slots = [i for i in (0, 1) if _channel_constant(producer.inputs[i], len(factor))]
    elif producer.op_type == "LayerNormalization":
        slots = [i for i in (1, 2) if i < len(producer.inputs) and producer.inputs[i] is not None]
        if not all(_channel_constant(producer.inputs[i], len(factor)) for i in slots):
            return False
    else:
        return False
    if not slots:
        return False
    for i in slots[:1] if producer.op_type == "Mul" else slots:
        value = producer.inputs[i]
        assert value is not None and value.const_value is not None
        array = value.const_value.numpy()
        scaled = (array.astype(np.float64) * factor.reshape(array.shape)).astype(array.dtype)
        value.const_value = ir.tensor(scaled, name=value.name)
    return True


def _channel_constant(value: ir.Value | None, channels: int) -> bool:
    """A float initializer of shape [..., channels] (ones before), read by one node only."""
    if value is None or value.const_value is None or not value.is_initializer():
        return False
    if value.is_graph_input() or value.is_graph_output() or len(list(value.uses())) != 1:
        return False
    shape = tuple(value.const_value.shape)
    return (
        value.const_value.dtype.is_floating_point()
        and len(shape) >= 1
        and shape[-1] == channels
        and all(d == 1 for d in shape[:-1])
    )


def _insert_input_scale(
    graph: ir.Graph, x: ir.Value, factor: np.ndarray, consumers: list[ir.Node]
) -> None:
    """``Mul(x, factor)`` read by ``consumers`` instead of ``x``."""
    dtype = x.dtype.numpy() if x.dtype is not None else np.float32
    constant = add_initializer(graph, f"{x.name}_awq_factor", ir.tensor(factor.astype(dtype)))
    node = ir.node("Mul", [x, constant], name=f"{x.name}_awq_scale")
    out = node.outputs[0]
    out.name, out.dtype, out.shape = f"{x.name}_awq_scaled", x.dtype, x.shape
    graph.append(node)
    for consumer in consumers:
        for index, value in enumerate(consumer.inputs):
            if value is x:
                consumer.replace_input_with(index, out)


def _add_matmulnbits(
    model: ir.Model,
    weight: Weight,
    codes: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray | None,
    bits: int,
    block_size: int,
    accuracy_level: int,
) -> int:
    """Replace each MatMul reading ``weight`` by ONNX Runtime's MatMulNBits; returns the bytes
    of the new initializers."""
    graph = model.graph
    model.opset_imports.setdefault(MS_DOMAIN, 1)
    k, n = weight.shape
    packed, scales, zeros = quant.to_matmulnbits(codes, scale, zero_point, bits, block_size)
    inputs = [
        add_initializer(graph, f"{weight.name}_nbits", ir.tensor(packed)),
        add_initializer(graph, f"{weight.name}_scale", ir.tensor(scales)),
    ]
    if zeros is not None:
        inputs.append(add_initializer(graph, f"{weight.name}_zero_point", ir.tensor(zeros)))
    attributes = {"K": k, "N": n, "bits": bits, "block_size": block_size}
    if accuracy_level:
        attributes["accuracy_level"] = accuracy_level
    for use in weight.uses:
        node = use.node
        name = node.name or f"{weight.name}_matmul"
        new = ir.node(
            "MatMulNBits", [node.inputs[0], *inputs], attributes, domain=MS_DOMAIN,
            name=f"{name}_nbits",
        )  # fmt: skip
        _replace_node(graph, node, new)
    return sum(v.const_value.nbytes for v in inputs)  # type: ignore[union-attr]


def _add_gather_block_quantized(
    model: ir.Model,
    weight: Weight,
    codes: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray | None,
    bits: int,
    block_size: int,
) -> int:
    """Replace each Gather of the table ``weight`` (rows quantised in blocks along axis 1) by
    ONNX Runtime's GatherBlockQuantized, which dequantises only the rows it gathers (a
    DequantizeLinear in front of Gather dequantises the whole table every run). The codes,
    scales and zero points are the QDQ form's tensors. Returns the new initializers' bytes."""
    graph = model.graph
    model.opset_imports.setdefault(MS_DOMAIN, 1)
    inputs = [
        add_initializer(graph, f"{weight.name}_quantized", integer_tensor(codes, bits, "")),
        add_initializer(graph, f"{weight.name}_scale", ir.tensor(scale)),
    ]
    if zero_point is not None:
        zeros = integer_tensor(zero_point, bits, "")
        inputs.append(add_initializer(graph, f"{weight.name}_zero_point", zeros))
    attributes = {"gather_axis": 0, "quantize_axis": 1, "block_size": block_size, "bits": bits}
    for use in weight.uses:
        node = use.node
        name = node.name or f"{weight.name}_gather"
        new = ir.node(
            "GatherBlockQuantized", [inputs[0], node.inputs[1], *inputs[1:]], attributes,
            domain=MS_DOMAIN, name=f"{name}_quantized",
        )  # fmt: skip
        _replace_node(graph, node, new)
    return sum(v.const_value.nbytes for v in inputs)  # type: ignore[union-attr]


def _replace_node(graph: ir.Graph, node: ir.Node, new: ir.Node) -> None:
    """Put ``new`` (one output) where ``node`` was, under the same output name."""
    old, out = node.outputs[0], new.outputs[0]
    out.dtype, out.shape, out.type = old.dtype, old.shape, old.type
    graph.insert_after(node, new)
    old.replace_all_uses_with(out, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    out.name = old.name


def _input_axis(node: ir.Node, rank: int) -> int | None:
    """The weight's reduction (input) axis as ``node`` reads it: where blocks run."""
    if node.op_type == "Conv":
        return 1 if rank >= 2 else None
    if node.op_type == "ConvTranspose":
        return 0
    if node.op_type == "Gemm":
        return 1 if node.attributes.get_int("transB", 0) else 0
    if node.op_type == "MatMul":
        return rank - 2 if rank >= 2 else 0
    if node.op_type == "Gather":
        return 1 if node.attributes.get_int("axis", 0) == 0 and rank == 2 else None
    if node.op_type == "Slice":
        return rank - 1  # along each row, across the per-row scales of _weights
    return None
