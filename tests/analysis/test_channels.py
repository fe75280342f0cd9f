"""Channel groups: which slices of which tensors the analysis couples, and what it refuses."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_ir.passes import common as common_passes

from onnxcomp.analysis.channels import (
    ChannelGroup,
    Partition,
    Segment,
    analyze_channels,
    positions,
)
from tests.conftest import MODELS, conv_bn_residual_model
from tests.robustness_models import (
    grouped_conv_model,
    inception_model,
    mobilenet_v2_model,
    shared_weight_model,
    shuffle_unit_model,
)


def _analyze(model: onnx.ModelProto | ir.Model):
    if isinstance(model, onnx.ModelProto):
        model = ir.serde.deserialize_model(model)
    common_passes.ShapeInferencePass()(model)
    return analyze_channels(model)


def _slots(group: ChannelGroup) -> set[tuple[str, int, str]]:
    return {(m.value.name, m.axis, m.role) for m in group.members}


def _group_with(analysis, name: str) -> ChannelGroup:
    (group,) = [g for g in analysis.groups if any(m.value.name == name and m.role == "out"
                                                   for m in g.members)]  # fmt: skip
    return group


def test_positions_cover_whole_units_of_blocks():
    flat = Segment(0, Fraction(8), Fraction(4))  # after Flatten: 4 rows per channel, at 8
    assert positions(flat, 1, [0, 2]).tolist() == [8, 9, 10, 11, 16, 17, 18, 19]
    heads = Segment(0, Fraction(0), Fraction(1, 16))  # a head axis: 16 channels per position
    assert positions(heads, 16, [1, 3]).tolist() == [1, 3]
    with pytest.raises(ValueError):
        positions(heads, 8, [0])


def test_residual_add_joins_both_branches_and_flatten_maps_channels_to_row_blocks():
    analysis = _analyze(conv_bn_residual_model())
    residual = _group_with(analysis, "w1")
    assert residual.safe and residual.channels == 4
    assert _slots(residual) == {
        ("w1", 0, "out"), ("w2", 1, "in"), ("w2", 0, "out"), ("b2", 0, "bias"),
        ("bn1.scale", 0, "bn-scale"), ("bn1.bias", 0, "param"), ("bn1.mean", 0, "param"),
        ("bn1.var", 0, "param"), ("bn2.scale", 0, "bn-scale"), ("bn2.bias", 0, "param"),
        ("bn2.mean", 0, "param"), ("bn2.var", 0, "param"), ("fc_w", 0, "in"),
    }  # fmt: skip
    (fc_in,) = [m for m in residual.members if m.value.name == "fc_w"]
    assert fc_in.segment.block == 16  # Flatten of [N,4,4,4]: each channel is 16 rows
    fc = _group_with(analysis, "fc_w")
    assert fc.safe and ("mm_w", 0, "in") in _slots(fc) and ("bn3.scale", 0, "bn-scale") in \
        _slots(fc)  # fmt: skip
    last = _group_with(analysis, "mm_w")
    assert not last.safe and last.reasons == ["reaches graph output 'y'"]


def test_digits_cnn_groups():
    analysis = _analyze(ir.load(MODELS / "digits_cnn.onnx"))
    safe = sorted(g.name for g in analysis.groups if g.safe)
    assert safe == ["block.conv1.weight", "conv3.0.weight", "fc1.weight",
                    "stem.0.weight+block.conv2.weight"]  # fmt: skip
    conv3 = _group_with(analysis, "conv3.0.weight")
    (fc1,) = [m for m in conv3.members if m.value.name == "fc1.weight"]
    assert (fc1.axis, fc1.segment.block) == (1, 4)  # Reshape [-1, 256] of [N,64,2,2]
    assert [(e.node.name, e.position) for e in analysis.shape_edits] == [("node_Reshape_75", 1)]


def test_tiny_encoder_heads_and_mlp_are_groups_and_the_residual_stream_is_not():
    analysis = _analyze(ir.load(MODELS / "tiny_encoder.onnx"))
    for layer in (0, 1):
        prefix = f"layers.{layer}."
        heads = _group_with(analysis, prefix + "attn.q_proj.weight.T")
        assert heads.safe and heads.heads and (heads.channels, heads.unit, heads.units) == (
            64, 16, 4)  # fmt: skip
        assert {(prefix + f"attn.{p}_proj.weight.T", 1, "out") for p in "qkv"} <= _slots(heads)
        assert (prefix + "attn.out_proj.weight.T", 0, "in") in _slots(heads)
        mlp = _group_with(analysis, prefix + "fc1.weight.T")
        assert mlp.safe and not mlp.heads and mlp.channels == 128
        assert (prefix + "fc2.weight.T", 0, "in") in _slots(mlp)
    stream = _group_with(analysis, "layers.0.fc2.weight.T")
    assert not stream.safe and any("LayerNormalization" in r for r in stream.reasons)
    # q/k/v split Reshapes and the merge Reshape of both layers hold the head count / width
    assert len(analysis.shape_edits) == 8


def test_concat_places_each_branch_at_its_offset():
    analysis = _analyze(inception_model())
    offsets = {}
    for group in analysis.groups:
        for m in group.members:
            if m.role == "in" and m.value.const_value.shape[1] == 24:  # the Conv after Concat
                offsets[group.channels] = (int(m.segment.offset), group.safe)
    assert offsets == {8: (0, True), 12: (8, True), 4: (20, True)}


def test_depthwise_conv_joins_the_group_that_feeds_it():
    analysis = _analyze(mobilenet_v2_model())
    expand = [g for g in analysis.groups if any(m.role == "depthwise" for m in g.members)]
    assert len(expand) == 2 and all(g.safe and g.channels == 64 for g in expand)
    assert len(analysis.group_edits) == 2


def test_grouped_conv_splits_both_sides_into_parts_pruned_evenly():
    analysis = _analyze(grouped_conv_model())
    grouped = [g for g in analysis.groups if g.partitions]
    # the Conv before it (read in 2 runs of 4) and its own output (2 groups of 4 filters)
    assert len(grouped) == 2 and all(g.safe and g.channels == 8 for g in grouped)
    assert all(g.partitions == [Partition(2)] for g in grouped)
    reader = [m for g in grouped for m in g.members if m.groups == 2]
    assert len(reader) == 1 and reader[0].axis == 1 and reader[0].role == "in"


def test_channel_shuffle_is_followed_with_its_permutation_and_parts():
    analysis = _analyze(shuffle_unit_model())
    (group,) = [g for g in analysis.groups if g.channels == 30]
    # the grouped Conv making it (3 groups = the shuffle's 3 rows), the one reading it
    assert group.safe and group.partitions == [Partition(3), Partition(3, (3, 10))]
    (dw,) = [m for m in group.members if m.role == "depthwise" and m.index == 1]
    assert dw.segment.shuffle == (3, 10)
    assert positions(dw.segment, 1, [0, 1, 10, 29]).tolist() == [0, 3, 1, 29]
    assert [e.position for e in analysis.shape_edits] == [2, 1]  # rows of 10, then 30
    assert [e.divisor for e in analysis.shape_edits] == [3, 1]
    assert [e.axis for e in analysis.dim_edits] == [2, 1]


def test_weight_used_twice_couples_its_input_and_output_channels():
    analysis = _analyze(shared_weight_model())
    (group,) = [g for g in analysis.groups if any(m.value.name.startswith("shared")
                                                   for m in g.members)]  # fmt: skip
    axes = {(m.axis, m.role) for m in group.members if m.value.name.startswith("shared")}
    assert group.safe and axes == {(0, "out"), (1, "in")}


@pytest.mark.parametrize(
    ("op", "attrs", "needle"),
    [
        ("Softmax", {"axis": -1}, "Softmax 'mid' normalizes over it"),
        ("LayerNormalization", {}, "LayerNormalization 'mid' normalizes over it"),
        ("TopK", {}, "reaches TopK node 'mid', which the analysis does not know"),
        ("Relu", {}, None),
    ],
)
def test_ops_over_the_hidden_axis_make_the_group_unsafe(op, attrs, needle):
    rng = np.random.default_rng(0)
    inits = {"w1": rng.standard_normal((4, 6)), "w2": rng.standard_normal((6, 3))}
    extra = []
    if op == "LayerNormalization":
        inits["g"] = np.ones(6)
        extra = ["g"]
    if op == "TopK":
        inits["k"] = np.array([6])
        extra = ["k"]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
        helper.make_node(op, ["h", *extra], ["a"], name="mid", **attrs),
        helper.make_node("MatMul", ["a", "w2"], ["y"], name="mm2"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(a.astype(np.int64 if k == "k" else np.float32), k)
         for k, a in inits.items()],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    hidden = _group_with(_analyze(model), "w1")
    if needle is None:
        assert hidden.safe and ("w2", 0, "in") in _slots(hidden)
    else:
        assert not hidden.safe and len(hidden.reasons) == 1
        assert hidden.reasons[0].startswith(needle)
