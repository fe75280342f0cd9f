"""onnxcomp.decoder (feeding a KV-cache decoder, perplexity) and bench --decode, on the shipped
decoder (models/tiny_llm.onnx). No timing is asserted: only that the figures exist."""

from __future__ import annotations

import numpy as np
import pytest

import onnxcomp
from onnxcomp import decoder, runtime
from onnxcomp.bench import BenchOptions, run_bench
from onnxcomp.cli import main
from onnxcomp.errors import OnnxcompError
from tests.conftest import MODELS

LLM = MODELS / "tiny_llm.onnx"


@pytest.fixture(scope="module")
def llm():
    return onnxcomp.load(LLM)


def test_signature_of_the_demo_decoder(llm):
    sig = decoder.signature(llm)
    assert sig is not None and sig.has_mask and sig.has_positions and sig.logits == "logits"
    assert len(sig.cache) == 10
    first = sig.cache[0]
    assert (first.name, first.present, first.heads, first.head_dim) == (
        "past_key_values.0.key", "present.0.key", 2, 32)  # fmt: skip
    assert decoder.signature(onnxcomp.load(MODELS / "tiny_encoder.onnx")) is None


def test_complete_and_step_feeds(llm):
    sig = decoder.signature(llm)
    ids = np.array([[1, 2, 3], [4, 5, 6]], np.int64)
    feeds = decoder.complete_feeds(sig, {"input_ids": ids})
    assert feeds["attention_mask"].shape == (2, 3)
    assert feeds["position_ids"].tolist()[1] == [0, 1, 2]
    assert feeds["past_key_values.4.value"].shape == (2, 2, 0, 32)
    session = runtime.make_session(llm)
    names = decoder.output_names(sig)
    outputs = dict(zip(names, session.run(names, feeds), strict=True))
    step = decoder.step_feeds(sig, np.array([[7], [8]]), outputs, 3)
    assert step["attention_mask"].shape == (2, 4) and step["position_ids"].tolist() == [[3], [3]]
    assert step["past_key_values.0.key"].shape == (2, 2, 3, 32)
    with pytest.raises(OnnxcompError, match="past"):
        decoder.complete_feeds(sig, {"input_ids": ids}, past_length=3)


class _Uniform:
    """A stand-in session whose logits are all equal: perplexity must be the vocabulary."""

    def run(self, names, feeds):
        b, s = feeds["input_ids"].shape
        return [np.zeros((b, s, 256), np.float32)]


def test_perplexity_known_answers(llm):
    sig = decoder.signature(llm)
    tokens = np.arange(1000) % 256
    assert decoder.perplexity(_Uniform(), sig, tokens, window=64) == pytest.approx(256, rel=1e-9)
    with pytest.raises(OnnxcompError, match="at least"):
        decoder.perplexity(_Uniform(), sig, tokens[:10], window=64)
    # The trained model on its held-out text: far below the 256 of a uniform guess
    # (5.19 measured on all of it).
    text = np.frombuffer((MODELS / "llm_heldout.txt").read_bytes()[:4128], np.uint8)
    ppl = decoder.perplexity(runtime.make_session(llm), sig, text, window=128)
    assert 3.0 < ppl < 8.0


def test_bench_decode_reports_prefill_and_tokens_per_second(llm):
    options = BenchOptions(runs=2, warmup=1, decode=4, memory=False,
                           shapes={"input_ids": (1, 16), "attention_mask": (1, 16)})  # fmt: skip
    report = run_bench([LLM, MODELS / "tiny_encoder.onnx"], options)
    by_model = {c.model: c for c in report.cells}
    cell = by_model["tiny_llm"]
    assert cell.status == "ok" and cell.prefill_ms > 0 and cell.decode_tokens_per_s > 0
    other = by_model["tiny_encoder"]
    assert other.decode_tokens_per_s is None and "not a decoder" in other.note


def test_cli_bench_decode(capsys):
    code = main(["bench", str(LLM), "--decode", "3", "--runs", "2", "--warmup", "1",
                 "--no-memory", "--shape", "input_ids=1x8"])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "decode tok/s" in out and "prefill ms" in out
    assert main(["bench", str(LLM), "--decode", "-1"]) == 2
