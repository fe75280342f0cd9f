"""Activation entropy per channel: histogram maths, where layers are measured, dead channels."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxcomp.analysis.importance import channel_entropy, entropy, histogram_channels, probe_point
from onnxcomp.data import Dataset
from tests.conftest import conv_bn_residual_model


def test_entropy_is_zero_for_a_constant_and_log_bins_for_uniform():
    x = np.stack([np.full(64, 3.0), np.arange(64.0), np.r_[np.zeros(32), np.ones(32)]])
    counts = histogram_channels(x, x.min(axis=1), x.max(axis=1), bins=8)
    assert counts.sum(axis=1).tolist() == [64, 64, 64]
    np.testing.assert_allclose(entropy(counts), [0.0, np.log(8), np.log(2)])


def test_nonfinite_activations_are_not_counted():
    x = np.array([[0.0, 1.0, np.nan, np.inf]])
    assert histogram_channels(x, np.array([0.0]), np.array([1.0]), bins=2).tolist() == [[1, 1]]


def test_conv_is_measured_after_its_batchnorm_and_relu():
    model = ir.serde.deserialize_model(conv_bn_residual_model())
    conv1 = next(n for n in model.graph if n.name == "conv1")
    value, axis = probe_point(conv1)
    assert value.producer().name == "relu1" and axis == 1
    conv2 = next(n for n in model.graph if n.name == "conv2")
    assert probe_point(conv2)[0].producer().name == "bn2"  # the residual Add mixes two inputs


def test_channel_entropy_runs_the_model_and_leaves_it_unchanged():
    model = ir.serde.deserialize_model(conv_bn_residual_model())
    outputs = [v.name for v in model.graph.outputs]
    x = np.random.default_rng(0).standard_normal((20, 1, 4, 4)).astype(np.float32)
    result = channel_entropy(model, Dataset({"x": x}), {"r1": 1, "g": -1}, bins=16, samples=12)
    assert [v.name for v in model.graph.outputs] == outputs
    assert result["r1"].shape == (4,) and result["g"].shape == (8,)
    for values in result.values():
        assert np.all(values >= 0) and np.all(values <= np.log(16) + 1e-9)
    assert np.all(result["g"] > 0)  # Gemm outputs before BN vary on random inputs
