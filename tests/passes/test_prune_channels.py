"""prune-channels: tensors shrink, and the pruned model computes exactly what the original
computes with the removed channels' contributions zeroed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxcomp
from onnxcomp.analysis.channels import Partition
from onnxcomp.cli import main
from onnxcomp.data import Dataset
from onnxcomp.errors import UsageError
from onnxcomp.passes import ChannelPruneOptions, ChannelPrunePass
from onnxcomp.passes.prune_channels import even_keep, global_keep_counts, kept_units, top_units
from tests.conftest import LOSS_ALLOWED, MODELS, conv_bn_residual_model, run_onnx
from tests.matrix_cases import zoo_layout
from tests.robustness_models import (
    ROBUSTNESS_MODELS,
    attention_model,
    nothing_prunable_model,
    shuffle_unit_model,
)


def _run(options: ChannelPruneOptions, model: onnx.ModelProto, data: Dataset | None = None):
    ir_model = ir.serde.deserialize_model(model)
    result = ChannelPrunePass(options, data=data)(ir_model)
    pruned = ir.serde.serialize_model(ir_model)
    onnx.checker.check_model(pruned, full_check=True)
    return pruned, result


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _removed(before: np.ndarray, after: np.ndarray) -> list[int]:
    """Indices of ``before``'s entries that ``after`` (a 1-D subset, distinct values) lacks."""
    kept = {int(np.flatnonzero(before == v)[0]) for v in after}
    return sorted(set(range(len(before))) - kept)


def _zeroed(model: onnx.ModelProto, cuts: dict[str, tuple[int, list[int]]]) -> onnx.ModelProto:
    """``model`` with the listed positions of each weight (name -> (axis, positions)) zeroed."""
    zeroed = onnx.ModelProto()
    zeroed.CopyFrom(model)
    for init in zeroed.graph.initializer:
        if init.name in cuts:
            axis, where = cuts[init.name]
            array = numpy_helper.to_array(init).copy()
            index = [slice(None)] * array.ndim
            index[axis] = where
            array[tuple(index)] = 0
            init.CopyFrom(numpy_helper.from_array(array, init.name))
    return zeroed


def _blocks(channels: list[int], block: int) -> list[int]:
    return [c * block + k for c in channels for k in range(block)]


def test_cnn_with_residual_equals_the_original_with_removed_channels_zeroed():
    original = conv_bn_residual_model()
    pruned, result = _run(ChannelPruneOptions(ratio=0.5), original)
    w, w0 = _weights(pruned), _weights(original)
    # residual group (conv1 + conv2 outputs, 4 -> 2) and the Gemm's hidden units (8 -> 4)
    assert w["w1"].shape == (2, 1, 3, 3) and w["w2"].shape == (2, 2, 3, 3)
    assert w["b2"].shape == (2,) and w["bn1.var"].shape == (2,) and w["bn2.scale"].shape == (2,)
    assert w["fc_w"].shape == (32, 4) and w["fc_b"].shape == (4,) and w["bn3.mean"].shape == (4,)
    assert w["mm_w"].shape == (4, 6) and w["mm_b"].shape == (6,)  # feeds the output: kept
    assert result.modified and result.stats["groups_pruned"] == 2
    assert result.stats["params_after"] < result.stats["params_before"]
    residual = _removed(w0["bn1.scale"], w["bn1.scale"])
    hidden = _removed(w0["bn3.scale"], w["bn3.scale"])
    assert len(residual) == 2 and len(hidden) == 4
    reference = _zeroed(original, {
        "w2": (1, residual), "fc_w": (0, _blocks(residual, 16)), "mm_w": (0, hidden),
    })  # fmt: skip
    x = np.random.default_rng(1).standard_normal((5, 1, 4, 4)).astype(np.float32)
    (got,), (want,) = run_onnx(pruned, {"x": x}), run_onnx(reference, {"x": x})
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    (dense,) = run_onnx(original, {"x": x})
    assert np.abs(dense - want).max() > 1e-2  # the zeroing matters: the test can fail


