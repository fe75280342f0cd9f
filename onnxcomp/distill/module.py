"""An onnx_ir model as a trainable ``torch.nn.Module``, and trained weights written back by name.

:class:`OnnxModule` interprets the graph node by node with the op table of
:mod:`onnxcomp.distill.ops`; it matches ONNX Runtime to float rounding (the demo models agree
to < 1e-4, cosine 1.0) on any batch size and sequence length the model accepts. What it
promises:

- **One trainable tensor per weight, keyed by its ONNX name.** Float initializers and
  ``Constant`` nodes of rank >= 1 read as weights (Conv/ConvTranspose/Gemm/MatMul operands,
  Gather and Slice tables, Conv/Gemm biases, Batch/Layer/InstanceNormalization scales and
  biases, PRelu slopes, and vector-shaped Add/Sub/Mul operands: biases, layer scales) become
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

BatchNormalization always uses its running statistics (inference semantics), in training too.
An op without a torch implementation makes construction fail with :class:`UnsupportedOpError`,
which lists every missing op type at once.
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
from onnxcomp.distill.ops import OPS, OpFn, expand_param
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
    "PRelu": (1,),
}
VECTOR_OPS = frozenset({"Add", "Sub", "Mul"})  # a vector-shaped operand is a bias or a scale
TABLE_OPS = frozenset({"Slice"})  # a rank >= 2 table sliced by position (position embeddings)
# Outputs beyond the first that the op table does not compute.
_EXTRA_OUTPUTS = frozenset(
    {"MaxPool", "BatchNormalization", "LayerNormalization", "QuantizeLinear", "DequantizeLinear"}
)


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
        self._steps = _steps(nodes, names, self.opset, keep=set(self.output_names))

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
        return frozenset({*produced, *self.input_names, *self.output_names})

    def _run(self, env: dict[str, torch.Tensor], keep: frozenset[str]) -> dict[str, torch.Tensor]:
        for name, key in self._buffer_values:
            env.setdefault(name, getattr(self.constants, key))
        for name, key in self._param_values:
            env[name] = self.effective_weight(key)
        for step in self._steps:
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
            env[name] = torch.as_tensor(value)
        for name, value in kwargs.items():
            if name not in self.input_names and name not in self._optional_inputs:
                raise TypeError(f"unknown input '{name}' (inputs: {', '.join(self.input_names)})")
            if name in env:
                raise TypeError(f"input '{name}' given twice")
            env[name] = torch.as_tensor(value)
        missing = [n for n in self.input_names if n not in env]
        if missing:
            raise TypeError(f"missing inputs: {', '.join(missing)}")
        return env


# -- tensors --------------------------------------------------------------------------------------


def to_torch(tensor: ir.TensorProtocol) -> torch.Tensor:
    """A torch copy of an ONNX tensor; 4- and 2-bit integers come unpacked in 8 bits."""
    array = np.asarray(tensor.numpy())
    dtype = tensor.dtype
    if dtype == ir.DataType.BFLOAT16:
        return torch.from_numpy(array.view(np.uint16).copy()).view(torch.bfloat16)
    if dtype in (ir.DataType.INT4, ir.DataType.INT2):
        array = array.astype(np.int8)
    elif dtype in (ir.DataType.UINT4, ir.DataType.UINT2):
        array = array.astype(np.uint8)
    elif dtype.is_floating_point() and dtype not in (
        ir.DataType.FLOAT,
        ir.DataType.FLOAT16,
        ir.DataType.DOUBLE,
    ):
        raise UnsupportedModelError(f"tensor '{tensor.name}': {dtype.name} has no torch dtype")
    elif dtype == ir.DataType.STRING:
        raise UnsupportedModelError(f"tensor '{tensor.name}': string tensors are not supported")
    return torch.from_numpy(np.array(array, copy=True))


def _to_numpy(t: torch.Tensor, dtype: ir.DataType) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        return t.float().numpy().astype(ml_dtypes.bfloat16)
    return t.numpy().astype(dtype.numpy())


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
    missing: Counter = Counter()
    features: list[str] = []
    for node in graph:
        op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
        if op == "Constant":
            if not any(k in node.attributes for k in _CONSTANT_ATTRS):
                features.append(f"Constant '{node.name}': only dense tensor and number values")
            continue
        if op not in OPS:
            missing[op] += 1
            continue
        if op in _EXTRA_OUTPUTS and any(_used(v) for v in node.outputs[1:]):
            features.append(f"{op} '{node.name}': only its first output is computed")
        if op == "BatchNormalization" and node.attributes.get_int("training_mode", 0):
            features.append(f"BatchNormalization '{node.name}': training_mode=1")
        if op == "AveragePool" and any(d != 1 for d in node.attributes.get_ints("dilations", ())):
            features.append(f"AveragePool '{node.name}': dilations")
    if missing or features:
        raise UnsupportedOpError(missing, features)


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


def _steps(nodes: Sequence[ir.Node], names: _ValueNames, opset: int, keep: set[str]) -> list[_Step]:
    last_use: dict[str, int] = {}
    for index, node in enumerate(nodes):
        for value in node.inputs:
            if value is not None:
                last_use[names[value]] = index
    release: dict[int, list[str]] = defaultdict(list)
    for name, index in last_use.items():
        if name not in keep:
            release[index].append(name)
    steps = []
    for index, node in enumerate(nodes):
        attrs = {name: _attr_value(attr) for name, attr in node.attributes.items()}
        attrs["_opset"] = opset
        attrs["_outputs"] = len(node.outputs)
        if node.op_type == "QuantizeLinear":
            attrs["_qrange"] = _quantize_range(node)
        steps.append(
            _Step(
                node.name or f"{node.op_type}_{index}",
                node.op_type,
                OPS[node.op_type],
                tuple(names[v] if v is not None else None for v in node.inputs),
                tuple(names[v] if _used(v) else None for v in node.outputs),
                attrs,
                tuple(release[index]),
            )
        )
    return steps


def _attr_value(attr: ir.Attr) -> Any:
    if attr.type == ir.AttributeType.TENSOR:
        return to_torch(attr.as_tensor())
    value = attr.value
    return list(value) if isinstance(value, tuple) else value


def _quantize_range(node: ir.Node) -> tuple[int, int]:
    """QuantizeLinear's code range: the zero point's dtype, else ``output_dtype``, else UINT8."""
    dtype = ir.DataType.UINT8
    if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].dtype is not None:
        dtype = node.inputs[2].dtype
    elif node.attributes.get_int("output_dtype", 0):
        dtype = ir.DataType(node.attributes.get_int("output_dtype", 0))
    return int(dtype.min), int(dtype.max)
