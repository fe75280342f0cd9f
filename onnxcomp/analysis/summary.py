"""What a model holds: opset, signature, op histogram, parameters by dtype, sparsity, QDQ.

Used by ``onnxcomp inspect`` and by the pipeline's before/after ledger. It never changes the
model. Weights are initializers and tensors held in ``Constant`` nodes (some exporters put all
weights there); both count as parameters.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxcomp.io import release

QUANTIZED_DTYPES = {
    ir.DataType.INT8, ir.DataType.UINT8, ir.DataType.INT4, ir.DataType.UINT4,
    ir.DataType.INT2, ir.DataType.UINT2, ir.DataType.FLOAT8E4M3FN, ir.DataType.FLOAT8E5M2,
}  # fmt: skip
QDQ_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}


@dataclasses.dataclass
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    size: int
    nbytes: int
    zeros: int | None  # exact zeros, for float weights of rank >= 2; None otherwise
    external: str | None = None
    in_constant_node: bool = False


@dataclasses.dataclass
class ModelSummary:
    """A snapshot of a model's size and structure."""

    opsets: dict[str, int]
    ir_version: int
    inputs: list[tuple[str, str, str]]  # name, dtype, shape
    outputs: list[tuple[str, str, str]]
    op_counts: Counter
    tensors: list[TensorInfo]
    quantized_weights: int  # low-bit tensors feeding DequantizeLinear
    subgraphs: int

    @property
    def nodes(self) -> int:
        return sum(self.op_counts.values())

    @property
    def params(self) -> int:
        return sum(t.size for t in self.tensors)

    @property
    def weight_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def qdq_nodes(self) -> int:
        return sum(n for op, n in self.op_counts.items() if op in QDQ_OPS)

    def bytes_by_dtype(self) -> dict[str, tuple[int, int]]:
        """dtype -> (parameters, bytes)."""
        table: dict[str, list[int]] = {}
        for t in self.tensors:
            row = table.setdefault(t.dtype, [0, 0])
            row[0] += t.size
            row[1] += t.nbytes
        return {k: (v[0], v[1]) for k, v in sorted(table.items(), key=lambda kv: -kv[1][1])}

    def sparsity(self) -> float:
        """Share of exact zeros over float weights of rank >= 2."""
        counted = [t for t in self.tensors if t.zeros is not None]
        total = sum(t.size for t in counted)
        return sum(t.zeros for t in counted) / total if total else 0.0

    def external_files(self) -> dict[str, int]:
        files: dict[str, int] = {}
        for t in self.tensors:
            if t.external:
                files[t.external] = files.get(t.external, 0) + t.nbytes
        return files


def summarize(model: ir.Model, *, count_zeros: bool = True) -> ModelSummary:
    """Summarise ``model``; ``count_zeros=False`` skips reading weight values (fast path)."""
    op_counts: Counter = Counter()
    tensors: list[TensorInfo] = []
    quantized = 0
    graphs = list(model.graphs())
    for graph in graphs:
        for value in graph.initializers.values():
            if value.const_value is not None:
                tensors.append(_tensor_info(value.name or "", value.const_value, count_zeros))
        for node in graph:
            op_counts[node.op_type] += 1
            if node.op_type == "Constant":
                attr = node.attributes.get("value")
                if attr is not None and attr.type == ir.AttributeType.TENSOR:
                    info = _tensor_info(node.outputs[0].name or "", attr.as_tensor(), count_zeros)
                    info.in_constant_node = True
                    tensors.append(info)
            if node.op_type == "DequantizeLinear" and node.inputs[0] is not None:
                source = node.inputs[0]
                if source.const_value is not None and source.const_value.dtype in QUANTIZED_DTYPES:
                    quantized += 1
    return ModelSummary(
        opsets=dict(model.opset_imports),
        ir_version=model.ir_version,
        inputs=[_signature(v) for v in model.graph.inputs if not v.is_initializer()],
        outputs=[_signature(v) for v in model.graph.outputs],
        op_counts=op_counts,
        tensors=tensors,
        quantized_weights=quantized,
        subgraphs=len(graphs) - 1,
    )


def _tensor_info(name: str, tensor: ir.TensorProtocol, count_zeros: bool) -> TensorInfo:
    shape = tuple(int(d) for d in tensor.shape)  # initializer shapes are static
    size = int(np.prod(shape)) if shape else 1
    zeros = None
    if count_zeros and len(shape) >= 2 and tensor.dtype.is_floating_point():
        zeros = int(size - np.count_nonzero(tensor.numpy()))
        release(tensor)  # one weight of a big model resident at a time, not all
    external = Path(tensor.path).name if isinstance(tensor, ir.ExternalTensor) else None
    return TensorInfo(name, tensor.dtype.name.lower(), shape, size, tensor.nbytes, zeros, external)


def _signature(value: ir.Value) -> tuple[str, str, str]:
    dtype = value.dtype.name.lower() if value.dtype is not None else "?"
    if value.shape is None:
        shape = "?"
    else:
        shape = "[" + ", ".join(str(d) if d is not None else "?" for d in value.shape) + "]"
    return value.name or "", dtype, shape
