"""Crash safety of model writes, with real processes: SIGKILL mid-write, two writers at once.

Each child process loads a model and writes it with :func:`onnxcomp.io.save` (external data,
so a model is two files), with a hook that signals (a marker file) at a chosen point and then
waits there: inside the write of the temporary copy, or between renaming the data file and the
model file into place. The parent kills it there, or starts a second writer there.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from tests.conftest import REPO, conv_bn_residual_model

CHILD = """
import os, sys, time
from pathlib import Path
from onnxcomp import io

hook, source, output, marker, wait, after = sys.argv[1:7]
real_save, real_replace = io.ir.save, os.replace

def save(model, path, **kwargs):
    real_save(model, path, **kwargs)
    Path(marker).touch()
    time.sleep(float(wait))  # killed here: the temporary copy is written, nothing renamed

def replace(src, dst):
    real_replace(src, dst)
    # The rename into the output's folder, not one inside the temporary folder.
    if str(dst).endswith(".data") and Path(dst).parent == Path(output).parent:
        Path(marker).touch()
        time.sleep(float(wait))  # between the data file's rename and the model's

if hook == "in-save":
    io.ir.save = save
elif hook == "between-renames":
    os.replace = replace
model = io.load(source)
while after and not Path(after).exists():  # start writing once another writer is paused
    time.sleep(0.01)
io.save(model, output, external_data=True)
"""


def _source(folder: Path, name: str, seed: int) -> Path:
    path = folder / f"{name}.onnx"
    onnx.save(conv_bn_residual_model(seed), path, save_as_external_data=True,
              location=f"{name}.weights", size_threshold=0)  # fmt: skip
    return path


def _start(
    hook: str, source: Path, output: Path, marker: Path, wait: float, after: Path | None = None
) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [sys.executable, "-c", CHILD, hook, str(source), str(output), str(marker), str(wait),
            str(after or "")]  # fmt: skip
    return subprocess.Popen(args, env=env, cwd=REPO)


def _wait_for(marker: Path, child: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not marker.exists():
        assert child.poll() is None, f"the writer exited ({child.returncode}) before the hook"
        assert time.monotonic() < deadline, "the writer never reached the hook"
        time.sleep(0.02)


def _digest(*paths: Path) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in paths)).hexdigest()


def _weights(path: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}


def _same_weights(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_kill_while_writing_leaves_no_output_and_the_input_intact(tmp_path: Path):
    source = _source(tmp_path, "in", seed=0)
    before = _digest(source, tmp_path / "in.weights")
    out = tmp_path / "out.onnx"
    child = _start("in-save", source, out, tmp_path / "marker", wait=60)
    _wait_for(tmp_path / "marker", child)
    child.send_signal(signal.SIGKILL)
    child.wait(30)
    assert not out.exists() and not (tmp_path / "out.onnx.data").exists()
    assert _digest(source, tmp_path / "in.weights") == before
    onnx.checker.check_model(str(source))
    # The killed writer's temporary folder is removed by the next write of that output.
    assert [p.name for p in tmp_path.glob(".out.onnx.*")]
    rerun = _start("none", source, out, tmp_path / "unused", wait=0)
    assert rerun.wait(60) == 0
    assert not list(tmp_path.glob(".out.onnx.*"))
    onnx.checker.check_model(str(out))


def test_kill_between_the_renames_never_pairs_an_old_model_with_new_data(tmp_path: Path):
    """With an earlier output in place, a kill after the new data file is renamed in but
    before the model is leaves no model at all, not the old model reading the new data."""
    old, new = _source(tmp_path, "old", seed=0), _source(tmp_path, "new", seed=1)
    out = tmp_path / "out.onnx"
    done = _start("none", old, out, tmp_path / "unused", wait=0)
    assert done.wait(60) == 0 and _same_weights(_weights(out), _weights(old))
    child = _start("between-renames", new, out, tmp_path / "marker", wait=60)
    _wait_for(tmp_path / "marker", child)
    child.send_signal(signal.SIGKILL)
    child.wait(30)
    assert not out.exists()


def test_two_writers_to_one_output_leave_one_whole_model(tmp_path: Path):
    """Writer A pauses between renaming its data file and its model into place; writer B
    starts then. Without the folder lock B's data would land under A's model."""
    a, b = _source(tmp_path, "a", seed=0), _source(tmp_path, "b", seed=1)
    out = tmp_path / "out.onnx"
    second = _start("none", b, out, tmp_path / "unused", wait=0, after=tmp_path / "marker-a")
    first = _start("between-renames", a, out, tmp_path / "marker-a", wait=1)
    assert first.wait(60) == 0 and second.wait(60) == 0
    onnx.checker.check_model(str(out))
    written = _weights(out)
    assert _same_weights(written, _weights(a)) or _same_weights(written, _weights(b))
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out.onnx"))
    assert leftovers == []
