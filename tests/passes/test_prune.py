"""prune and prune-nm: exact zeros where promised, on the written model, which still runs."""

from __future__ import annotations

import json
import time
import zlib
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxcomp
from onnxcomp import io
from onnxcomp.cli import main
from onnxcomp.data import Dataset
from onnxcomp.errors import UsageError
from onnxcomp.masks import group_nonzeros, magnitude_mask, prune_count, satisfies_nm
from onnxcomp.passes import (
    MagnitudePruneOptions,
    MagnitudePrunePass,
    NMPruneOptions,
    NMPrunePass,
)
from onnxcomp.passes import _weights as weights_module
from onnxcomp.passes import prune as prune_module
from tests.conftest import LOSS_ALLOWED, MODELS, conv_bn_residual_model, run_onnx

EVERY_LAYER = {"skip_first": False, "skip_last": False}


def _mlp(shared: bool = False) -> onnx.ModelProto:
    """x[N,8] -> MatMul(w1) -> Relu -> Gemm(w2, transB=1) -> Relu -> MatMul(w3) -> y[N,4];
    with ``shared``, two MatMuls read the same 8x8 ``w1``."""
    rng = np.random.default_rng(0)
    if shared:
        inits = {"w1": rng.standard_normal((8, 8))}
        nodes = [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("MatMul", ["r", "w1"], ["y"], name="mm2"),
        ]
        out = 8
    else:
        inits = {
            "w1": rng.standard_normal((8, 16)),
            "w2": rng.standard_normal((12, 16)),
            "b2": rng.standard_normal(12),
            "w3": rng.standard_normal((12, 4)),
        }
        nodes = [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
            helper.make_node("Relu", ["h"], ["r"], name="relu1"),
            helper.make_node("Gemm", ["r", "w2", "b2"], ["g"], name="gemm", transB=1),
            helper.make_node("Relu", ["g"], ["r2"], name="relu2"),
            helper.make_node("MatMul", ["r2", "w3"], ["y"], name="mm3"),
        ]
        out = 4
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", out])],
        [numpy_helper.from_array(a.astype(np.float32), k) for k, a in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(pass_, model: onnx.ModelProto):
    ir_model = ir.serde.deserialize_model(model)
    result = pass_(ir_model)
    return ir.serde.serialize_model(ir_model), result


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _sparsity(array: np.ndarray) -> float:
    return 1 - np.count_nonzero(array) / array.size


def _same_outputs_shape(original: onnx.ModelProto, pruned: onnx.ModelProto, x: np.ndarray):
    got, want = run_onnx(pruned, {"x": x}), run_onnx(original, {"x": x})
    assert [g.shape for g in got] == [w.shape for w in want]
    assert all(np.isfinite(g).all() for g in got)
    return got, want


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.9])
def test_layer_scope_zeros_exactly_the_smallest_weights_of_each_tensor(sparsity):
    original = _mlp()
    pruned, result = _run(
        MagnitudePrunePass(MagnitudePruneOptions(sparsity=sparsity, **EVERY_LAYER)), original
    )
    before, after = _weights(original), _weights(pruned)
    for name in ("w1", "w2", "w3"):
        zero = after[name] == 0
        assert np.count_nonzero(zero) == prune_count(zero.size, sparsity)
        assert np.abs(before[name][zero]).max() <= np.abs(before[name][~zero]).min()
        np.testing.assert_array_equal(after[name][~zero], before[name][~zero])
        assert result.stats["per_tensor"][name] == round(_sparsity(after[name]), 4)
    np.testing.assert_array_equal(after["b2"], before["b2"])  # biases are not weights
    assert result.modified and result.stats["tensors"] == 3
    assert result.stats["zip_bytes_after"] < result.stats["zip_bytes_before"]
    x = np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32)
    _same_outputs_shape(original, pruned, x)


def test_global_scope_uses_one_threshold_across_tensors():
    original = _mlp()
    options = MagnitudePruneOptions(sparsity=0.6, scope="global", **EVERY_LAYER)
    pruned, result = _run(MagnitudePrunePass(options), original)
    before, after = _weights(original), _weights(pruned)
    names = ("w1", "w2", "w3")
    total = sum(before[n].size for n in names)
    zeros = sum(int(np.count_nonzero(after[n] == 0)) for n in names)
    assert zeros == prune_count(total, 0.6)
    assert result.stats["sparsity"] == round(zeros / total, 4)
    highest_pruned = max(np.abs(before[n][after[n] == 0]).max() for n in names)
    lowest_kept = min(np.abs(before[n][after[n] != 0]).min() for n in names)
    assert highest_pruned <= lowest_kept
    assert len({result.stats["per_tensor"][n] for n in names}) > 1  # not per-layer exact