def test_attention_heads_and_mlp_equal_the_original_with_removed_heads_zeroed():
    original = attention_model()
    pruned, result = _run(ChannelPruneOptions(ratio=0.5), original)
    w, w0 = _weights(pruned), _weights(original)
    q_bias, fc1_bias = "bias6", "bias40"  # q projection bias [16]; MLP hidden bias [32]
    assert w[q_bias].shape == (8,) and w[fc1_bias].shape == (16,)
    assert w["w5"].shape == (16, 8) and w["w31"].shape == (8, 16)  # q proj and output proj
    assert w["w51"].shape == (16, 16)  # MLP down projection
    assert "16->8 (4->2 heads)" in result.stats["channels"].values()
    heads = sorted({p // 4 for p in _removed(w0[q_bias], w[q_bias])})
    assert len(heads) == 2
    units = _removed(w0[fc1_bias], w[fc1_bias])
    reference = _zeroed(original, {"w31": (0, _blocks(heads, 4)), "w51": (0, units)})
    x = np.random.default_rng(2).standard_normal((3, 5, 16)).astype(np.float32)
    (got,), (want,) = run_onnx(pruned, {"x": x}), run_onnx(reference, {"x": x})
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_tiny_encoder_equals_the_original_with_removed_heads_and_units_zeroed():
    original = onnx.load(MODELS / "tiny_encoder.onnx")
    pruned, result = _run(ChannelPruneOptions(ratio=0.5), original)
    w, w0 = _weights(pruned), _weights(original)
    cuts = {}
    for layer in (0, 1):
        p = f"layers.{layer}."
        assert w[p + "attn.q_proj.weight.T"].shape == (64, 32)
        assert w[p + "attn.out_proj.weight.T"].shape == (32, 64)
        assert w[p + "fc1.weight.T"].shape == (64, 64) and w[p + "fc2.weight.T"].shape == (64, 64)
        heads = sorted({i // 16 for i in _removed(w0[p + "attn.v_proj.bias"],
                                                  w[p + "attn.v_proj.bias"])})  # fmt: skip
        assert len(heads) == 2
        cuts[p + "attn.out_proj.weight.T"] = (0, _blocks(heads, 16))
        cuts[p + "fc2.weight.T"] = (0, _removed(w0[p + "fc1.bias"], w[p + "fc1.bias"]))
    assert result.stats["groups_pruned"] == 4
    with np.load(MODELS / "encoder_eval.npz") as z:
        feeds = {k: z[k][:16, :20] for k in ("input_ids", "attention_mask")}
    (got,), (want,) = run_onnx(pruned, feeds), run_onnx(_zeroed(original, cuts), feeds)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)


def test_kept_units_round_up_to_round_to_and_respect_min_channels():
    assert kept_units(32, 1, 0.5, 1, 1) == 16
    assert kept_units(32, 1, 0.6, 8, 1) == 16  # 13 kept -> 16
    assert kept_units(20, 1, 0.5, 16, 1) == 16
    assert kept_units(12, 1, 0.5, 16, 1) == 12  # no multiple of 16 below 12: keep all
    assert kept_units(4, 16, 0.5, 8, 1) == 2  # heads of 16 channels are multiples of 8
    assert kept_units(8, 1, 0.9, 1, 4) == 4
    assert kept_units(3, 1, 0.99, 1, 1) == 1


def test_top_units_keeps_the_highest_scores_ties_to_the_lower_index():
    assert top_units(np.array([3.0, 1.0, 3.0, 2.0]), 2).tolist() == [0, 2]
    assert top_units(np.array([1.0, 1.0, 1.0]), 2).tolist() == [0, 1]


def test_global_scope_removes_the_ratio_of_all_channels_by_normalised_score():
    scores = [np.array([1.0, 1.0, 1.0, 1.0]), np.array([0.1, 10.0, 10.0, 10.0])]
    # group 0 is uniform; group 1 has one weak unit: it goes first, then group 0's
    keep = global_keep_counts(scores, [1, 1], 0.25, 1, 1)
    assert keep == [3, 3]
    assert global_keep_counts(scores, [1, 1], 0.9, 1, 1) == [1, 1]


def test_round_to_keeps_channel_counts_multiples_of_8_on_digits_cnn():
    original = onnx.load(MODELS / "digits_cnn.onnx")
    pruned, result = _run(ChannelPruneOptions(ratio=0.6, round_to=8), original)
    w = _weights(pruned)
    assert w["stem.0.weight"].shape[0] == 16 and w["conv3.0.weight"].shape[0] == 32
    assert w["fc1.weight"].shape == (32, 32 * 4)
    assert all(v.split("->")[1].isdigit() and int(v.split("->")[1]) % 8 == 0
               for v in result.stats["channels"].values())  # fmt: skip


