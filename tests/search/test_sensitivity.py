"""Per-layer sensitivity and the culprit finder, on a model with one fragile layer."""

from __future__ import annotations

import pytest

import onnxcomp
from onnxcomp.errors import UsageError


def test_sensitivity_ranks_the_fragile_layer_first(fragile):
    report = onnxcomp.sensitivity(fragile["model"], fragile["data"], techniques="int8,int4")
    assert report.base_score == 100.0
    assert report.layers[0].name == "w2"
    fragile_row, *others = report.layers
    assert fragile_row.results["int8"].drop > 30  # the real weights of w2 round to zero
    for row in others:
        assert row.results["int8"].drop <= 3, (row.name, row.results["int8"])
    # bytes saved: int8 stores a quarter of the float32 weight bytes
    assert report.prefix_bytes - fragile_row.results["int8"].bytes > 0.6 * 32 * 32 * 4


def test_sensitivity_in_worker_processes_matches_one_process(fragile):
    serial = onnxcomp.sensitivity(fragile["model"], fragile["data"], techniques="int4,prune")
    parallel = onnxcomp.sensitivity(fragile["model"], fragile["data"], techniques="int4,prune",
                                    workers=2)  # fmt: skip
    assert [r.name for r in parallel.layers] == [r.name for r in serial.layers]
    for a, b in zip(serial.layers, parallel.layers, strict=True):
        for technique in ("int4", "prune"):
            x, y = a.results[technique], b.results[technique]
            assert (x is None) == (y is None)
            if x is not None:
                assert (x.drop, x.bytes) == (y.drop, y.bytes)


def test_culprit_finder_blames_the_fragile_layer(fragile):
    report = onnxcomp.sensitivity(fragile["model"], fragile["data"], passes="int8")
    assert report.pipeline_outcome.drop > 30
    top = report.culprits[0]
    assert top.name == "w2"
    assert top.recovery == pytest.approx(report.pipeline_outcome.drop, abs=3)
    assert top.share > 0.8


def test_unknown_technique_is_a_usage_error(fragile):
    with pytest.raises(UsageError, match="unknown technique 'int3'"):
        onnxcomp.sensitivity(fragile["model"], fragile["data"], techniques="int8,int3")
