"""Fuzzing: malformed models through every command give one line and exit 1 or 2, never a
traceback or an internal error, leave no output file and finish in bounded time and memory.

Mutations start from small valid models (tests.conftest) and are drawn by hypothesis: byte
flips and truncation of the file, and structural damage to the protobuf (wrong dtypes and
dims, dangling and duplicate names, cycles, a declared dim of 10^12, external data outside
the model's folder). CI runs hypothesis' ``ci`` profile (tests/conftest.py: a few hundred
command runs); ``benchmarks/fuzz.py`` runs thousands (``--hypothesis-profile=thorough``).
"""

from __future__ import annotations

import contextlib
import io
import resource
import time
from pathlib import Path

import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto

from onnxcomp.cli import main
from tests.conftest import conv_bn_residual_model, mlp_model

BASES = {"cnn": conv_bn_residual_model, "mlp": mlp_model}
# Every command a user runs on a model file; optimize with passes of each kind.
COMMANDS = [
    ["optimize", "{model}", "-p", "simplify,fold-bn", "-o", "{out}"],
    ["optimize", "{model}", "-p", "int8", "-o", "{out}", "--allow-loss"],
    ["optimize", "{model}", "-p", "int4,strip", "-o", "{out}", "--allow-loss"],
    ["optimize", "{model}", "-p", "prune:sparsity=0.5", "-o", "{out}", "--allow-loss"],
    ["optimize", "{model}", "-p", "prune-channels:ratio=0.25", "-o", "{out}", "--allow-loss"],
    ["optimize", "{model}", "-p", "int8-dynamic", "-o", "{out}", "--allow-loss"],
    ["optimize", "{model}", "-p", "fp16,lowrank", "-o", "{out}", "--allow-loss"],
    ["inspect", "{model}"],
    ["bench", "{model}", "--runs", "2", "--warmup", "0", "--no-memory"],
]
SECONDS_PER_RUN = 60  # generous: the machine may be loaded; a hang is minutes
PEAK_RSS_BYTES = 4 << 30  # the process's high-water mark; models here are kilobytes


def _run(args: list[str], model: Path, out: Path, capsys) -> tuple[int, list[str]]:
    argv = [a.format(model=model, out=out) for a in args]
    started = time.monotonic()
    with contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    assert time.monotonic() - started < SECONDS_PER_RUN, f"{argv} took too long"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    assert peak < PEAK_RSS_BYTES, f"{argv}: peak RSS {peak / 2**30:.1f} GiB"
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return code, err


def _assert_clean_outcome(code: int, err: list[str], out: Path, model_bytes: bytes,
                          model: Path) -> None:  # fmt: skip
    assert model.read_bytes() == model_bytes, "the input file was modified"
    if code == 0:
        if out.exists():  # a mutation the model survives: what was written must be valid
            onnx.checker.check_model(str(out), full_check=False)
        return
    assert code in (1, 2), (code, err)
    assert len(err) == 1, err
    assert err[0].startswith("onnxcomp: error:"), err
    assert "internal error" not in err[0], err[0]
    assert "Traceback" not in err[0]
    assert not out.exists(), "an output was written by a failed run"
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(".") or "tmp" in p.name]
    assert not leftovers, leftovers


def _check_all_commands(data: bytes, tmp_path: Path, capsys, commands=COMMANDS) -> None:
    model = tmp_path / "fuzzed.onnx"
    model.write_bytes(data)
    for number, args in enumerate(commands):
        out = tmp_path / f"out{number}" / "small.onnx"
        out.parent.mkdir(exist_ok=True)
        code, err = _run(args, model, out, capsys)
        _assert_clean_outcome(code, err, out, data, model)
        if out.exists():
            out.unlink()