@pytest.mark.parametrize("importance", ["l1", "l2", "bn-scale"])
def test_importance_keeps_the_strongest_channels(importance):
    original = conv_bn_residual_model()
    w0 = _weights(original)
    pruned, result = _run(ChannelPruneOptions(ratio=0.5, importance=importance), original)
    w = _weights(pruned)
    if importance == "bn-scale":
        score = np.abs(w0["bn3.scale"])
    else:
        power = 1 if importance == "l1" else 2
        score = (np.abs(w0["fc_w"]) ** power).sum(axis=0)
    kept = sorted(set(range(8)) - set(_removed(w0["bn3.scale"], w["bn3.scale"])))
    assert kept == sorted(np.argsort(-score, kind="stable")[:4].tolist())
    assert result.stats["importance"] == importance


def test_entropy_importance_removes_dead_hidden_units_first():
    # Units 0 and 1 have the largest weights but never pass the ReLU (entropy 0).
    rng = np.random.default_rng(0)
    w1 = rng.uniform(0.1, 0.5, (4, 6)).astype(np.float32)
    w1[:, :2] = -5.0
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
         helper.make_node("Relu", ["h"], ["r"], name="relu"),
         helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")],
        "dead",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
        [numpy_helper.from_array(w1, "w1"),
         numpy_helper.from_array(rng.standard_normal((6, 2)).astype(np.float32), "w2")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    data = Dataset({"x": rng.uniform(0, 1, (40, 4)).astype(np.float32)})
    pruned, _ = _run(ChannelPruneOptions(ratio=1 / 3, importance="entropy"), model, data)
    assert np.all(_weights(pruned)["w1"] > 0)  # both dead units went
    plain, _ = _run(ChannelPruneOptions(ratio=1 / 3), model)
    assert np.all(_weights(plain)["w1"][:, :2] == -5.0)  # by l1 they would stay


def test_entropy_importance_without_data_is_refused():
    with pytest.raises(UsageError, match="--data"):
        onnxcomp.optimize(ir.serde.deserialize_model(conv_bn_residual_model()),
                          "prune-channels:importance=entropy")  # fmt: skip


def test_excluded_layers_and_heads_false_are_skipped_with_a_note():
    options = ChannelPruneOptions(ratio=0.5, exclude=("w39",), heads=False)
    pruned, result = _run(options, attention_model())
    w = _weights(pruned)
    assert w["w5"].shape == (16, 16) and w["w39"].shape == (16, 32)
    assert not result.modified and result.stats["groups_pruned"] == 0
    assert any("w5+w10+w15 (16 channels): attention heads (heads=false)" in n
               for n in result.notes)  # fmt: skip
    assert any("w39 (32 channels): excluded by pattern" in n for n in result.notes)


def test_nothing_prunable_gives_a_clear_note_not_an_error():
    _, report = onnxcomp.optimize(
        ir.serde.deserialize_model(nothing_prunable_model()), "prune-channels"
    )
    record = report.records[0]
    assert not record.modified and record.stats["groups_pruned"] == 0
    assert record.notes[0] == "no prunable channel groups: reaches graph output 'conv3'"


@pytest.mark.parametrize(
    ("name", "skipped"),
    [
        ("resnet", []),
        ("mobilenet_v2", []),
        ("inception", []),
        ("grouped_conv", []),
        ("shared_weight", []),
        ("attention", ["normalizes over it"]),
    ],
)
def test_robustness_graphs_shrink_and_keep_their_output_shapes(name, skipped):
    original = ROBUSTNESS_MODELS[name]()
    model, report = onnxcomp.optimize(
        ir.serde.deserialize_model(original), "prune-channels:ratio=0.5", bound=LOSS_ALLOWED
    )  # the pipeline runs the checker and ONNX Runtime on the result (random weights: the
    # outputs move far, which the loss bound would refuse)
    record = report.records[0]
    pruned = ir.serde.serialize_model(model)
    onnx.checker.check_model(pruned, full_check=True)
    assert record.stats["params_after"] < 0.8 * record.stats["params_before"]
    for needle in [*skipped, "reaches graph output"]:
        assert any(needle in note for note in record.notes), needle
    shape = [3, *[d.dim_value for d in original.graph.input[0].type.tensor_type.shape.dim][1:]]
    if name == "attention":
        shape = [3, 7, 16]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    got, want = run_onnx(pruned, {"x": x}), run_onnx(original, {"x": x})
    assert [g.shape for g in got] == [w.shape for w in want]


def test_cli_prunes_digits_cnn_by_l1_and_by_entropy(tmp_path: Path):
    for importance in ("l1", "entropy"):
        out, report = tmp_path / f"{importance}.onnx", tmp_path / f"{importance}.json"
        args = ["optimize", str(MODELS / "digits_cnn.onnx"), "--passes",
                f"prune-channels:ratio=0.5:importance={importance}", "-o", str(out),
                "--report", str(report), "--allow-loss"]  # fmt: skip
        if importance == "entropy":
            args += ["--data", str(MODELS / "digits_eval.npz"), "--check-samples", "64"]
        assert main(args) == 0
        record = json.loads(report.read_text())["records"][0]
        assert record["stats"]["params_after"] < 0.3 * record["stats"]["params_before"]
        assert record["stats"]["groups_pruned"] == 4
        x = np.random.default_rng(0).standard_normal((2, 1, 8, 8)).astype(np.float32)
        (logits,) = run_onnx(out, {"input": x})
        assert logits.shape == (2, 10) and np.isfinite(logits).all()


@pytest.mark.parametrize(
    ("build", "needle"),
    [
        (lambda: ChannelPruneOptions(ratio=1.0), "[0, 1)"),
        (lambda: ChannelPruneOptions(round_to=0), "round_to"),
        (lambda: ChannelPruneOptions(min_channels=0), "min_channels"),
    ],
)
def test_bad_options_are_refused(build, needle):
    with pytest.raises(UsageError) as error:
        build()
    assert needle in str(error.value)


def _attr(node: onnx.NodeProto, name: str, default=None):
    found = [helper.get_attribute_value(a) for a in node.attribute if a.name == name]
    return found[0] if found else default


def _masked_reference(original: onnx.ModelProto, pruned: onnx.ModelProto) -> onnx.ModelProto:
    """``original`` with each removed channel's input slice zeroed in the layer that reads it,
    worked out from the graph here (not from the analysis): the channels a Conv lost are those
    whose BatchNormalization scales are gone; they are followed through Relu, BatchNorm,
    depthwise Conv and ShuffleNet's Reshape [g, k] - Transpose - Reshape (channel c moves to
    (c % k) * g + c // k) to the next Conv, whose filters of the group reading them lose them
    (or to a Gemm after global pooling)."""
    w0, w1 = _weights(original), _weights(pruned)
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in original.graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    producers = {out: node for node in original.graph.node for out in node.output}

    def depthwise(node: onnx.NodeProto) -> bool:
        return node.op_type == "Conv" and w0[node.input[1]].shape[1] == 1 and _attr(
            node, "group", 1) > 1  # fmt: skip

    zeroed: dict[str, np.ndarray] = {}
    for bn in original.graph.node:
        conv = producers.get(bn.input[0])
        if bn.op_type != "BatchNormalization" or conv is None or conv.op_type != "Conv" or \
                depthwise(conv) or w1[bn.input[1]].shape == w0[bn.input[1]].shape:  # fmt: skip
            continue
        index = np.array(_removed(w0[bn.input[1]], w1[bn.input[1]]))
        node = bn
        while True:
            (node,) = users[node.output[0]]
            if node.op_type == "Reshape" and users[node.output[0]][0].op_type == "Transpose":
                g, k = (int(d) for d in w0[node.input[1]][1:3])
                index = (index % k) * g + index // k
                node = users[users[node.output[0]][0].output[0]][0]  # the Reshape back
            elif (node.op_type == "Conv" and not depthwise(node)) or node.op_type == "Gemm":
                break
        weight = zeroed.get(node.input[1], w0[node.input[1]].copy())
        if node.op_type == "Gemm":  # after global pooling: one column per channel (transB=1)
            weight[:, index] = 0
        groups = _attr(node, "group", 1)
        rows, per = weight.shape[0] // groups, weight.shape[1]
        for p in index if node.op_type == "Conv" else []:
            weight[(p // per) * rows : (p // per + 1) * rows, p % per] = 0
        zeroed[node.input[1]] = weight
    reference = onnx.ModelProto()
    reference.CopyFrom(original)
    for init in reference.graph.initializer:
        if init.name in zeroed:
            init.CopyFrom(numpy_helper.from_array(zeroed[init.name], init.name))
    return reference


def test_shuffle_unit_equals_the_original_with_removed_channels_zeroed():
    original = shuffle_unit_model()
    pruned, result = _run(ChannelPruneOptions(ratio=0.25), original)
    assert result.stats["groups_pruned"] == 3
    # 9 -> 6 (a multiple of the 3 runs the grouped Conv reads); 30 -> 24 (8 per group, rows
    # of 8 after the shuffle, 8 per run of the second grouped Conv); 12 -> 9
    assert sorted(result.stats["channels"].values()) == ["12->9", "30->24", "9->6"]
    shapes = {n.name: _weights(pruned)[n.input[1]].shape for n in pruned.graph.node
              if n.op_type == "Conv"}  # fmt: skip
    assert shapes == {"conv2_node": (6, 6, 1, 1), "conv10_node": (24, 2, 1, 1),
                      "conv23_node": (24, 1, 3, 3), "conv30_node": (9, 8, 1, 1),
                      "conv39_node": (5, 9, 1, 1)}  # fmt: skip
    targets = [_weights(pruned)[n.input[1]].tolist() for n in pruned.graph.node
               if n.op_type == "Reshape"]  # fmt: skip
    assert targets == [[0, 3, 8, 5, 5], [0, 24, 5, 5]]
    reference = _masked_reference(original, pruned)
    x = np.random.default_rng(4).standard_normal((3, 6, 5, 5)).astype(np.float32)
    (got,), (want,), (dense,) = (run_onnx(m, {"x": x}) for m in (pruned, reference, original))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert np.abs(dense - want).max() > 1e-2  # the zeroing matters: the test can fail


def test_grouped_conv_without_shuffle_equals_the_original_with_removed_channels_zeroed():
    original = ROBUSTNESS_MODELS["grouped_conv"]()
    pruned, result = _run(ChannelPruneOptions(ratio=0.5), original)
    assert result.stats["groups_pruned"] == 3  # before, in and after the grouped Conv
    grouped = next(n for n in pruned.graph.node if _attr(n, "group", 1) == 2)
    assert _weights(pruned)[grouped.input[1]].shape == (4, 2, 3, 3)  # 2 of 4 per group
    reference = _masked_reference(original, pruned)
    x = np.random.default_rng(5).standard_normal((3, 3, 8, 8)).astype(np.float32)
    (got,), (want,) = run_onnx(pruned, {"x": x}), run_onnx(reference, {"x": x})
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_even_keep_keeps_the_best_channels_each_part_may_keep():
    # two Conv groups of 3: keep 2 in each, though the 4 best are 0, 1, 2, 5
    score = np.array([5.0, 4.0, 3.0, 0.0, 1.0, 2.0])
    assert even_keep(score, [Partition(2)], 4).tolist() == [0, 1, 4, 5]
    # behind a shuffle of 2 rows of 3, read by a Conv of 2 groups: channels 0..5 sit at
    # 0, 2, 4, 1, 3, 5, so groups {0, 1, 3} and {2, 4, 5}; 4 kept channels must be (row 0,
    # group 0), (row 0, group 1), (row 1, group 0), (row 1, group 1) in this order
    score = np.array([1.0, 9.0, 0.1, 0.2, 3.0, 8.0])
    shuffled = [Partition(2), Partition(2, (2, 3))]
    assert even_keep(score, shuffled, 4).tolist() == [1, 2, 3, 5]
    assert top_units(score, 4).tolist() == [0, 1, 4, 5]  # what an unconstrained pick keeps
    # 3 parts of 2 cannot keep 5: the nearest count they can keep is 3, the best of each pair
    assert even_keep(score, [Partition(3)], 5).tolist() == [1, 3, 5]


def test_zoo_shufflenet_shrinks_and_equals_the_original_with_removed_channels_zeroed(
    tmp_path: Path,
):
    original = zoo_layout("shufflenet")  # IR 3, weights also graph inputs, random weights
    source, output = tmp_path / "shufflenet.onnx", tmp_path / "pruned.onnx"
    onnx.save(original, source)
    _, report = onnxcomp.optimize(source, "prune-channels:ratio=0.25", output=output,
                                  bound=LOSS_ALLOWED)  # fmt: skip
    # the 16 bottlenecks' channels, between their two grouped Convs across the shuffle (the
    # residual streams run through Concats into grouped Convs: left whole)
    assert report.records[0].stats["groups_pruned"] == 16
    assert report.file_bytes_after < 0.9 * source.stat().st_size  # 0.852x
    pruned = onnx.load(output)
    reference = _masked_reference(original, pruned)
    x = np.random.default_rng(6).standard_normal((1, 3, 224, 224)).astype(np.float32)
    feeds = {original.graph.input[0].name: x}
    (got,), (want,) = run_onnx(pruned, feeds), run_onnx(reference, feeds)
    assert got.shape == want.shape == (1, 1000)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_even_keep_takes_the_same_set_by_runs_or_by_the_dynamic_programme():
    rng = np.random.default_rng(7)
    score = rng.random(30)
    ordered = [Partition(3), Partition(3, (3, 10))]  # labels rise with the channel index
    reordered = ordered[::-1]  # the same constraints; labels no longer rise: the programme
    for keep in (24, 21, 15):
        runs = even_keep(score, ordered, keep)
        assert runs is not None and len(runs) == keep
        assert runs.tolist() == even_keep(score, reordered, keep).tolist()