def test_first_and_last_layers_stay_dense_by_default():
    original = conv_bn_residual_model()
    pruned, result = _run(MagnitudePrunePass(MagnitudePruneOptions(sparsity=0.5)), original)
    before, after = _weights(original), _weights(pruned)
    np.testing.assert_array_equal(after["w1"], before["w1"])  # first Conv
    np.testing.assert_array_equal(after["mm_w"], before["mm_w"])  # final MatMul
    assert _sparsity(after["w2"]) == 0.5 and _sparsity(after["fc_w"]) == 0.5
    assert "skipped w1: first layer (skip_first=true)" in result.notes
    assert "skipped mm_w: last layer (skip_last=true)" in result.notes
    x = np.random.default_rng(2).standard_normal((3, 1, 4, 4)).astype(np.float32)
    _same_outputs_shape(original, pruned, x)


def test_first_layer_is_every_layer_no_other_layer_feeds():
    # q, k and v projections all read the input: together they are the first layer.
    rng = np.random.default_rng(0)
    names = ("wq", "wk", "wv", "wo")
    nodes = [helper.make_node("MatMul", ["x", n], [f"{n}_out"], name=n) for n in names[:3]]
    nodes += [
        helper.make_node("Add", ["wq_out", "wk_out"], ["s"]),
        helper.make_node("Add", ["s", "wv_out"], ["s2"]),
        helper.make_node("MatMul", ["s2", "wo"], ["y"], name="wo"),
    ]
    graph = helper.make_graph(
        nodes,
        "qkv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), n) for n in names],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = MagnitudePruneOptions(skip_last=False)
    _, result = _run(MagnitudePrunePass(options), model)
    assert sorted(result.stats["per_tensor"]) == ["wo"]


def test_excluded_names_are_untouched():
    original = _mlp()
    options = MagnitudePruneOptions(sparsity=0.5, exclude=("gemm", "w3"), **EVERY_LAYER)
    pruned, result = _run(MagnitudePrunePass(options), original)
    before, after = _weights(original), _weights(pruned)
    for name in ("w2", "w3"):  # w2 by its node's name, w3 by its own
        np.testing.assert_array_equal(after[name], before[name])
        assert f"skipped {name}: excluded by pattern" in result.notes
    assert _sparsity(after["w1"]) == 0.5


def test_shared_weight_is_pruned_once_for_both_consumers():
    original = _mlp(shared=True)
    pruned, result = _run(
        MagnitudePrunePass(MagnitudePruneOptions(sparsity=0.5, **EVERY_LAYER)), original
    )
    assert [t.name for t in pruned.graph.initializer] == ["w1"]
    assert [n.input[1] for n in pruned.graph.node if n.op_type == "MatMul"] == ["w1", "w1"]
    assert _sparsity(_weights(pruned)["w1"]) == 0.5 and result.stats["tensors"] == 1
    x = np.random.default_rng(3).standard_normal((2, 8)).astype(np.float32)
    (got,), _ = _same_outputs_shape(original, pruned, x)
    w = _weights(pruned)["w1"]
    np.testing.assert_allclose(got, np.maximum(x @ w, 0) @ w, rtol=1e-5, atol=1e-5)


def test_shared_weight_with_a_first_layer_consumer_stays_dense():
    original = _mlp(shared=True)
    pruned, result = _run(MagnitudePrunePass(MagnitudePruneOptions(skip_last=False)), original)
    np.testing.assert_array_equal(_weights(pruned)["w1"], _weights(original)["w1"])
    assert not result.modified and "skipped w1: first layer (skip_first=true)" in result.notes


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (4, 8)])
def test_nm_pattern_holds_along_each_layers_reduction_axis(n, m):
    original = conv_bn_residual_model()
    pruned, result = _run(NMPrunePass(NMPruneOptions(n=n, m=m, **EVERY_LAYER)), original)
    after = _weights(pruned)
    axes = {"w2": 1, "fc_w": 0, "mm_w": 0}  # Conv: input channels; Gemm transB=0 and MatMul: K
    for name, axis in axes.items():
        if after[name].shape[axis] % m == 0:
            # every full group of m keeps exactly n (random weights hold no zeros of their own)
            assert np.all(group_nonzeros(after[name], m, axis) == n), name
        assert satisfies_nm(after[name], n, m, axis), name
    # w1 has one input channel: no group of m to thin, so it stays as it was, with a note
    np.testing.assert_array_equal(after["w1"], _weights(original)["w1"])
    assert any(note.startswith("w1: reduction length 1 is not a multiple") for note in result.notes)
    assert result.stats["pattern"] == f"{n}:{m}"
    x = np.random.default_rng(4).standard_normal((3, 1, 4, 4)).astype(np.float32)
    _same_outputs_shape(original, pruned, x)


