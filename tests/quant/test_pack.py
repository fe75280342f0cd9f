"""INT4 / INT2 packing, checked bit for bit against onnx's own packing and reference DQ."""

from __future__ import annotations

import importlib

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from onnxcomp import chunks, quant

# the module (onnxcomp.quant's ``pack`` is its function)
pack_module = importlib.import_module("onnxcomp.quant.pack")

ML_DTYPES = {4: ml_dtypes.int4, 2: ml_dtypes.int2}
ONNX_TYPES = {4: TensorProto.INT4, 2: TensorProto.INT2}


def _codes(bits: int, shape: tuple[int, ...]) -> np.ndarray:
    high = 2 ** (bits - 1)
    return np.random.default_rng(bits).integers(-high, high, shape).astype(np.int8)


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("count", [1, 3, 7, 64])  # odd counts leave a partly used last byte
def test_packing_matches_onnx_numpy_helper_bit_for_bit(bits, count):
    codes = _codes(bits, (count,))
    reference = numpy_helper.from_array(codes.astype(ML_DTYPES[bits])).raw_data
    packed = quant.pack(codes, bits)
    assert packed.tobytes() == reference
    assert len(packed) == -(-count * bits // 8)
    np.testing.assert_array_equal(quant.unpack(packed, bits, count), codes)


@pytest.mark.parametrize("bits", [4, 2])
def test_onnx_reads_packed_bytes_back_as_the_same_values(bits):
    codes = _codes(bits, (5, 3))
    packed = quant.pack(codes, bits).tobytes()
    proto = helper.make_tensor("q", ONNX_TYPES[bits], codes.shape, packed, raw=True)
    np.testing.assert_array_equal(numpy_helper.to_array(proto).astype(np.int8), codes)


def test_values_outside_the_range_are_refused():
    with pytest.raises(ValueError, match="range"):
        quant.pack(np.array([8]), 4)
    with pytest.raises(ValueError, match="range"):
        quant.pack(np.array([-3]), 2)
    with pytest.raises(ValueError, match="range"):
        quant.pack(np.array([256]), 4)  # 0 once cast to int8: checked before the cast


@pytest.mark.parametrize("bits", [4, 2])
def test_slices_on_threads_pack_and_check_every_code(bits, monkeypatch):
    # Words go to threads in slices (and pieces within): small ones here, so a few thousand
    # codes cross several of each, and the last byte is partly used.
    monkeypatch.setattr(chunks, "SLICE", 96)
    monkeypatch.setattr(pack_module, "PIECE_WORDS", 40)
    codes = _codes(bits, (4099,))
    reference = numpy_helper.from_array(codes.astype(ML_DTYPES[bits])).raw_data
    assert quant.pack(codes, bits).tobytes() == reference
    for where in (0, 1500, 4098):  # the first slice, a middle one, the tail
        bad = codes.copy()
        bad[where] = 2 ** (bits - 1)
        with pytest.raises(ValueError, match="range"):
            quant.pack(bad, bits)


@pytest.mark.parametrize(
    ("bits", "symmetric", "axis", "block"),
    [(4, True, 0, 16), (4, False, 1, 16), (2, True, 1, 0), (2, False, 0, 16), (8, False, 1, 16)],
)
def test_dequantize_matches_onnx_reference_dequantizelinear(bits, symmetric, axis, block):
    w = np.random.default_rng(1).standard_normal((40, 24)).astype(np.float32)
    scale, zero_point = quant.linear_params(
        w, bits, axis=axis, block_size=block, symmetric=symmetric
    )
    codes = quant.quantize(w, scale, zero_point, bits, axis=axis, block_size=block)

    def tensor(name: str, values: np.ndarray) -> TensorProto:
        if bits == 8:
            return numpy_helper.from_array(values.astype(np.int8), name)
        packed = quant.pack(values, bits).tobytes()
        return helper.make_tensor(name, ONNX_TYPES[bits], values.shape, packed, raw=True)

    inits = [tensor("q", codes), numpy_helper.from_array(scale, "s")]
    if zero_point is not None:
        inits.append(tensor("z", zero_point))
    attrs = {"axis": axis, **({"block_size": block} if block else {})}
    node = helper.make_node("DequantizeLinear", [i.name for i in inits], ["y"], **attrs)
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, w.shape)
    graph = helper.make_graph([node], "dq", [], [output], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 25)])
    onnx.checker.check_model(model, full_check=True)
    (reference,) = ReferenceEvaluator(model).run(None, {})
    ours = quant.dequantize(codes, scale, zero_point, axis=axis, block_size=block)
    np.testing.assert_array_equal(ours, reference)
