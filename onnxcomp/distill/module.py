"""An onnx_ir model as a trainable ``torch.nn.Module``, and trained weights written back by name.

:class:`OnnxModule` interprets the graph node by node with the op table of
:mod:`onnxcomp.distill.ops`; it matches ONNX Runtime to float rounding (the demo models agree
to < 1e-4, cosine 1.0) on any batch size and sequence length the model accepts. What it
promises:

- **One trainable tensor per weight, keyed by its ONNX name.** Float initializers and
  ``Constant`` nodes of rank >= 1 read as weights (Conv/ConvTranspose/Gemm/MatMul operands,
  Gather and Slice tables, Conv/Gemm/DeformConv biases, the scales and biases of the
  Batch/Layer/Instance/Group/RMS normalisations, PRelu slopes, LSTM/GRU/RNN weights, biases
  and peepholes, and vector-shaped Add/Sub/Mul operands: biases, layer scales) become
  ``nn.Parameter`` s in :attr:`OnnxModule.weights`; everything else (running statistics, shape
  constants, integer tensors, scalars) is a buffer. :attr:`OnnxModule.onnx_names` maps each
  parameter key back to its ONNX name.
- **Quantised weights train on their grid.** ``DequantizeLinear`` of a constant integer
  tensor becomes a float parameter (keyed by the integer tensor's name) that the forward pass
  fake-quantises with a straight-through estimator (:mod:`onnxcomp.distill.fake_quant`).
- **Pruned weights stay pruned.** With ``keep_sparsity`` (the default) a fixed 0/1 mask
  multiplies every float weight that has exact zeros, so no gradient revives them; quantised
  weights are masked when at least :data:`PRUNED_SHARE` of their codes are zero (below that
  the zeros are rounding, not pruning); INT2 (ternary, binary) weights are never masked.
  Shapes, structured pruning's included, are the graph's.
- **Write-back keeps the graph.** :meth:`OnnxModule.write_back` assigns new tensors to the same
  initializers (integer codes re-quantised on the same grid for quantised weights); no node,
  name or shape changes, so the pipeline checks the result like any pass's.

BatchNormalization uses its running statistics (inference semantics), in training too, unless
the node sets ``training_mode``. Control-flow bodies (If, Loop, Scan) are compiled into
sub-modules; their own constants are buffers, the main graph's weights they read train. An op
without a torch implementation (random, sequence, optional and string ops), or a value torch
has no type for, makes construction fail with :class:`UnsupportedOpError`, which lists every
missing op type and feature at once.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import heapq
import re
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import ml_dtypes
import numpy as np
import onnx_ir as ir
import torch
from torch import nn

from onnxcomp import quant
from onnxcomp.distill.fake_quant import QuantGrid
from onnxcomp.distill.ops import OPS, TORCH_DTYPES, OpFn, expand_param
from onnxcomp.distill.ops._common import NARROW_RANGES
from onnxcomp.errors import UnsupportedModelError

# Quantised weights with at least this share of zero codes count as pruned (masked).
PRUNED_SHARE = 0.3
# op type -> input slots whose constant is a trainable weight
PARAM_INPUTS: dict[str, tuple[int, ...]] = {
    "Conv": (1, 2),
    "ConvTranspose": (1, 2),
    "Gemm": (0, 1, 2),
    "MatMul": (0, 1),
    "Gather": (0,),
    "BatchNormalization": (1, 2),
    "LayerNormalization": (1, 2),
    "InstanceNormalization": (1, 2),
    "GroupNormalization": (1, 2),
    "RMSNormalization": (1,),
    "PRelu": (1,),
    "LSTM": (1, 2, 3, 7),
    "GRU": (1, 2, 3),
    "RNN": (1, 2, 3),
    "DeformConv": (1, 3),
}
VECTOR_OPS = frozenset({"Add", "Sub", "Mul"})  # a vector-shaped operand is a bias or a scale
TABLE_OPS = frozenset({"Slice"})  # a rank >= 2 table sliced by position (position embeddings)
# Graph attributes of the control-flow ops: bodies the module compiles as sub-modules.
_BODY_ATTRS = frozenset({"then_branch", "else_branch", "body"})


class UnsupportedOpError(UnsupportedModelError):
    """The graph has ops (or op features) the interpreter has no torch implementation for."""

    def __init__(self, missing: Mapping[str, int], features: Sequence[str] = ()) -> None:
        parts = []
        if missing:
            listed = ", ".join(f"{op} ({count})" for op, count in sorted(missing.items()))
            parts.append(f"no torch implementation for {len(missing)} op types: {listed}")
        parts.extend(features)
        super().__init__(
            "cannot build a torch module from this model: "
            + "; ".join(parts)
            + f" (supported: {len(OPS)} default-domain ops, see onnxcomp.distill.SUPPORTED_OPS)"
        )
        self.missing = dict(missing)
        self.features = list(features)


@dataclasses.dataclass(frozen=True)
class _Step:
    node_name: str
    op_type: str
    fn: OpFn
    inputs: tuple[str | None, ...]
    outputs: tuple[str | None, ...]
    attrs: Mapping[str, Any]
    release: tuple[str, ...]  # values no later step reads


@dataclasses.dataclass(frozen=True)
class _Constant:
    name: str
    value: ir.Value
    tensor: ir.TensorProtocol
    node: ir.Node | None  # the Constant node holding it; None for an initializer


@dataclasses.dataclass(frozen=True)
class _QuantizedWeight:
    codes: _Constant
    scale: _Constant
    zero_point: _Constant | None
    output: ir.Value  # DequantizeLinear's output: the float weight


class OnnxModule(nn.Module):
    """A ``torch.nn.Module`` that computes what an onnx_ir model computes, with its weights as
    parameters.

    ``forward`` takes the graph inputs positionally (graph order) or by name and returns a
    tuple in graph-output order. ``frozen`` holds fnmatch patterns of ONNX names kept as
    buffers (not trained; quantised ones keep their DequantizeLinear); ``fake_quant=False``
    freezes every quantised weight that way.
    """

    def __init__(
        self,
        model: ir.Model,
        *,
        keep_sparsity: bool = True,
        fake_quant: bool = True,
        frozen: Sequence[str] = (),
    ) -> None:
        super().__init__()
        graph = model.graph
        self.opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
        _check_supported(graph)
        names = _ValueNames()
        constants = _constants(graph, names)
        quantized = {} if not fake_quant else _quantized_weights(graph, constants, frozen)

        self.weights = nn.ParameterDict()
        self.constants = nn.Module()  # buffers: non-trainable constants
        self.masks = nn.Module()  # buffers: 0/1 masks of pruned weights
        self.quant_params = nn.Module()  # buffers: scales and zero points of quantised weights
        self.onnx_names: dict[str, str] = {}
        self.quant_grids: dict[str, QuantGrid] = {}
        self._keys: set[str] = set()
        self._param_values: list[tuple[str, str]] = []  # (value name, parameter key)
        self._buffer_values: list[tuple[str, str]] = []  # (value name, buffer key)
        self._qdq_names: dict[str, tuple[str, str | None]] = {}  # key -> scale, zero point names
        self.bodies = nn.ModuleList()  # control-flow bodies, compiled as sub-modules

        skipped_nodes: set[ir.Node] = set()
        for node, weight in quantized.items():
            key = self._add_quantized(weight, keep_sparsity)
            self._param_values.append((names[weight.output], key))
            skipped_nodes.add(node)
        quantized_codes = {w.codes.name for w in quantized.values()}
        for name, constant in constants.items():
            if name in quantized_codes:
                continue
            array = to_torch(constant.tensor)
            if _is_trainable(constant.value, constant.tensor) and not _matches(frozen, name):
                key = self._key(name)
                self.weights[key] = nn.Parameter(array)
                self.onnx_names[key] = name
                if keep_sparsity and array.is_floating_point() and bool((array == 0).any()):
                    self.masks.register_buffer(key, (array != 0).to(array.dtype))
                self._param_values.append((name, key))
            else:
                key = self._key(name)
                self.constants.register_buffer(key, array)
                self._buffer_values.append((name, key))

        self.input_names = [names[v] for v in graph.inputs if not v.is_initializer()]
        self._optional_inputs = [names[v] for v in graph.inputs if v.is_initializer()]
        self.output_names = [names[v] for v in graph.outputs]
        nodes = [
            n for n in _topological(graph) if n.op_type != "Constant" and n not in skipped_nodes
        ]
        self._steps = _steps(nodes, names, self.opset, set(self.output_names), self.bodies)

    # -- forward ---------------------------------------------------------------------------

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Run the graph: inputs in graph order or by name; outputs in graph-output order."""
        env = self._run(self._bind(args, kwargs), frozenset())
        return tuple(env[name] for name in self.output_names)

    def values(
        self, names: Sequence[str], *args: torch.Tensor, **kwargs: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Run the graph and return the values ``names`` (intermediate values, graph inputs or
        outputs) by ONNX name; a name the graph does not compute is a KeyError."""
        keep = frozenset(names)
        unknown = keep - self.value_names()
        if unknown:
            raise KeyError(f"the graph computes no value named {', '.join(sorted(unknown))}")
        env = self._run(self._bind(args, kwargs), keep)
        return {name: env[name] for name in names}

    def value_names(self) -> frozenset[str]:
        """Names of the values :meth:`values` can return."""
        produced = {name for step in self._steps for name in step.outputs if name is not None}
        produced |= {name for name, _ in self._param_values}
        return frozenset({*produced, *self.input_names, *self.output_names})

    def _run(self, env: dict[str, torch.Tensor], keep: frozenset[str]) -> dict[str, torch.Tensor]:
        for name, key in self._buffer_values:
            env.setdefault(name, getattr(self.constants, key))
        for name, key in self._param_values:
            env[name] = self.effective_weight(key)
        return _execute(self._steps, env, keep)

    def effective_weight(self, key: str) -> torch.Tensor:
        """The value parameter ``key`` has in the forward pass: masked, then fake-quantised."""
        weight = self.weights[key]
        mask = getattr(self.masks, key, None)
        if mask is not None:
            weight = weight * mask
        grid = self.quant_grids.get(key)
        if grid is not None:
            scale = getattr(self.quant_params, f"{key}_scale")
            zero_point = getattr(self.quant_params, f"{key}_zero_point", None)
            weight = grid.fake_quantize(weight, scale, zero_point)
        return weight

    def named_onnx_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(ONNX name, parameter) for every trainable tensor."""
        for key, name in self.onnx_names.items():
            yield name, self.weights[key]

    def parameter(self, onnx_name: str) -> nn.Parameter:
        """The parameter that holds the ONNX tensor ``onnx_name``."""
        for key, name in self.onnx_names.items():
            if name == onnx_name:
                return self.weights[key]
        raise KeyError(f"no trainable tensor named '{onnx_name}'")

    # -- write-back -------------------------------------------------------------------------

    @torch.no_grad()
    def write_back(self, model: ir.Model, *, refit_scales: bool = False) -> list[str]:
        """Assign the trained weights to ``model``'s tensors of the same names; returns them.

        ``model`` is the model this module was built from or a copy of it. Quantised weights
        get new integer codes on the same grid and keep their scales, unless
        ``refit_scales`` fits new ones to the trained weights (and this module adopts them).
        Masked weights are written masked. Nothing but tensor contents changes.
        """
        sources = _constants(model.graph, _ValueNames())
        written = []
        for key, name in self.onnx_names.items():
            if name not in sources:
                raise UnsupportedModelError(
                    f"cannot write back '{name}': the model has no constant of that name; "
                    "write back into the model the module was built from"
                )
            source = sources[name]
            weight = self.weights[key]
            mask = getattr(self.masks, key, None)
            trained = (weight * mask if mask is not None else weight).detach().cpu()
            grid = self.quant_grids.get(key)
            if grid is None:
                tensor = ir.tensor(_to_numpy(trained, source.tensor.dtype), name=name)
            else:
                tensor = self._requantize(key, trained, grid, sources, refit_scales)
            if tuple(tensor.shape) != tuple(source.tensor.shape):
                raise UnsupportedModelError(
                    f"cannot write back '{name}': shape {list(tensor.shape)} != "
                    f"{list(source.tensor.shape)} in the model"
                )
            _assign(source, tensor)
            written.append(name)
        return written

    def _requantize(
        self,
        key: str,
        trained: torch.Tensor,
        grid: QuantGrid,
        sources: Mapping[str, _Constant],
        refit: bool,
    ) -> ir.TensorProtocol:
        """Codes of ``trained`` on the grid; the module's scale (and zero point) go to the model
        too, so codes and scales always agree."""
        scale_name, zp_name = self._qdq_names[key]
        scale = getattr(self.quant_params, f"{key}_scale")
        zero_point = getattr(self.quant_params, f"{key}_zero_point", None)
        array = trained.float().numpy()
        if refit:
            new_scale, new_zp = grid.refit(array, sources[scale_name].tensor.dtype.numpy())
            scale.copy_(torch.from_numpy(new_scale.astype(np.float32)).reshape(scale.shape))
            if zero_point is not None and new_zp is not None:
                zero_point.copy_(torch.from_numpy(new_zp).reshape(zero_point.shape))
        _write_if_changed(sources[scale_name], scale)
        if zero_point is not None and zp_name is not None:
            _write_if_changed(sources[zp_name], zero_point)
        zp_array = None if zero_point is None else zero_point.cpu().numpy().astype(np.int32)
        codes = grid.codes(array, scale.float().cpu().numpy(), zp_array)
        return grid.tensor(codes, self.onnx_names[key])

    # -- construction helpers -------------------------------------------------------------------

    def _key(self, name: str) -> str:
        base = re.sub(r"\W", "_", name) or "value"
        if base[0].isdigit():
            base = "_" + base
        key, index = base, 1
        while key in self._keys:
            key, index = f"{base}_{index}", index + 1
        self._keys.add(key)
        return key

    def _add_quantized(self, weight: _QuantizedWeight, keep_sparsity: bool) -> str:
        codes = np.asarray(weight.codes.tensor.numpy()).astype(np.int32)
        scale = weight.scale.tensor
        zero_point = weight.zero_point.tensor if weight.zero_point is not None else None
        node = weight.output.producer()
        assert node is not None
        grid = QuantGrid.infer(
            codes,
            weight.codes.tensor.dtype,
            tuple(int(d) for d in scale.shape),
            node.attributes.get_int("axis", 1),
            node.attributes.get_int("block_size", 0),
            zero_point is not None,
        )
        key = self._key(weight.codes.name)
        scale_t = to_torch(scale)
        zp_array = None if zero_point is None else np.asarray(zero_point.numpy()).astype(np.int32)
        centred = codes if zp_array is None else codes - _expand(zp_array, codes.shape, grid)
        dequantized = torch.from_numpy(centred.astype(np.float32)) * _expand_t(
            scale_t.float(), codes.shape, grid
        )
        self.weights[key] = nn.Parameter(dequantized.to(scale_t.dtype))
        self.onnx_names[key] = weight.codes.name
        self.quant_grids[key] = grid
        self.quant_params.register_buffer(f"{key}_scale", scale_t)
        if zero_point is not None:
            self.quant_params.register_buffer(f"{key}_zero_point", to_torch(zero_point))
        self._qdq_names[key] = (
            weight.scale.name,
            weight.zero_point.name if weight.zero_point is not None else None,
        )
        zeros = float(np.mean(centred == 0)) if centred.size else 0.0
        if keep_sparsity and not grid.binary and grid.bits > 2 and zeros >= PRUNED_SHARE:
            self.masks.register_buffer(key, torch.from_numpy(centred != 0).to(scale_t.dtype))
        return key

    def _bind(
        self, args: Sequence[torch.Tensor], kwargs: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        if len(args) > len(self.input_names):
            raise TypeError(f"expected at most {len(self.input_names)} inputs, got {len(args)}")
        env: dict[str, torch.Tensor] = {}
        for name, value in zip(self.input_names, args, strict=False):
            env[name] = as_torch(value)
        for name, value in kwargs.items():
            if name not in self.input_names and name not in self._optional_inputs:
                raise TypeError(f"unknown input '{name}' (inputs: {', '.join(self.input_names)})")
            if name in env:
                raise TypeError(f"input '{name}' given twice")
            env[name] = as_torch(value)
        missing = [n for n in self.input_names if n not in env]
        if missing:
            raise TypeError(f"missing inputs: {', '.join(missing)}")
        return env


class _Body(nn.Module):
    """A control-flow body (a subgraph) compiled like the main graph. Its own constants are
    buffers (not trained); the main graph's weights it reads arrive as captured values, so
    those train. ``captured`` names the outer values it reads."""

    def __init__(self, graph: ir.Graph, names: _ValueNames, opset: int) -> None:
        super().__init__()
        self.constants = nn.Module()
        self.bodies = nn.ModuleList()
        self._buffer_values: list[tuple[str, str]] = []
        for index, (name, constant) in enumerate(_constants(graph, names).items()):
            self.constants.register_buffer(f"c{index}", to_torch(constant.tensor))
            self._buffer_values.append((name, f"c{index}"))
        self.input_names = [names[v] for v in graph.inputs]
        self.output_names = [names[v] for v in graph.outputs]
        nodes = [n for n in _topological(graph) if n.op_type != "Constant"]
        self._steps = _steps(nodes, names, opset, set(self.output_names), self.bodies)
        known = {*self.input_names, *(name for name, _ in self._buffer_values)}
        captured: dict[str, None] = {}
        for step in self._steps:
            for name in step.inputs:
                if name is not None and name not in known:
                    captured[name] = None
            known.update(n for n in step.outputs if n is not None)
        for name in self.output_names:
            if name not in known:
                captured[name] = None
        self.captured = list(captured)

    def run(
        self, values: Sequence[torch.Tensor | None], captured: Mapping[str, torch.Tensor]
    ) -> list[torch.Tensor]:
        env = dict(captured)
        for name, key in self._buffer_values:
            env[name] = getattr(self.constants, key)
        for name, value in zip(self.input_names, values, strict=False):
            if value is not None:
                env[name] = value
        env = _execute(self._steps, env, frozenset(self.output_names))
        return [env[name] for name in self.output_names]


def _execute(
    steps: Sequence[_Step], env: dict[str, torch.Tensor], keep: frozenset[str]
) -> dict[str, torch.Tensor]:
    """Run ``steps`` over ``env`` (values by name), dropping values no later step reads."""
    for step in steps:
        inputs = [env[n] if n is not None else None for n in step.inputs]
        try:
            outputs = step.fn(inputs, step.attrs)
        except Exception as e:
            raise RuntimeError(f"{step.op_type} node '{step.node_name}': {e}") from e
        if not isinstance(outputs, tuple):
            outputs = (outputs,)
        for name, output in zip(step.outputs, outputs, strict=False):
            if name is not None:
                env[name] = output
        for name in step.release:
            if name not in keep:
                env.pop(name, None)
    return env


# -- tensors --------------------------------------------------------------------------------------


def to_torch(tensor: ir.TensorProtocol) -> torch.Tensor:
    """A torch copy of an ONNX tensor; 4- and 2-bit integers come unpacked in 8 bits."""
    array = np.asarray(tensor.numpy())
    dtype = tensor.dtype
    if dtype.value not in TORCH_DTYPES and dtype not in (ir.DataType.BOOL,):
        raise UnsupportedModelError(f"tensor '{tensor.name}': {dtype.name} has no torch dtype")
    return as_torch(array, TORCH_DTYPES.get(dtype.value))


_ML_DTYPES = {
    np.dtype(ml_dtypes.bfloat16): torch.bfloat16,
    np.dtype(ml_dtypes.float8_e4m3fn): torch.float8_e4m3fn,
    np.dtype(ml_dtypes.float8_e4m3fnuz): torch.float8_e4m3fnuz,
    np.dtype(ml_dtypes.float8_e5m2): torch.float8_e5m2,
    np.dtype(ml_dtypes.float8_e5m2fnuz): torch.float8_e5m2fnuz,
}
_NARROW_NUMPY = {
    np.dtype(ml_dtypes.int4): np.int8,
    np.dtype(ml_dtypes.int2): np.int8,
    np.dtype(ml_dtypes.uint4): np.uint8,
    np.dtype(ml_dtypes.uint2): np.uint8,
}


def as_torch(value: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A tensor from a torch tensor, a numpy array (ml_dtypes' bfloat16 and float8 included,
    4- and 2-bit integers unpacked in 8 bits) or a number; arrays are copied."""
    if isinstance(value, torch.Tensor):
        return value
    if not isinstance(value, np.ndarray):
        return torch.as_tensor(value)
    if value.dtype in _ML_DTYPES:
        bits = value.view(np.uint16 if value.dtype.itemsize == 2 else np.uint8)
        return torch.from_numpy(np.array(bits, copy=True)).view(_ML_DTYPES[value.dtype])
    if value.dtype in _NARROW_NUMPY:
        value = value.astype(_NARROW_NUMPY[value.dtype])
    tensor = torch.from_numpy(np.array(value, copy=True))
    return tensor if dtype is None or tensor.dtype == dtype else tensor.to(dtype)


def _to_numpy(t: torch.Tensor, dtype: ir.DataType) -> np.ndarray:
    return to_numpy(t, dtype)


def to_numpy(t: torch.Tensor, dtype: ir.DataType | None = None) -> np.ndarray:
    """A numpy copy of ``t`` (of ONNX type ``dtype`` if given: bfloat16, float8 and sub-byte
    integers come back as ml_dtypes arrays)."""
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16 or t.dtype in _TORCH_TO_ML:
        array = t.view(torch.uint16 if t.dtype == torch.bfloat16 else torch.uint8).numpy()
        array = array.view(_TORCH_TO_ML[t.dtype])
    else:
        array = t.numpy()
    return array if dtype is None else array.astype(dtype.numpy())


_TORCH_TO_ML = {torch_dtype: np_dtype for np_dtype, torch_dtype in _ML_DTYPES.items()}


def _expand(param: np.ndarray, shape: tuple[int, ...], grid: QuantGrid) -> np.ndarray:
    return quant.expand(param, shape, grid.axis, grid.block_size)


def _expand_t(param: torch.Tensor, shape: tuple[int, ...], grid: QuantGrid) -> torch.Tensor:
    return expand_param(param, shape, grid.axis, grid.block_size)


def _write_if_changed(constant: _Constant, buffer: torch.Tensor) -> None:
    array = _to_numpy(buffer.detach().cpu(), constant.tensor.dtype)
    if not np.array_equal(array, constant.tensor.numpy()):
        _assign(constant, ir.tensor(array, dtype=constant.tensor.dtype))


def _assign(constant: _Constant, tensor: ir.TensorProtocol) -> None:
    """Give a constant a new tensor (never writing into the old one: it may be a file view)."""
    tensor.name = constant.name
    if constant.node is None:
        constant.value.const_value = tensor
    else:
        for name in _CONSTANT_ATTRS:  # value_floats etc. give way to one tensor value
            constant.node.attributes.pop(name, None)
        constant.node.attributes["value"] = ir.AttrTensor("value", tensor)
        constant.value.const_value = tensor


# -- graph analysis -------------------------------------------------------------------------------


class _ValueNames:
    """A stable name for every value: its own, or a generated one for unnamed values."""

    def __init__(self) -> None:
        self._names: dict[int, str] = {}

    def __getitem__(self, value: ir.Value) -> str:
        if value.name:
            return value.name
        return self._names.setdefault(id(value), f"%unnamed{len(self._names)}")


def _check_supported(graph: ir.Graph) -> None:
    """Every op (in control-flow bodies too) has an implementation, and every value a type
    torch can hold; otherwise one error that lists everything missing."""
    missing: Counter = Counter()
    features: list[str] = []
    for value in [*graph.inputs, *graph.outputs]:
        problem = _type_problem(value)
        if problem:
            features.append(f"{'input' if value.is_graph_input() else 'output'} '{value.name}': "
                            f"{problem}")  # fmt: skip
    for node in ir.traversal.RecursiveGraphIterator(graph):
        op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
        if op == "Constant":
            if not any(k in node.attributes for k in _CONSTANT_ATTRS):
                features.append(f"Constant '{node.name}': only dense tensor and number values")
            continue
        if op not in OPS:
            missing[op] += 1
            continue
        features += _node_problems(op, node)
    if missing or features:
        raise UnsupportedOpError(missing, features)


def _type_problem(value: ir.Value) -> str:
    kind = value.type
    if isinstance(kind, (ir.SequenceType, ir.OptionalType)):
        return "sequence and optional values are not supported"
    dtype = value.dtype
    if dtype is not None and dtype.value not in (*TORCH_DTYPES, 0, ir.DataType.BOOL.value):
        return f"{dtype.name} has no torch dtype"
    return ""


def _node_problems(op: str, node: ir.Node) -> list[str]:
    where = f"{op} '{node.name}'"
    problems = []
    if op == "Dropout" and len(node.inputs) > 2 and node.inputs[2] is not None:
        mode = node.inputs[2].const_value
        if mode is None or bool(np.asarray(mode.numpy()).reshape(-1)[0]):
            problems.append(f"{where}: training_mode (random) is not supported")
    for name in ("to", "output_dtype", "dtype"):
        code = node.attributes.get_int(name, 0) if name in node.attributes else 0
        if code and code not in TORCH_DTYPES and code != ir.DataType.BOOL.value:
            problems.append(f"{where}: {name}={ir.DataType(code).name} has no torch dtype")
    for value in node.outputs:
        if _used(value) and isinstance(value.type, (ir.SequenceType, ir.OptionalType)):
            problems.append(f"{where}: sequence and optional values are not supported")
            break
    return problems


def _used(value: ir.Value | None) -> bool:
    return value is not None and (bool(value.uses()) or value.is_graph_output())


_CONSTANT_ATTRS = ("value", "value_float", "value_floats", "value_int", "value_ints")


def _constants(graph: ir.Graph, names: _ValueNames) -> dict[str, _Constant]:
    """Initializers and Constant-node outputs of the main graph, by value name."""
    found: dict[str, _Constant] = {}
    for value in graph.initializers.values():
        if value.const_value is not None:
            found[names[value]] = _Constant(names[value], value, value.const_value, None)
    for node in graph:
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
            continue
        tensor = _constant_node_tensor(node)
        if tensor is not None:
            value = node.outputs[0]
            found[names[value]] = _Constant(names[value], value, tensor, node)
    return found


def _constant_node_tensor(node: ir.Node) -> ir.TensorProtocol | None:
    attrs = node.attributes
    if "value" in attrs:
        return attrs["value"].as_tensor()
    if "value_float" in attrs:
        return ir.tensor(np.float32(attrs.get_float("value_float")))
    if "value_floats" in attrs:
        return ir.tensor(np.asarray(attrs.get_floats("value_floats"), np.float32))
    if "value_int" in attrs:
        return ir.tensor(np.int64(attrs.get_int("value_int")))
    if "value_ints" in attrs:
        return ir.tensor(np.asarray(attrs.get_ints("value_ints"), np.int64))
    return None


def _quantized_weights(
    graph: ir.Graph, constants: Mapping[str, _Constant], frozen: Sequence[str]
) -> dict[ir.Node, _QuantizedWeight]:
    """DequantizeLinear nodes of constant integer codes that only they read: fake-quant them."""
    found = {}
    by_value = {c.value: c for c in constants.values()}
    for node in graph:
        if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
            continue
        inputs = [*node.inputs, None, None][:3]
        codes, scale, zero_point = (by_value.get(v) if v is not None else None for v in inputs)
        if codes is None or scale is None or (inputs[2] is not None and zero_point is None):
            continue
        if not codes.tensor.dtype.is_integer() or not scale.tensor.dtype.is_floating_point():
            continue
        if codes.tensor.dtype.bitwidth > 8 or _matches(frozen, codes.name):
            continue
        if len(codes.value.uses()) != 1 or codes.value.is_graph_output():
            continue  # shared codes: keep the DequantizeLinear (frozen)
        found[node] = _QuantizedWeight(codes, scale, zero_point, node.outputs[0])
    return found


def _is_trainable(value: ir.Value, tensor: ir.TensorProtocol) -> bool:
    if not tensor.dtype.is_floating_point() or len(tensor.shape) == 0:
        return False
    if value.is_graph_input():
        return False  # a caller may feed it: a default, not a weight
    shape = tuple(int(d) for d in tensor.shape)
    for node, index in value.uses():
        if index in PARAM_INPUTS.get(node.op_type, ()):
            return True
        if node.op_type in TABLE_OPS and index == 0 and len(shape) >= 2:
            return True
        if node.op_type in VECTOR_OPS and _is_vector(shape):
            return bool(np.all(np.isfinite(tensor.numpy())))
    return False


def _is_vector(shape: tuple[int, ...]) -> bool:
    """One axis longer than 1 (a bias [C], [C,1,1] or [1,1,C]), the others 1."""
    return sum(d > 1 for d in shape) == 1


def _matches(patterns: Sequence[str], name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _topological(graph: ir.Graph) -> list[ir.Node]:
    """The graph's nodes in a topological order, as close to the stored order as possible."""
    nodes = list(graph)
    position = {node: i for i, node in enumerate(nodes)}
    waiting: dict[ir.Node, int] = {}
    users: dict[ir.Node, list[ir.Node]] = defaultdict(list)
    for node in nodes:
        producers = {v.producer() for v in node.inputs if v is not None} & position.keys()
        waiting[node] = len(producers)
        for producer in producers:
            users[producer].append(node)
    ready = [position[n] for n in nodes if waiting[n] == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        node = nodes[heapq.heappop(ready)]
        order.append(node)
        for user in users[node]:
            waiting[user] -= 1
            if waiting[user] == 0:
                heapq.heappush(ready, position[user])
    if len(order) != len(nodes):
        raise UnsupportedModelError("the graph has a cycle")
    return order


def _steps(
    nodes: Sequence[ir.Node], names: _ValueNames, opset: int, keep: set[str], bodies: nn.ModuleList
) -> list[_Step]:
    """One step per node, control-flow bodies compiled into ``bodies``; each step releases the
    values no later step reads."""
    prepared = []
    for node in nodes:
        attrs: dict[str, Any] = {}
        captured: dict[str, None] = {}
        for name, attr in node.attributes.items():
            if name in _BODY_ATTRS and attr.type == ir.AttributeType.GRAPH:
                body = _Body(attr.value, names, opset)
                bodies.append(body)
                attrs[name] = body
                captured.update(dict.fromkeys(body.captured))
            else:
                attrs[name] = _attr_value(attr)
        attrs["_opset"] = opset
        attrs["_outputs"] = len(node.outputs)
        attrs["_arity"] = len(node.inputs)
        attrs["_captured"] = list(captured)
        attrs.update(_prepared_attrs(node))
        inputs = tuple(names[v] if v is not None else None for v in node.inputs)
        prepared.append((node, inputs + tuple(captured), attrs))
    last_use: dict[str, int] = {}
    for index, (_, inputs, _) in enumerate(prepared):
        for name in inputs:
            if name is not None:
                last_use[name] = index
    release: dict[int, list[str]] = defaultdict(list)
    for name, index in last_use.items():
        if name not in keep:
            release[index].append(name)
    steps = []
    for index, (node, inputs, attrs) in enumerate(prepared):
        steps.append(
            _Step(
                node.name or f"{node.op_type}_{index}",
                node.op_type,
                OPS[node.op_type],
                inputs,
                tuple(names[v] if _used(v) else None for v in node.outputs),
                attrs,
                tuple(release[index]),
            )
        )
    return steps


def _prepared_attrs(node: ir.Node) -> dict[str, Any]:
    """What an op needs from the graph beyond its attributes: the code type and range of
    QuantizeLinear (and whether its codes must be integers: something other than
    DequantizeLinear reads them), CastLike's target when torch holds it in a wider type."""
    if node.op_type == "QuantizeLinear":
        qtype = _quantize_type(node)
        output = node.outputs[0]
        codes = output.is_graph_output() or any(
            user.op_type != "DequantizeLinear" for user, _ in output.uses()
        )
        return {"_qtype": qtype.value, "_qrange": (int(qtype.min), int(qtype.max)) if
                qtype.is_integer() else (0, 0), "_codes": codes}  # fmt: skip
    if node.op_type == "CastLike" and node.inputs[1] is not None:
        dtype = node.inputs[1].dtype
        if dtype is not None and dtype.value in NARROW_RANGES:
            return {"_to": dtype.value}
    return {}


def _attr_value(attr: ir.Attr) -> Any:
    if attr.type == ir.AttributeType.TENSOR:
        return to_torch(attr.as_tensor())
    value = attr.value
    return list(value) if isinstance(value, tuple) else value


def _quantize_type(node: ir.Node) -> ir.DataType:
    """QuantizeLinear's code type: the zero point's dtype, else ``output_dtype``, else UINT8."""
    if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].dtype is not None:
        return node.inputs[2].dtype
    if node.attributes.get_int("output_dtype", 0):
        return ir.DataType(node.attributes.get_int("output_dtype", 0))
    return ir.DataType.UINT8
