"""The pass x model matrix, a bounded sample: every registered pass on every kind of graph.

For each pair the written model must pass onnx.checker, load in plain ONNX Runtime, keep its
output shapes and stay finite (see tests/matrix_cases.py), or onnxcomp must refuse in one line
with one of the reasons listed in :data:`EXPECTED_REFUSALS`: a refusal not listed fails too,
so a pass that starts refusing a model it handled is caught. The loss bound is off (random
weights); distillation runs one epoch on four generated samples, when torch is installed.

The sample: every graph built in matrix_cases (subgraphs holding weights, a weight shared
with a subgraph, fp16, external data in a subfolder, no weights, named / -1 / unnamed input
dims, 0-d inputs), a few backend test models with weights (IR 3, opset 6), and SqueezeNet
from the light zoo in the zoo's layout and as the onnx wheel ships it. benchmarks/matrix.py
runs all of it (every backend and light model).
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

import pytest

from tests import matrix_cases as mc

BACKEND_SAMPLE = (
    "pytorch-converted/test_Conv1d_groups",
    "pytorch-converted/test_Conv3d",
    "pytorch-converted/test_ConvTranspose2d",
    "pytorch-converted/test_Embedding",
    "pytorch-converted/test_Linear_no_bias",
    "pytorch-converted/test_BatchNorm2d_eval",
    "pytorch-converted/test_PReLU_2d_multiparam",
    "pytorch-operator/test_operator_symbolic_override",
)
LIGHT_SAMPLE = ("light/squeezenet", "light-shipped/squeezenet")

# (model pattern, pass) -> what the one-line reason must say; the first match counts.
EXPECTED_REFUSALS: dict[tuple[str, str], str] = {
    # onnx's version converter leaves opset-6 PRelu's channel broadcast as it was, which
    # opset 7 reads as numpy broadcasting: ONNX Runtime cannot run the upgraded model.
    ("pytorch-converted/test_PReLU_2d_multiparam", "*"): "cannot run the input model",
    # Its only weights are in the Scan body, which the distillation interpreter does not train.
    ("scan-weights", "distill"): "the student has no trainable weights",
    ("no-weights", "distill"): "the student has no trainable weights",
    ("*scalar-input*", "distill"): "needs a sample axis on every input",
    ("pytorch-*", "distill"): "fixes its batch dim",
    ("light*/*", "distill"): "fixes its batch dim",
}


def _sample() -> list[tuple[mc.MatrixModel, str]]:
    models = [
        m for m in mc.all_models()
        if m.group not in ("backend", "light (zoo layout)", "light (as shipped)")
        or m.name in BACKEND_SAMPLE or m.name in LIGHT_SAMPLE
    ]  # fmt: skip
    return [(m, p) for m in models for p in mc.matrix_passes()]


def _expected_refusal(model: str, pass_name: str) -> str | None:
    for (pattern, pass_pattern), reason in EXPECTED_REFUSALS.items():
        if fnmatch.fnmatchcase(model, pattern) and fnmatch.fnmatchcase(pass_name, pass_pattern):
            return reason
    return None


def test_sample_covers_every_kind_and_pass():
    sample = _sample()
    groups = {m.group for m, _ in sample}
    assert groups == {m.group for m in mc.all_models()}
    assert {p for _, p in sample} == set(mc.matrix_passes())
    names = {m.name for m in mc.all_models()}
    assert set(BACKEND_SAMPLE) <= names and set(LIGHT_SAMPLE) <= names


@pytest.mark.parametrize(
    ("spec", "pass_name"), [pytest.param(m, p, id=f"{m.name}|{p}") for m, p in _sample()]
)
def test_pass_on_model(spec: mc.MatrixModel, pass_name: str, tmp_path: Path):
    outcome = mc.judge(spec, pass_name, tmp_path)
    expected = _expected_refusal(spec.name, pass_name)
    assert outcome.status != "failed", outcome.detail
    if outcome.status == "refused":
        assert expected is not None, f"refused without an expected reason: {outcome.detail}"
        assert expected in outcome.detail
    else:
        assert expected is None, f"expected a refusal ({expected}), but it worked"
        assert (tmp_path / "out.onnx").is_file()