def test_nm_on_gemm_with_transposed_weight_groups_along_k():
    original = _mlp()
    pruned, _ = _run(NMPrunePass(NMPruneOptions(**EVERY_LAYER)), original)
    w2 = _weights(pruned)["w2"]  # [N=12, K=16] with transB=1
    assert np.all(group_nonzeros(w2, 4, axis=1) == 2)
    before = np.abs(_weights(original)["w2"]).reshape(12, 4, 4)
    kept = (w2 != 0).reshape(12, 4, 4)
    assert np.all(np.sort(before, axis=-1)[..., 2:] == np.sort(np.where(kept, before, 0))[..., 2:])


def test_nm_short_last_group_is_zero_padded():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 4)).astype(np.float32)  # K = 6: one group of 4, one of 2
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "short",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    pruned, result = _run(NMPrunePass(NMPruneOptions(n=1, m=4, **EVERY_LAYER)), model)
    assert group_nonzeros(_weights(pruned)["w"], 4, axis=0).tolist() == [[1, 1]] * 4
    assert "w: reduction length 6 is not a multiple of 4" in result.notes[0]


@pytest.mark.parametrize(
    ("build", "needle"),
    [
        (lambda: NMPruneOptions(n=4, m=4), "1 <= n < m"),
        (lambda: NMPruneOptions(op_types=("Gather",)), "Gather not supported"),
        (lambda: MagnitudePruneOptions(sparsity=1.0), "[0, 1)"),
        (lambda: MagnitudePruneOptions(op_types=("Add",)), "Add not supported"),
    ],
)
def test_bad_options_are_refused(build, needle):
    with pytest.raises(UsageError) as error:
        build()
    assert needle in str(error.value)


def test_entropy_importance_without_data_is_refused():
    with pytest.raises(UsageError, match="--data"):
        onnxcomp.optimize(ir.serde.deserialize_model(_mlp()), "prune:importance=entropy")