@given(
    base=st.sampled_from(sorted(BASES)),
    flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)),
                   min_size=1, max_size=8),
)  # fmt: skip
@settings(max_examples=settings().max_examples // 2 or 1)
def test_byte_flips(base, flips, tmp_path, capsys):
    data = bytearray(BASES[base]().SerializeToString())
    for where, xor in flips:
        data[int(where * len(data))] ^= xor
    _check_all_commands(bytes(data), tmp_path, capsys, COMMANDS[:2] + COMMANDS[7:])


@given(base=st.sampled_from(sorted(BASES)), keep=st.floats(0, 1, exclude_max=True))
@settings(max_examples=settings().max_examples // 4 or 1)
def test_truncation(base, keep, tmp_path, capsys):
    data = BASES[base]().SerializeToString()
    truncated = data[: int(keep * len(data))]
    _check_all_commands(truncated, tmp_path, capsys, COMMANDS[:2] + COMMANDS[7:])


def _retype_initializer(model: onnx.ModelProto, draw) -> None:
    init = draw(st.sampled_from(list(model.graph.initializer)))
    init.data_type = draw(st.sampled_from(
        [TensorProto.INT8, TensorProto.INT64, TensorProto.DOUBLE, TensorProto.FLOAT16,
         TensorProto.BOOL, TensorProto.STRING, TensorProto.UINT4, 99]
    ))  # fmt: skip


def _redim_initializer(model: onnx.ModelProto, draw) -> None:
    init = draw(st.sampled_from(list(model.graph.initializer)))
    dims = draw(st.lists(st.integers(-2, 40), min_size=0, max_size=5))
    del init.dims[:]
    init.dims.extend(dims)


def _dangling_input(model: onnx.ModelProto, draw) -> None:
    node = draw(st.sampled_from([n for n in model.graph.node if n.input]))
    index = draw(st.integers(0, len(node.input) - 1))
    node.input[index] = "no_such_value"


def _duplicate_name(model: onnx.ModelProto, draw) -> None:
    kind = draw(st.sampled_from(["output", "initializer", "input"]))
    nodes = [n for n in model.graph.node if n.output]
    if kind == "output" and len(nodes) > 1:
        a, b = draw(st.permutations(nodes))[:2]
        b.output[0] = a.output[0]
    elif kind == "initializer" and model.graph.initializer:
        model.graph.initializer.append(model.graph.initializer[0])
    else:
        model.graph.input.append(model.graph.input[0])


def _cycle(model: onnx.ModelProto, draw) -> None:
    nodes = [n for n in model.graph.node if n.input and n.output]
    first, last = nodes[0], nodes[-1]
    first.input[0] = last.output[0]


def _huge_dim(model: onnx.ModelProto, draw) -> None:
    value = draw(st.sampled_from(list(model.graph.input) + list(model.graph.output)))
    dims = value.type.tensor_type.shape.dim
    if dims:
        dims[draw(st.integers(0, len(dims) - 1))].dim_value = 10**12


def _external_outside(model: onnx.ModelProto, draw) -> None:
    init = draw(st.sampled_from([i for i in model.graph.initializer if i.raw_data or i.float_data]))
    location = draw(st.sampled_from(["../outside.bin", "/etc/passwd", "sub/../../x.bin"]))
    init.ClearField("raw_data")
    init.ClearField("float_data")
    init.data_location = TensorProto.EXTERNAL
    del init.external_data[:]
    entry = init.external_data.add()
    entry.key, entry.value = "location", location


def _wrong_opset(model: onnx.ModelProto, draw) -> None:
    model.opset_import[0].version = draw(st.sampled_from([0, 1, 5, 999]))


MUTATIONS = {
    "retype": _retype_initializer,
    "redim": _redim_initializer,
    "dangling": _dangling_input,
    "duplicate": _duplicate_name,
    "cycle": _cycle,
    "huge_dim": _huge_dim,
    "external_outside": _external_outside,
    "opset": _wrong_opset,
}


@given(
    base=st.sampled_from(sorted(BASES)),
    mutations=st.lists(st.sampled_from(sorted(MUTATIONS)), min_size=1, max_size=2, unique=True),
    data=st.data(),
)
def test_structural_damage(base, mutations, data, tmp_path, capsys):
    model = BASES[base]()
    for name in mutations:
        MUTATIONS[name](model, data.draw)
    (tmp_path / "outside.bin").write_bytes(b"\0" * 4096)
    _check_all_commands(model.SerializeToString(), tmp_path / "models", capsys)


@pytest.fixture(autouse=True)
def _models_folder(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
