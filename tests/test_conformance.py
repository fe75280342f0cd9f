"""Conformance: ``simplify,fold-bn`` keep the ONNX backend test models ONNX Runtime runs right.

The cases are onnx's own backend test models: every node test (regenerated into a temp dir by
onnx's generator, since recent wheels no longer ship that data), the ``simple``,
``pytorch-converted`` and ``pytorch-operator`` folders the wheel ships, and the ``light``
model-zoo architectures (AlexNet, DenseNet-121, Inception, ResNet-50, ShuffleNet, SqueezeNet,
VGG-19, ZFNet, weights from ConstantOfShape). ONNX Runtime (CPU, onnxcomp's optimisation
level) first runs the original model on data set 0; a case counts only if those outputs match
the reference outputs within onnx's runner tolerance (rtol 1e-3, atol 1e-7, or the case's
own). Otherwise the test is skipped with the reason, so the skip count is the number of
models ONNX Runtime cannot run. The test then runs ``simplify,fold-bn`` and asserts ONNX
Runtime reproduces the reference outputs from the result within the same tolerance, with the
same shapes and dtypes.

Why: both passes promise to be lossless on any valid model. onnx's suite covers every operator,
opsets back to 1, sequences, optionals and control flow, which exercises onnxscript's folding
and rewrite rules far beyond the models onnxcomp ships. ``test_totals`` prints how many cases
were found, ran, passed, and were changed by the passes, and fails if the harness stops finding
or running them. Marked slow (30-45 s with ``-n 2`` on two cores); CI runs it.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from pathlib import Path

import pytest

from tests import conformance_cases as cc

pytestmark = pytest.mark.slow

CASES = cc.collect_cases()

# Case id -> why the passes still break it. Every entry must fail (strict xfail).
KNOWN_FAILURES: dict[str, str] = {}

# Floors under what onnx 1.23 gives (found: node 1884, simple 26, pytorch-converted 82,
# pytorch-operator 35, light 9; ONNX Runtime 1.32 runs 1701): a harness that stops finding
# cases, or stops feeding them, fails loudly instead of passing on nothing.
MIN_FOUND = {
    "node": 1500,
    "simple": 20,
    "pytorch-converted": 60,
    "pytorch-operator": 25,
    "light": 9,
}
MIN_RUNNABLE = {"node": 1300, "simple": 15, "pytorch-converted": 40, "pytorch-operator": 15}


def _param(case: cc.Case) -> object:
    marks = []
    if case.id in KNOWN_FAILURES:
        marks.append(pytest.mark.xfail(strict=True, reason=KNOWN_FAILURES[case.id]))
    return pytest.param(case, id=case.id, marks=marks)


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    """This pytest run's temp dir, the same for every pytest-xdist worker."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if hasattr(request.config, "workerinput") else base


@pytest.fixture(scope="session")
def generated_data(run_dir: Path) -> Path:
    """onnx's node and simple test cases written out by onnx's generator."""
    return cc.generate_data(run_dir)


@pytest.fixture(scope="session")
def verdicts_dir(run_dir: Path) -> Path:
    path = run_dir / "conformance-verdicts"
    path.mkdir(exist_ok=True)
    return path


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_passes_keep_reference_outputs(
    case: cc.Case,
    generated_data: Path,
    verdicts_dir: Path,
    record_property: Callable[[str, object], None],
) -> None:
    """ONNX Runtime on the simplify,fold-bn result still matches onnx's reference outputs."""
    verdict = cc.cached_verdict(case, generated_data, verdicts_dir)
    if not verdict.runnable:
        pytest.skip(verdict.detail)
    record_property("modified_by_passes", verdict.modified)
    assert verdict.status == "passed", f"{verdict.status}: {verdict.detail}"


def test_totals(
    generated_data: Path, verdicts_dir: Path, record_property: Callable[[str, object], None]
) -> None:
    """Totals per folder; verdicts come from the cache the case tests fill (or are computed)."""
    verdicts = [cc.cached_verdict(case, generated_data, verdicts_dir) for case in CASES]
    totals: dict[str, collections.Counter] = {kind: collections.Counter() for kind in cc.KINDS}
    for case, verdict in zip(CASES, verdicts, strict=True):
        counts = totals[case.kind]
        counts["found"] += 1
        counts[verdict.status] += 1
        if verdict.runnable:
            counts["runnable"] += 1
        if verdict.modified is not None:
            counts["changed" if verdict.modified else "unchanged"] += 1
    columns = ("found", *cc.NOT_RUNNABLE, "runnable", "passed", "pipeline-error", "mismatch")
    columns += ("changed", "unchanged")
    rows = [f"{'folder':<18}" + "".join(f"{c:>{len(c) + 2}}" for c in columns)]
    for kind, counts in [*totals.items(), ("total", sum(totals.values(), collections.Counter()))]:
        rows.append(f"{kind:<18}" + "".join(f"{counts[c]:>{len(c) + 2}}" for c in columns))
    print(f"\n{cc.PASSES} over onnx's backend test models:\n" + "\n".join(rows))
    record_property("totals", {kind: dict(counts) for kind, counts in totals.items()})

    for kind, floor in MIN_FOUND.items():
        assert totals[kind]["found"] >= floor, f"only {totals[kind]['found']} {kind} cases found"
    for kind, floor in MIN_RUNNABLE.items():
        assert totals[kind]["runnable"] >= floor, (
            f"ONNX Runtime ran only {totals[kind]['runnable']} {kind} cases"
        )
    assert totals["light"]["runnable"] == totals["light"]["found"], "a light model did not run"