def test_entropy_importance_prunes_a_dead_channel_first():
    # Column 0 of w1 has the largest weights but, negative on positive inputs, never passes
    # the ReLU: its activation entropy is 0, so its weights go before any others.
    rng = np.random.default_rng(0)
    w1 = rng.uniform(0.1, 0.5, (4, 3)).astype(np.float32)
    w1[:, 0] = -5.0
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2"),
        ],
        "dead",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
        [numpy_helper.from_array(w1, "w1"),
         numpy_helper.from_array(rng.standard_normal((3, 2)).astype(np.float32), "w2")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    data = Dataset({"x": rng.uniform(0, 1, (40, 4)).astype(np.float32)})
    options = MagnitudePruneOptions(sparsity=4 / 12, skip_first=False, importance="entropy")
    pruned, result = _run(MagnitudePrunePass(options, data=data), model)
    after = _weights(pruned)["w1"]
    assert np.all(after[:, 0] == 0) and np.all(after[:, 1:] != 0)
    assert result.stats["importance"] == "entropy"
    plain, _ = _run(MagnitudePrunePass(MagnitudePruneOptions(sparsity=4 / 12, skip_first=False)),
                    model)  # fmt: skip
    assert np.all(_weights(plain)["w1"][:, 0] != 0)  # by magnitude alone it would stay


def test_cli_prunes_digits_cnn_and_inspect_sees_the_sparsity(capsys, tmp_path: Path):
    out, report = tmp_path / "pruned.onnx", tmp_path / "report.json"
    args = ["optimize", str(MODELS / "digits_cnn.onnx"), "--passes", "prune:sparsity=0.5",
            "--data", str(MODELS / "digits_eval.npz"), "--check-samples", "64",
            "-o", str(out), "--report", str(report)]  # fmt: skip
    assert main(args) == 0
    record = json.loads(report.read_text())["records"][0]
    assert record["name"] == "prune" and record["accuracy"] is not None
    written = {t.name: numpy_helper.to_array(t) for t in onnx.load(out).graph.initializer}
    for name, sparsity in record["stats"]["per_tensor"].items():
        assert sparsity == 0.5 and _sparsity(written[name]) == 0.5
    assert set(record["stats"]["per_tensor"]) == {
        "block.conv1.weight", "block.conv2.weight", "conv3.0.weight", "fc1.weight"
    }  # fmt: skip
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    inspected = json.loads(capsys.readouterr().out)["sparsity"]
    counted = [a for a in written.values() if a.ndim >= 2 and a.dtype.kind == "f"]
    zeros = sum(a.size - np.count_nonzero(a) for a in counted)
    assert inspected == pytest.approx(zeros / sum(a.size for a in counted))
    assert inspected > 0.45  # the pruned tensors hold most of the weights


def test_pruning_after_quantisation_says_the_weights_are_quantised():
    """Regression: int8,prune said only 'no weights to prune' (found in review)."""
    _, report = onnxcomp.optimize(
        MODELS / "digits_cnn.onnx", "int8,prune:skip_first=false:skip_last=false", check="none"
    )
    notes = report.records[1].notes
    assert not report.records[1].modified
    assert any("already quantised" in n for n in notes), notes


def test_weights_held_in_constant_nodes_are_pruned():
    """Regression: prune ignored weights in Constant nodes without a note (found in review)."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(
            rng.standard_normal((8, 8)).astype(np.float32), "wv")),
         helper.make_node("MatMul", ["x", "w"], ["y"])],
        "const_weight",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
    )  # fmt: skip
    model = ir.serde.deserialize_model(helper.make_model(graph))
    result = MagnitudePrunePass(MagnitudePruneOptions(sparsity=0.5, **EVERY_LAYER))(model)
    assert result.modified and result.stats["sparsity"] == 0.5


def _reference_deflated(array: np.ndarray) -> int:
    """The deflate estimate as prune computed it before it ran on threads: the whole array up
    to 512 KB, else 8 evenly spaced 64 KB chunks scaled up to the array's size."""
    raw = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    if raw.size <= 1 << 19:
        return len(zlib.compress(raw.tobytes(), 6))
    starts = np.linspace(0, raw.size - (1 << 16), 8).astype(np.int64)
    sampled = sum(len(zlib.compress(raw[s : s + (1 << 16)].tobytes(), 6)) for s in starts)
    return int(sampled * raw.size / (1 << 19))


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_layer_pruning_writes_the_masked_weights_and_the_same_stats(dtype, monkeypatch):
    # Ties at every threshold (weights on a 0.1 grid); w1 is past the 512 KB deflate sample.
    monkeypatch.setattr(prune_module, "_ZIP_PENDING", 1)  # w1's sizes are added before w2's
    rng = np.random.default_rng(4)
    w1 = (rng.integers(-20, 21, (400, 400)) / 10).astype(dtype)
    w2 = (rng.integers(-20, 21, (400, 8)) / 10).astype(dtype)
    w2[:, 0] = 0  # zeros already: 1/8 of w2
    elem = TensorProto.FLOAT if dtype == np.float32 else TensorProto.FLOAT16
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
         helper.make_node("Relu", ["h"], ["r"], name="relu"),
         helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")],
        "mlp", [helper.make_tensor_value_info("x", elem, ["N", 400])],
        [helper.make_tensor_value_info("y", elem, ["N", 8])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )  # fmt: skip
    original = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    for sparsity in (0.1, 0.37, 0.5):  # 0.1: w2's zeros are all it would prune
        pruned, result = _run(
            MagnitudePrunePass(MagnitudePruneOptions(sparsity=sparsity, **EVERY_LAYER)), original
        )
        after = _weights(pruned)
        zips_before = zips_after = rewritten = 0
        for name, w in (("w1", w1), ("w2", w2)):
            keep = magnitude_mask(np.abs(w).astype(np.float32), sparsity)
            want = np.where(keep, w, np.zeros((), w.dtype))
            zeros = want.size - np.count_nonzero(want)
            assert result.stats["per_tensor"][name] == round(zeros / w.size, 4)
            if zeros == w.size - np.count_nonzero(w):
                np.testing.assert_array_equal(after[name], w)  # left as it was
                continue
            assert after[name].tobytes() == want.tobytes()
            zips_before += _reference_deflated(w)
            zips_after += _reference_deflated(want)
            rewritten += 1
        assert rewritten == result.stats["tensors"] == (1 if sparsity == 0.1 else 2)
        assert result.stats["zip_bytes_before"] == zips_before
        assert result.stats["zip_bytes_after"] == zips_after


def _chain(shapes: list[tuple[int, int]], seed: int = 5) -> tuple[onnx.ModelProto, dict]:
    """x -> MatMul(w0) -> Relu -> MatMul(w1) -> ... for weights of ``shapes`` (chained dims)."""
    rng = np.random.default_rng(seed)
    weights = {f"w{i}": rng.standard_normal(shape).astype(np.float32) for i, shape in
               enumerate(shapes)}  # fmt: skip
    nodes, name = [], "x"
    for i in range(len(shapes)):
        nodes.append(helper.make_node("MatMul", [name, f"w{i}"], [f"h{i}"], name=f"mm{i}"))
        nodes.append(helper.make_node("Relu", [f"h{i}"], [f"r{i}"], name=f"relu{i}"))
        name = f"r{i}"
    graph = helper.make_graph(
        nodes, "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", shapes[0][0]])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", shapes[-1][1]])],
        [numpy_helper.from_array(w, k) for k, w in weights.items()],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), weights


