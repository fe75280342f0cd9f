"""The oracle: OnnxModule against every onnx backend node test whose ops it supports.

Every node test of onnx's suite (regenerated in memory by onnx's generator, as
``tests/test_conformance.py`` does) whose op types are all in ``SUPPORTED_OPS`` is built as an
:class:`OnnxModule`, run on the test's inputs, and compared with the test's reference outputs
by onnx's own runner comparison (shapes, dtypes, rtol 1e-3 / atol 1e-7 or the case's own).
Models the module refuses at construction (values it has no torch type for: strings,
FLOAT4E2M1, FLOAT8E8M0, sequences and optionals; random dropout in training mode) count as
unsupported, with the reason. ``test_totals`` prints the counts and fails on any mismatch
outside :data:`KNOWN_MISMATCHES` (and on a known one that starts matching, so the list stays
true), or when fewer cases are supported or match than today.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

torch = pytest.importorskip("torch")

import onnx_ir as ir  # noqa: E402

from onnxcomp.distill import SUPPORTED_OPS, OnnxModule, UnsupportedOpError  # noqa: E402
from onnxcomp.distill.module import as_torch, to_numpy  # noqa: E402
from tests import conformance_cases as cc  # noqa: E402

pytestmark = pytest.mark.slow

# Case -> why the module's outputs differ from the reference. Each must still differ.
KNOWN_MISMATCHES: dict[str, str] = {
    "test_attention_4d_causal_fp16": (
        "float16 rounding: 2 of 192 outputs are 1-2 fp16 steps off the reference's numpy "
        "rounding (ONNX Runtime misses this case too)"
    ),
    "test_attention_4d_causal_fp16_expanded": "as test_attention_4d_causal_fp16",
    "test_dft_inverse": (
        "float32 noise in the reference: imaginary parts of 1.9e-7 where the exact value (and "
        "ours) is 0, above the case's atol of 1e-7"
    ),
    "test_dft_inverse_opset19": "as test_dft_inverse",
    "test_maxunpool_export_with_output_shape": (
        "ONNX Runtime's semantics kept: indices address the given output_shape; the reference "
        "scatters into the inferred shape and pads it (ONNX Runtime differs the same way)"
    ),
}
# Floors under what onnx 1.23 gives today (1884 node tests; 1716 supported, 1711 match):
# a regression in the harness or the interpreter fails loudly instead of passing on less.
MIN_SUPPORTED = 1710
MIN_MATCHING = 1705


def _walk(graph: onnx.GraphProto, found: set[tuple[str, str]]) -> None:
    for node in graph.node:
        found.add((node.domain, node.op_type))
        for attr in node.attribute:
            if attr.HasField("g"):
                _walk(attr.g, found)
            for sub in attr.graphs:
                _walk(sub, found)


def _array(value: object) -> np.ndarray:
    return numpy_helper.to_array(value) if isinstance(value, onnx.TensorProto) else value


def _judge(case: object) -> tuple[str, str]:
    """(verdict, detail): unsupported, refused, match or mismatch."""
    ops: set[tuple[str, str]] = set()
    _walk(case.model.graph, ops)
    missing = sorted(op for domain, op in ops if domain not in ("", "ai.onnx") or
                     op not in SUPPORTED_OPS)  # fmt: skip
    if missing:
        return "unsupported", ", ".join(missing)
    inputs, expected = case.data_sets[0]
    if any(isinstance(v, (list, dict)) or v is None for v in (*inputs, *expected)):
        return "refused", "sequence or optional values"
    model = ir.serde.deserialize_model(case.model)
    try:
        module = OnnxModule(model)
    except UnsupportedOpError as e:
        return "refused", str(e)
    try:
        with torch.no_grad():
            got = module(*[as_torch(np.asarray(_array(v))) for v in inputs])
        outputs = [to_numpy(t, v.dtype) for t, v in zip(got, model.graph.outputs, strict=True)]
        cc.assert_matches(
            [_array(v) for v in expected], outputs, cc.Case("node", case.name, case.rtol, case.atol)
        )
    except Exception as e:  # any failure is a mismatch, reported with its cause
        return "mismatch", " ".join(str(e).split())[:300]
    return "match", ""


def test_totals(record_property: Callable[[str, object], None]) -> None:
    """Counts of onnx's node tests by verdict; no mismatch beyond the known ones."""
    cases = [c for c in cc.generated_testcases().values() if c.kind == "node"]
    verdicts = {case.name: _judge(case) for case in cases}
    counts = collections.Counter(verdict for verdict, _ in verdicts.values())
    missing_ops = collections.Counter(
        op for verdict, detail in verdicts.values() if verdict == "unsupported"
        for op in detail.split(", ")
    )  # fmt: skip
    supported = counts["match"] + counts["mismatch"]
    print(
        f"\nOnnxModule over onnx's {len(cases)} backend node tests: {supported} supported, "
        f"{counts['match']} match the reference, {counts['mismatch']} do not; "
        f"{counts['refused']} refused at construction, {counts['unsupported']} use ops without "
        f"a torch implementation: "
        + ", ".join(f"{op} ({n})" for op, n in sorted(missing_ops.items()))
    )
    record_property("totals", dict(counts))
    mismatches = {name: d for name, (v, d) in verdicts.items() if v == "mismatch"}
    unexpected = {name: d for name, d in mismatches.items() if name not in KNOWN_MISMATCHES}
    assert not unexpected, "new mismatches:\n" + "\n".join(
        f"{name}: {d}" for name, d in sorted(unexpected.items())
    )
    fixed = sorted(set(KNOWN_MISMATCHES) - set(mismatches))
    assert not fixed, f"known mismatches that now match or no longer run (update the list): {fixed}"
    assert supported >= MIN_SUPPORTED, f"only {supported} node tests supported"
    assert counts["match"] >= MIN_MATCHING, f"only {counts['match']} node tests match"
