"""Weight-only int4/int8 on the shipped decoder (models/tiny_llm.onnx): gptq and awq from
calibration inputs, the qdq and matmulnbits formats, and the KV cache after quantisation.

Models run in plain ONNX Runtime at the basic level (no DequantizeLinear+MatMul fusion).
Tolerances, stated per test: AWQ's rescaling alone moves logits by < 1e-4 of their range
(float rounding); qdq and matmulnbits hold the same codes, so their logits agree to 2e-3 of
the range (the kernels accumulate in different orders); a cached step and the full sequence
agree to 1e-3 of the range.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import onnxcomp
import onnxcomp.cli
from onnxcomp import decoder, runtime
from onnxcomp.data import Dataset, load_data
from onnxcomp.errors import UsageError
from onnxcomp.passes import WeightQuantizeOptions, WeightQuantizePass
from onnxcomp.target import resolve_target
from tests.conftest import MODELS

LLM = MODELS / "tiny_llm.onnx"
CALIB = MODELS / "llm_calib.npz"


@pytest.fixture(scope="module")
def llm() -> ir.Model:
    return onnxcomp.load(LLM)


@pytest.fixture(scope="module")
def calib(llm) -> Dataset:
    data = load_data(CALIB, llm)
    # 4 windows of 64 tokens: enough statistics for a test, quick to collect.
    return Dataset({k: v[:4, :64] if k in ("input_ids", "attention_mask", "position_ids")
                    else v[:4] for k, v in data.inputs.items()})  # fmt: skip


def _quantize(model: ir.Model, data: Dataset | None, target: str = "portable", **options):
    copy = model.clone()
    result = WeightQuantizePass(WeightQuantizeOptions(**options), data=data,
                                target=resolve_target(target))(copy)  # fmt: skip
    return copy, result


def _logits(model: ir.Model, ids: np.ndarray) -> np.ndarray:
    sig = decoder.signature(model)
    assert sig is not None
    session = runtime.make_session(model)
    return session.run([sig.logits], decoder.complete_feeds(sig, {"input_ids": ids}))[0]


def _ids(calib: Dataset, n: int = 2, length: int = 48) -> np.ndarray:
    return calib.inputs["input_ids"][:n, :length]


def test_awq_scaling_alone_leaves_outputs_unchanged(llm, calib):
    """The 1/s folded into RMSNorm weights or a Mul, and s into the weights' rows, before any
    rounding: the float model computes the same logits."""
    model = llm.clone()
    quantizer = WeightQuantizePass(
        WeightQuantizeOptions(bits=4, block_size=32, method="awq"), data=calib
    )
    weights, _ = quantizer._find(model)
    stats = quantizer._calibrate(model, weights)
    counts = quantizer._apply_awq(model.graph, weights, stats)
    assert counts.get("folded", 0) >= 5  # input_norm / post_norm weights of the 5 layers
    assert counts.get("folded", 0) + counts.get("mul_inserted", 0) >= 10
    before, after = _logits(llm, _ids(calib)), _logits(model, _ids(calib))
    assert np.abs(after - before).max() <= 1e-4 * np.abs(before).max()
    changed = [w.name for w in weights if not np.array_equal(
        w.array, llm.graph.initializers[w.name].const_value.numpy())]  # fmt: skip
    assert len(changed) >= 20


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_error_compensation_beats_rtn_on_the_decoder(llm, calib, method):
    quantized, result = _quantize(llm, calib, bits=4, block_size=32, method=method)
    # Output error on the calibration inputs, averaged over layers, relative to RTN's.
    assert result.stats[f"{method}_error_vs_rtn"] < (0.8 if method == "gptq" else 0.95)
    rtn, _ = _quantize(llm, None, bits=4, block_size=32)
    ids = calib.inputs["input_ids"][:4, :64]
    ref = _logits(llm, ids)
    err = np.abs(_logits(quantized, ids) - ref).mean()
    assert err < np.abs(_logits(rtn, ids) - ref).mean()


def test_sequential_statistics_come_from_the_partly_quantised_model(llm, calib):
    """sequential=true collects each stage's inputs after the stages before it were quantised:
    the result differs from one-pass statistics, and still beats round-to-nearest."""
    small = Dataset({k: v[:2] for k, v in calib.inputs.items()})
    one_pass, _ = _quantize(llm, small, bits=4, block_size=32, method="gptq")
    staged, result = _quantize(llm, small, bits=4, block_size=32, method="gptq", sequential=True)
    assert "each from the model quantised up to it" in " ".join(result.notes)
    assert result.stats["gptq_error_vs_rtn"] < 0.8
    codes = [v.const_value.numpy() for m in (one_pass, staged) for n, v in
             m.graph.initializers.items() if n.endswith("_quantized")]  # fmt: skip
    half = len(codes) // 2
    assert any(not np.array_equal(a, b) for a, b in zip(codes[:half], codes[half:], strict=True))


def test_formats_load_in_onnxruntime_and_agree(llm, calib):
    qdq, r1 = _quantize(llm, calib, bits=4, block_size=32, method="gptq", format="qdq")
    nbits, r2 = _quantize(llm, calib, bits=4, block_size=32, method="gptq", format="matmulnbits")
    ops = {n.op_type for n in nbits.graph}
    assert r2.stats["formats"] == {"matmulnbits": 37} and r1.stats["formats"] == {"qdq": 37}
    assert {"MatMulNBits", "GatherBlockQuantized"} <= ops  # the embedding table: GatherBQ
    assert "DequantizeLinear" not in ops
    assert not any(
        n.op_type == "MatMul" and n.inputs[1].const_value is not None for n in nbits.graph
    )
    for model in (qdq, nbits):
        onnx.checker.check_model(ir.to_proto(model), full_check=True)
    ids = _ids(calib)
    a, b = _logits(qdq, ids), _logits(nbits, ids)
    assert np.abs(a - b).max() <= 2e-3 * np.abs(a).max()
    assert r1.stats["weight_bytes_after"] == pytest.approx(r2.stats["weight_bytes_after"], rel=0.02)


@pytest.mark.parametrize("options", [
    {"bits": 4, "block_size": 32, "method": "awq", "format": "matmulnbits", "symmetric": False},
    {"bits": 8, "format": "matmulnbits"},
])  # fmt: skip
def test_kv_cache_steps_match_full_sequence_after_quantisation(llm, calib, options):
    quantized, result = _quantize(llm, calib, **options)
    # 36 MatMul weights, and the embedding table when 4-bit (GatherBlockQuantized)
    assert result.stats["formats"]["matmulnbits"] == (37 if options["bits"] == 4 else 36)
    sig = decoder.signature(quantized)
    session = runtime.make_session(quantized)
    names = decoder.output_names(sig)
    ids = _ids(calib, 2, 24)
    full = session.run([sig.logits], decoder.complete_feeds(sig, {"input_ids": ids}))[0]
    prompt = 16
    outputs = dict(zip(names, session.run(names, decoder.complete_feeds(
        sig, {"input_ids": ids[:, :prompt]})), strict=True))  # fmt: skip
    steps = [outputs[sig.logits]]
    for position in range(prompt, ids.shape[1]):
        feeds = decoder.step_feeds(sig, ids[:, position : position + 1], outputs, position)
        outputs = dict(zip(names, session.run(names, feeds), strict=True))
        steps.append(outputs[sig.logits])
    cached = np.concatenate(steps, axis=1)
    assert cached.shape == full.shape
    assert np.abs(cached - full).max() <= 1e-3 * np.abs(full).max()
    # and the quantised model still predicts like the float one
    ref = _logits(llm, ids)
    agree = np.mean(ref.argmax(-1) == full.argmax(-1))
    assert agree >= (0.97 if options["bits"] == 8 else 0.8)


def test_auto_format_follows_the_target(llm):
    portable, _ = _quantize(llm, None, bits=4, block_size=32)
    cpu, result = _quantize(llm, None, target="x86-vnni", bits=4, block_size=32)
    assert not any(n.op_type == "MatMulNBits" for n in portable.graph)
    assert sum(n.op_type == "MatMulNBits" for n in cpu.graph) == 36
    assert sum(n.op_type == "GatherBlockQuantized" for n in cpu.graph) == 1
    assert cpu.opset_imports["com.microsoft"] == 1 and result.stats["formats"]["matmulnbits"] == 37


def test_lm_head_kept_float_on_request(llm):
    model, result = _quantize(llm, None, bits=4, block_size=32, include_head=False)
    head = [n for n in model.graph if n.op_type == "MatMul" and n.outputs[0].is_graph_output()]
    assert len(head) == 1 and head[0].inputs[1].const_value.dtype == ir.DataType.FLOAT
    assert result.stats["weights_quantized"] == 36


def test_gptq_without_data_is_a_usage_error():
    with pytest.raises(UsageError, match="--data"):
        WeightQuantizePass(WeightQuantizeOptions(bits=4, method="gptq")).preflight()
    with pytest.raises(UsageError, match="8- or 4-bit"):
        WeightQuantizeOptions(bits=2, scheme="ternary", method="awq")


def test_cli_int4_gptq_matmulnbits(tmp_path):
    out = tmp_path / "q.onnx"
    code = onnxcomp.cli.main([
        "optimize", str(LLM), "-p", "int4:method=gptq:format=matmulnbits:calib_samples=2",
        "--data", str(CALIB), "--check-samples", "2", "-o", str(out),
    ])  # fmt: skip
    assert code == 0 and out.stat().st_size < 0.25 * LLM.stat().st_size