def test_streamed_pruning_reuses_written_results_memory_and_writes_every_weight_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # A streamed model's results go to scratch data behind the pass; their memory is reused
    # for later weights. Writes made slow: memory reused before its write ended would put a
    # later weight's bytes in the file.
    monkeypatch.setattr(weights_module, "SCRATCH_MIN_BYTES", 1024)
    write_at = io._write_at

    def slow_write(*args):
        time.sleep(0.02)
        write_at(*args)

    monkeypatch.setattr(io, "_write_at", slow_write)
    taken = []
    take = prune_module._ResultMemory.take

    def spy(self, shape):
        taken.append(take(self, shape))
        return taken[-1]

    monkeypatch.setattr(prune_module._ResultMemory, "take", spy)
    shapes = [(64, 256), (256, 64), (64, 256), (256, 32), (32, 64), (64, 256), (256, 8)]
    model, weights = _chain(shapes)
    onnx.save(model, tmp_path / "in.onnx")
    for sparsity in (0.5, 0.8):
        out = tmp_path / f"out{sparsity}.onnx"
        taken.clear()
        onnxcomp.optimize(
            tmp_path / "in.onnx", f"prune:sparsity={sparsity}:skip_first=false:skip_last=false",
            output=out, check="none", stream_above=0, bound=LOSS_ALLOWED,
        )  # fmt: skip
        written = _weights(onnx.load(out))
        for name, w in weights.items():
            want = np.where(magnitude_mask(np.abs(w), sparsity), w, np.float32(0))
            assert written[name].tobytes() == want.tobytes(), (sparsity, name)
        memories = {id(array.base) for array in taken}
        assert len(taken) == len(shapes) and len(memories) <= 3, len(memories)


def test_result_memory_is_reused_only_once_its_tensor_is_gone():
    memory = prune_module._ResultMemory()
    first = memory.take((8, 16))
    tensor = ir.tensor(first)
    memory.lend(first, tensor)
    second = memory.take((4, 16))  # the first is held: new memory
    assert not np.shares_memory(first, second)
    memory.lend(second, ir.tensor(second))  # a tensor gone at once: free
    del tensor
    third = memory.take((4, 8))  # both free: the smaller that fits, the other let go
    assert np.shares_memory(third, second) and third.shape == (4, 8)
    assert len(memory._blocks) == 1
    kept = ir.tensor(third)
    memory.lend(third, kept)
    fourth = memory.take((100,))  # too big for any free memory: new memory
    assert fourth.shape == (100,) and not np.shares_memory(fourth, third)
    held = [ir.tensor(fourth)]
    memory.lend(fourth, held[0])
    for _ in range(3):  # results a model keeps: each new, and only the latest two are kept
        array = memory.take((100,))
        assert not any(np.shares_memory(array, t.numpy()) for t in held)
        held.append(ir.tensor(array))
        memory.lend(array, held[-1])
        assert len(memory._blocks) <= 2
