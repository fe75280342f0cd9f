"""The distillation trainer: losses, the holdout split, learning on a pruned CNN, determinism,
resuming from a checkpoint, L1 regularisation, intermediate matching, and write-back parity.

Runs are a few small epochs on the digits CNN (180 calibration samples), single-threaded.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import onnx_ir as ir  # noqa: E402

import onnxcomp  # noqa: E402
from onnxcomp.data import Dataset, load_data  # noqa: E402
from onnxcomp.distill import OnnxModule  # noqa: E402
from onnxcomp.distill.teacher import Teacher  # noqa: E402
from onnxcomp.distill.train import (  # noqa: E402
    TrainConfig,
    cosine_loss,
    kd_loss,
    mse_loss,
    split_holdout,
    train,
)
from onnxcomp.errors import OnnxcompError, UsageError  # noqa: E402
from onnxcomp.runtime import make_session  # noqa: E402
from tests.conftest import MODELS  # noqa: E402

DIGITS = MODELS / "digits_cnn.onnx"
CALIB = MODELS / "digits_calib.npz"


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def _teacher_model() -> ir.Model:
    return onnxcomp.load(DIGITS)


@functools.cache
def _pruned() -> ir.Model:
    model, _ = onnxcomp.optimize(DIGITS, "prune-channels:ratio=0.5", check="none")
    return model


def _data() -> Dataset:
    return load_data(CALIB, _teacher_model())


def _run(model: ir.Model, config: TrainConfig, holdout: float = 0.2, **kwargs):
    module = OnnxModule(model)
    training, held = split_holdout(_data(), holdout, config.seed)
    result = train(module, Teacher(_teacher_model(), match=config.match), training, held, config,
                   **kwargs)  # fmt: skip
    return module, result


def test_losses_are_zero_for_equal_values_and_positive_otherwise():
    a = torch.randn(4, 10, generator=torch.Generator().manual_seed(0))
    b = a + torch.randn(4, 10, generator=torch.Generator().manual_seed(1))
    for loss in (lambda s, t: kd_loss(s, t, 2.0), mse_loss, cosine_loss):
        assert float(loss(a, a)) == pytest.approx(0.0, abs=1e-5)
        assert float(loss(a, b)) > 0.01
    assert float(mse_loss(torch.zeros(4, 10), a)) == pytest.approx(1.0, rel=1e-5)


def test_kd_loss_is_scaled_by_temperature_squared():
    s = torch.tensor([[1.0, 0.0]])
    t = torch.tensor([[0.0, 1.0]])
    kl = float(torch.nn.functional.kl_div(
        torch.log_softmax(s / 4, 1), torch.log_softmax(t / 4, 1), log_target=True,
        reduction="batchmean"))  # fmt: skip
    assert float(kd_loss(s, t, 4.0)) == pytest.approx(16 * kl, rel=1e-5)


def test_holdout_split_is_fixed_disjoint_and_complete():
    data = Dataset({"x": np.arange(50, dtype=np.float32)[:, None]}, np.arange(50))
    train_a, held_a = split_holdout(data, 0.2, seed=3)
    _, held_b = split_holdout(data, 0.2, seed=3)
    assert held_a is not None and held_b is not None
    np.testing.assert_array_equal(held_a.labels, held_b.labels)
    assert held_a.num_samples == 10 and train_a.num_samples == 40
    assert sorted([*train_a.labels, *held_a.labels]) == list(range(50))
    assert split_holdout(data, 0.0, seed=3)[1] is None


def test_distillation_lowers_loss_and_raises_accuracy_of_a_pruned_cnn():
    _, result = _run(_pruned().clone(), TrainConfig(epochs=4, batch_size=16, lr=3e-3))
    assert result.history[-1].train_loss < 0.5 * result.history[0].train_loss
    assert result.best.loss < 0.5 * result.before.loss
    assert result.best.accuracy > result.before.accuracy + 0.5
    assert result.best.agreement > 0.8


def test_same_seed_gives_the_same_weights_and_another_seed_does_not():
    config = TrainConfig(steps=6, batch_size=16, seed=5)
    first, _ = _run(_pruned().clone(), config)
    second, _ = _run(_pruned().clone(), config)
    other, _ = _run(_pruned().clone(), TrainConfig(steps=6, batch_size=16, seed=6))
    for key, param in first.weights.items():
        assert torch.equal(param, second.weights[key])
    assert any(not torch.equal(p, other.weights[k]) for k, p in first.weights.items())


def test_resume_continues_after_the_saved_epoch_and_ends_where_an_uninterrupted_run_ends(
    tmp_path,
):
    checkpoint = str(tmp_path / "state.pt")
    config = TrainConfig(epochs=3, batch_size=32, lr=3e-3, checkpoint=checkpoint)

    def interrupt(record):
        if record.epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(_pruned().clone(), config, on_epoch=interrupt)
    resumed, result = _run(_pruned().clone(), config)
    assert result.resumed_from == 1
    assert [r.epoch for r in result.history] == [1, 2, 3]
    straight, _ = _run(_pruned().clone(), TrainConfig(epochs=3, batch_size=32, lr=3e-3))
    for key, param in straight.weights.items():
        torch.testing.assert_close(resumed.weights[key], param)


def test_checkpoint_of_another_model_or_run_length_is_a_clear_error(tmp_path):
    checkpoint = str(tmp_path / "state.pt")
    _run(_pruned().clone(), TrainConfig(steps=2, batch_size=32, checkpoint=checkpoint))
    with pytest.raises(OnnxcompError, match="saved for another model"):
        _run(_teacher_model().clone(), TrainConfig(steps=2, batch_size=32, checkpoint=checkpoint))
    with pytest.raises(OnnxcompError, match="run of 2 steps, this run has 3"):
        _run(_pruned().clone(), TrainConfig(steps=3, batch_size=32, checkpoint=checkpoint))


def _l1(module: OnnxModule) -> float:
    return sum(float(p.detach().abs().sum()) for p in module.parameters() if p.ndim >= 2)


def test_l1_penalty_lowers_the_weights_l1_norm():
    config = dict(steps=10, batch_size=32, lr=1e-2)
    # No holdout: the last state is kept (on held-out data the teacher's own weights win).
    plain, _ = _run(_teacher_model().clone(), TrainConfig(**config), holdout=0)
    sparse, _ = _run(_teacher_model().clone(), TrainConfig(**config, l1=1e-3), holdout=0)
    assert _l1(sparse) < 0.9 * _l1(plain)


def test_intermediate_values_are_matched_by_name():
    model, _ = onnxcomp.optimize(DIGITS, "prune:sparsity=0.7", check="none")
    config = TrainConfig(steps=4, batch_size=32, match=("relu_2",), output_loss="kl")
    _, result = _run(model, config)
    assert result.steps == 4
    with pytest.raises(OnnxcompError, match="shape"):
        _run(_pruned().clone(), config)  # pruned channels: relu_2 has 16 channels, not 32
    with pytest.raises(UsageError, match="no value named nope"):
        _run(model, TrainConfig(steps=1, match=("nope",)))


def test_written_onnx_matches_the_trained_module():
    model = _pruned().clone()
    module, _ = _run(model, TrainConfig(steps=8, batch_size=16, lr=3e-3))
    module.write_back(model)
    feeds = {"input": _data().inputs["input"][:40]}
    expected = module(torch.from_numpy(feeds["input"]))[0].detach().numpy()
    got = make_session(model).run(None, feeds)[0]
    np.testing.assert_allclose(got, expected, atol=1e-4)
    before = make_session(_pruned()).run(None, feeds)[0]
    assert np.abs(got - before).max() > 0.1  # training changed the written model
