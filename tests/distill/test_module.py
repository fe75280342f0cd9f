"""OnnxModule on the demo models and their compressed versions: parity with ONNX Runtime,
weights as parameters by ONNX name, masks that keep pruned zeros, fake quantisation that
keeps quantised weights on their grid, and write-back into the same graph.

Parity bar (ONNX Runtime at the basic level): max abs error < 1e-4 and cosine 1.0 to six
decimals, on several batch sizes and sequence lengths, padded rows included.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import onnx_ir as ir  # noqa: E402

import onnxcomp  # noqa: E402
from onnxcomp.distill import OnnxModule  # noqa: E402
from onnxcomp.runtime import make_session  # noqa: E402
from tests.conftest import MODELS  # noqa: E402

DIGITS, ENCODER = MODELS / "digits_cnn.onnx", MODELS / "tiny_encoder.onnx"
DATA = {DIGITS: MODELS / "digits_eval.npz", ENCODER: MODELS / "encoder_eval.npz"}
ATOL = 1e-4


@functools.cache
def _model(path, passes: str | None = None) -> ir.Model:
    """The demo model, or its output of ``passes`` (unchecked); callers clone before editing."""
    if passes is None:
        return onnxcomp.load(path)
    model, _ = onnxcomp.optimize(path, passes, check="none")
    return model


@functools.cache
def _data(path) -> dict[str, np.ndarray]:
    with np.load(DATA[path]) as archive:
        return {k: archive[k] for k in archive.files if k != "labels"}


def _feeds(path, batch: int, seq: int | None = None, start: int = 0) -> dict[str, np.ndarray]:
    feeds = {k: v[start : start + batch] for k, v in _data(path).items()}
    if seq is not None:
        feeds = {k: np.ascontiguousarray(v[:, :seq]) for k, v in feeds.items()}
    return feeds


def _run_module(module: OnnxModule, feeds: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        return module(**{k: torch.from_numpy(v) for k, v in feeds.items()})[0].numpy()


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a.ravel(), b.ravel()) / np.linalg.norm(a) / np.linalg.norm(b))


def _assert_parity(model: ir.Model, module: OnnxModule, feeds: dict[str, np.ndarray]) -> None:
    expected = make_session(model).run(None, feeds)[0]
    got = _run_module(module, feeds)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() < ATOL
    assert round(_cosine(got, expected), 6) == 1.0


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_digits_cnn_matches_onnxruntime(batch):
    model = _model(DIGITS)
    _assert_parity(model, OnnxModule(model), _feeds(DIGITS, batch, start=batch))


@pytest.mark.parametrize(("batch", "seq"), [(1, 32), (5, 12), (64, 32), (3, 20)])
def test_tiny_encoder_matches_onnxruntime_on_dynamic_shapes(batch, seq):
    data = _data(ENCODER)
    padded = (data["attention_mask"][:, :seq] == 0).any(axis=1)
    rows = [*np.flatnonzero(padded)[: max(1, batch - 1)], *np.flatnonzero(~padded)[:1]][:batch]
    feeds = {k: np.ascontiguousarray(v[rows, :seq]) for k, v in data.items()}
    assert (feeds["attention_mask"] == 0).any()  # padded positions included
    model = _model(ENCODER)
    _assert_parity(model, OnnxModule(model), feeds)


@pytest.mark.parametrize("passes", ["int8", "int4", "ternary", "binary", "int8:symmetric=false"])
@pytest.mark.parametrize("path", [DIGITS, ENCODER], ids=["digits", "encoder"])
def test_quantised_models_match_onnxruntime(path, passes):
    model = _model(path, passes)
    module = OnnxModule(model)
    quantized = sum(n.op_type == "DequantizeLinear" for n in model.graph)
    assert len(module.quant_grids) == quantized > 0
    seq = 17 if path == ENCODER else None
    _assert_parity(model, module, _feeds(path, 33, seq))


@pytest.mark.parametrize(
    "passes",
    [
        "prune:sparsity=0.6",
        "prune-nm",
        "prune,int4",
        "simplify,fold-bn",
        "lowrank:op_types=Gemm+MatMul+Conv",
    ],
)
@pytest.mark.parametrize("path", [DIGITS, ENCODER], ids=["digits", "encoder"])
def test_pruned_and_other_compressed_models_match_onnxruntime(path, passes):
    model = _model(path, passes)
    _assert_parity(model, OnnxModule(model), _feeds(path, 16))


def test_weights_are_parameters_and_other_constants_buffers():
    module = OnnxModule(_model(ENCODER))
    names = dict(module.named_onnx_parameters())
    assert "layers.0.attn.q_proj.weight.T" in names  # MatMul weight
    assert {"layers.0.attn.q_proj.bias", "layers.0.ln1.weight", "ln_f.bias"} <= names.keys()
    assert {"tok_emb.weight", "pos_emb.weight", "classifier.weight"} <= names.keys()
    assert "val_13" not in names and "val_56" not in names  # shape constants, scalars
    assert len(list(module.constants.buffers())) == 12
    digits = OnnxModule(_model(DIGITS))
    digit_params = dict(digits.named_onnx_parameters())
    assert "stem.1.weight" in digit_params and "stem.1.running_mean" not in digit_params
    assert (
        sum(p.numel() for p in digits.parameters()) == 54_698
    )  # every weight, bias and BN affine; running statistics are buffers


def test_frozen_patterns_keep_tensors_as_buffers():
    module = OnnxModule(_model(ENCODER, "int8"), frozen=("tok_emb*", "*.bias"))
    names = set(module.onnx_names.values())
    assert not any(n.startswith("tok_emb") or n.endswith(".bias") for n in names)
    _assert_parity(_model(ENCODER, "int8"), module, _feeds(ENCODER, 4))


def test_gradients_reach_every_parameter():
    module = OnnxModule(_model(ENCODER, "int4"))
    feeds = _feeds(ENCODER, 8)
    (logits,) = module(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    logits.square().sum().backward()
    missing = [module.onnx_names[k] for k, p in module.weights.items() if p.grad is None]
    assert not missing
    assert all(torch.isfinite(p.grad).all() for p in module.parameters())


def _sgd_step(module: OnnxModule, path, lr: float = 0.5) -> None:
    """One large step on a loss whose gradient is dense, so masked weights would move."""
    feeds = _feeds(path, 16)
    (out,) = module(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    loss = out.square().sum() + sum(module.effective_weight(k).sum() for k in module.weights)
    optimizer = torch.optim.SGD(module.parameters(), lr=lr)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


@pytest.mark.parametrize("path", [DIGITS, ENCODER], ids=["digits", "encoder"])
def test_pruned_zeros_stay_zero_after_a_step_and_write_back(path):
    model = _model(path, "prune:sparsity=0.7").clone()
    module = OnnxModule(model)
    masked = {k for k, _ in module.masks.named_buffers()}
    assert masked
    zeros = {k: module.weights[k].detach() == 0 for k in masked}
    _sgd_step(module, path)
    for key in masked:
        assert bool((module.effective_weight(key)[zeros[key]] == 0).all())
        assert bool((module.weights[key].grad[zeros[key]] == 0).all())  # no gradient to revive
    module.write_back(model)
    for key in masked:
        written = model.graph.initializers[module.onnx_names[key]].const_value.numpy()
        assert np.all(written[zeros[key].numpy()] == 0)
        assert np.count_nonzero(written) > 0


def test_unpruned_weights_have_no_mask():
    module = OnnxModule(_model(ENCODER, "int4"))
    assert not list(module.masks.buffers())  # int4 rounding zeros (~13%) are not pruning
    assert not list(OnnxModule(_model(ENCODER, "ternary")).masks.buffers())


def test_keep_sparsity_false_lets_zeros_move():
    module = OnnxModule(_model(DIGITS, "prune:sparsity=0.7"), keep_sparsity=False)
    assert not list(module.masks.buffers())


@pytest.mark.parametrize("passes", ["int8", "int4", "ternary", "binary", "int8:symmetric=false"])
def test_quantised_weights_stay_on_grid_after_training(passes):
    model = _model(ENCODER, passes).clone()
    module = OnnxModule(model)
    _sgd_step(module, ENCODER, lr=0.05)
    for key, grid in module.quant_grids.items():
        scale = getattr(module.quant_params, f"{key}_scale")
        zero_point = getattr(module.quant_params, f"{key}_zero_point", None)
        weight = module.effective_weight(key).detach()
        from onnxcomp.distill.ops import expand_param

        s = expand_param(scale, weight.shape, grid.axis, grid.block_size)
        codes = weight / s
        if zero_point is not None:
            codes = codes + expand_param(
                zero_point.float(), weight.shape, grid.axis, grid.block_size
            )
        assert torch.allclose(codes, codes.round(), atol=1e-3)
        assert codes.min() >= grid.qmin - 1e-3 and codes.max() <= grid.qmax + 1e-3
        if grid.binary:
            assert set(codes.round().unique().tolist()) <= {-1.0, 1.0}


@pytest.mark.parametrize(
    ("path", "passes"),
    [
        (DIGITS, None),
        (ENCODER, None),
        (ENCODER, "int4"),
        (ENCODER, "binary"),
        (DIGITS, "ternary"),
        (DIGITS, "int8:symmetric=false"),
        (ENCODER, "prune,int8"),
    ],
)
def test_write_back_round_trip(path, passes):
    """Perturbed parameters written back: ONNX Runtime on the edited graph = the module."""
    model = _model(path, passes).clone()
    ops_before = [(n.op_type, n.name) for n in model.graph]
    module = OnnxModule(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * param.std() * 0.2)
    feeds = _feeds(path, 16)
    written = module.write_back(model)
    assert sorted(written) == sorted(module.onnx_names.values())
    assert [(n.op_type, n.name) for n in model.graph] == ops_before
    _assert_parity(model, module, feeds)
    assert (
        np.abs(
            make_session(model).run(None, feeds)[0]
            - make_session(_model(path, passes)).run(None, feeds)[0]
        ).max()
        > 1e-3
    )


def test_write_back_keeps_dtypes_and_scales():
    model = _model(ENCODER, "int4").clone()
    before = {n: v.const_value.dtype for n, v in model.graph.initializers.items()}
    scales = {
        n: v.const_value.numpy().copy()
        for n, v in model.graph.initializers.items()
        if n.endswith("_scale")
    }
    module = OnnxModule(model)
    with torch.no_grad():
        for param in module.parameters():
            param.mul_(1.3)
    module.write_back(model)
    assert {n: v.const_value.dtype for n, v in model.graph.initializers.items()} == before
    for name, scale in scales.items():
        np.testing.assert_array_equal(model.graph.initializers[name].const_value.numpy(), scale)


def test_write_back_refit_scales_follows_grown_weights():
    model = _model(DIGITS, "int8").clone()
    module = OnnxModule(model)
    with torch.no_grad():
        module.parameter("fc1.weight_quantized").mul_(3.0)  # beyond the old range: would saturate
    module.write_back(model, refit_scales=True)
    _assert_parity(model, module, _feeds(DIGITS, 16))
    scale = model.graph.initializers["fc1.weight_scale"].const_value.numpy()
    original = _model(DIGITS, "int8").graph.initializers["fc1.weight_scale"].const_value.numpy()
    np.testing.assert_allclose(scale, 3 * original, rtol=1e-2)


def test_write_back_into_another_model_names_what_is_missing():
    module = OnnxModule(_model(DIGITS))
    with pytest.raises(onnxcomp.OnnxcompError, match="no constant of that name"):
        module.write_back(_model(ENCODER).clone())


def test_inputs_positional_and_errors():
    module = OnnxModule(_model(ENCODER))
    feeds = _feeds(ENCODER, 2)
    positional = module(
        torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"])
    )[0]
    np.testing.assert_array_equal(positional.detach().numpy(), _run_module(module, feeds))
    with pytest.raises(TypeError, match="missing inputs: attention_mask"):
        module(torch.from_numpy(feeds["input_ids"]))
    with pytest.raises(TypeError, match="unknown input 'x'"):
        module(x=torch.zeros(1))
