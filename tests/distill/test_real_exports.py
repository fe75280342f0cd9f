"""End to end: ``prune-channels:ratio=0.25,distill:epochs=1`` on real-architecture exports.

Five tiny-shape models (``tests/distill/export_models.py``: a dynamo-exported BERT-style
encoder with attention mask and token types, a Llama-style decoder exported at opset 23 with
RMSNormalization and grouped-query causal Attention, a DBNet-style detector with Resize
upsampling, an Inception-style CNN with LRN and If, a bidirectional GRU classifier) are
exported once per session, pruned, and distilled against the original on seeded training
inputs. On separate held-out inputs, each distilled model must be strictly closer to its
teacher (ONNX Runtime) than the pruned model it started from (output MSE), and no less
aligned (cosine). ``test_figures`` prints the table: agreement before/after and seconds per
epoch (the distill pass's time: one epoch plus its held-out evaluations).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import onnx_ir as ir  # noqa: E402

import onnxcomp  # noqa: E402
from tests.conftest import LOSS_ALLOWED, run_onnx  # noqa: E402
from tests.distill import export_models  # noqa: E402

pytestmark = pytest.mark.slow

PIPELINE = "prune-channels:ratio=0.25,distill:epochs=1"
TRAIN_SAMPLES = 256
HELD_OUT = 64
FIGURES: dict[str, dict[str, float]] = {}


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("exports")


_EXPORTED: dict[str, Path] = {}


def _exported(name: str, directory: Path) -> Path:
    """The model exported once per session (per xdist worker)."""
    if name not in _EXPORTED:
        _EXPORTED[name] = export_models.export(name, directory)
    return _EXPORTED[name]


def _closeness(model: ir.Model | Path, inputs: dict[str, np.ndarray], teacher: np.ndarray
               ) -> tuple[float, float]:  # fmt: skip
    """(output MSE, mean per-sample cosine) against the teacher's outputs."""
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    got = run_onnx(proto, inputs)[0].reshape(len(teacher), -1).astype(np.float64)
    want = teacher.reshape(len(teacher), -1).astype(np.float64)
    mse = float(np.mean((got - want) ** 2))
    cos = np.sum(got * want, 1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    return mse, float(np.mean(cos))


@pytest.mark.parametrize("name", list(export_models.MODELS))
def test_distillation_brings_the_pruned_export_closer_to_its_teacher(
    name: str, export_dir: Path
) -> None:
    path = _exported(name, export_dir)
    make_inputs = export_models.MODELS[name][1]
    train = onnxcomp.Dataset(make_inputs(np.random.default_rng(1), TRAIN_SAMPLES))
    held = make_inputs(np.random.default_rng(2), HELD_OUT)
    teacher = run_onnx(path, held)[0]

    pruned, pruned_report = onnxcomp.optimize(
        path, "prune-channels:ratio=0.25", data=train, check="final", bound=LOSS_ALLOWED
    )
    removed = pruned_report.records[0].stats
    start = time.perf_counter()
    distilled, report = onnxcomp.optimize(
        path, PIPELINE, data=train, check="final", bound=LOSS_ALLOWED
    )
    assert time.perf_counter() - start > 0
    record = next(r for r in report.records if r.name == "distill")
    before_mse, before_cos = _closeness(pruned, held, teacher)
    after_mse, after_cos = _closeness(distilled, held, teacher)
    FIGURES[name] = {
        "before_mse": before_mse, "after_mse": after_mse, "before_cos": before_cos,
        "after_cos": after_cos, "seconds": record.seconds,
    }  # fmt: skip
    assert before_mse > 0, f"prune-channels changed nothing in {name}: {removed}"
    assert record.stats["tensors_trained"] > 0
    assert after_mse < before_mse, (name, before_mse, after_mse, record.stats)
    assert after_cos >= before_cos - 1e-6, (name, before_cos, after_cos)


def test_figures() -> None:
    """The table of item 3 (prints what the runs above measured in this process)."""
    if not FIGURES:
        pytest.skip("the model runs ran in another process")
    rows = [f"{'model':<10}{'MSE before':>12}{'MSE after':>12}{'cos before':>12}"
            f"{'cos after':>11}{'s/epoch':>9}"]  # fmt: skip
    for name, f in FIGURES.items():
        rows.append(
            f"{name:<10}{f['before_mse']:>12.3e}{f['after_mse']:>12.3e}{f['before_cos']:>12.4f}"
            f"{f['after_cos']:>11.4f}{f['seconds']:>9.2f}"
        )
    print(f"\n{PIPELINE} (held-out agreement with the teacher):\n" + "\n".join(rows))
    assert all(f["after_mse"] < f["before_mse"] for f in FIGURES.values())
