"""onnxcomp: compress any ONNX model with a verified pipeline of passes.

>>> import onnxcomp
>>> model, report = onnxcomp.optimize("model.onnx", passes="simplify,fold-bn", output="small.onnx")

The Python API and the command line share one pipeline: passes given as a pipeline string
(``"prune:sparsity=0.8,int8"``), as names, or as pass objects from :mod:`onnxcomp.passes`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

# isort: off
import onnxcomp._deferred  # noqa: F401  first: it keeps onnx_ir from importing sympy at once
import onnx_ir as ir

# isort: on

from onnxcomp.data import Dataset, load_data
from onnxcomp.errors import OnnxcompError, UsageError
from onnxcomp.instrument import LossBound, Tolerance
from onnxcomp.io import check_writable, external_files, is_main_process, load, save
from onnxcomp.passes._base import CompressionPass
from onnxcomp.pipeline import (
    DEFAULT_CHECK_SAMPLES,
    STREAM_ABOVE_BYTES,
    CheckMode,
    PipelineReport,
    run_pipeline,
)
from onnxcomp.search import auto, sensitivity
from onnxcomp.target import Target, resolve_target

__version__ = "0.1.0"
__all__ = [
    "Dataset",
    "LossBound",
    "OnnxcompError",
    "PipelineReport",
    "Target",
    "Tolerance",
    "UsageError",
    "auto",
    "load",
    "load_data",
    "optimize",
    "save",
    "sensitivity",
]


def optimize(
    model: ir.Model | str | os.PathLike,
    passes: str | Sequence[str | CompressionPass],
    *,
    data: Dataset | str | os.PathLike | None = None,
    shapes: dict[str, tuple[int, ...]] | None = None,
    output: str | os.PathLike | None = None,
    tolerance: Tolerance = Tolerance(),
    check: CheckMode = "each",
    check_samples: int = DEFAULT_CHECK_SAMPLES,
    target: Target | str | None = None,
    bound: LossBound = LossBound(),
    keep_initializer_inputs: bool = False,
    stream_above: int = STREAM_ABOVE_BYTES,
) -> tuple[ir.Model, PipelineReport]:
    """Run ``passes`` and return the compressed model and the per-pass report.

    ``model`` is a path or an onnx_ir model (which is left as it was: the passes work on a
    copy). ``data`` is a Dataset or an ``.npz`` path; without it the numeric check uses random
    inputs (dynamic dims from ``shapes``). ``target`` is the machine the model is for
    (``portable`` by default, ``host`` probes this one; see :mod:`onnxcomp.target`). The result
    must stay within ``bound`` of the input model (top-1 drop, output cosine), else
    :class:`~onnxcomp.errors.LossBoundError` and nothing is written, unless
    ``bound.allow_loss``. Initializers that an old exporter also listed as graph inputs are
    weights (no longer inputs of the result) unless ``keep_initializer_inputs``. With
    ``output``, the result is written atomically; the input file is never overwritten.
    A model with more than ``stream_above`` bytes of weights is rewritten one tensor at a
    time, its new weights kept in a scratch folder beside ``output`` until written, and
    checked on a sample of its layers (see :mod:`onnxcomp.pipeline`).
    """
    target = resolve_target(target)
    input_path = file_bytes_before = None
    input_files: tuple[Path, ...] = ()  # never written over: the model, its data, --data
    had_external_data = False
    if output is not None:
        check_writable(output)
    if isinstance(model, ir.Model):
        model = model.clone()
    else:
        input_path = Path(model)
        if output is not None and _same_file(input_path, output):
            raise UsageError(
                f"refusing to overwrite the input model {input_path}; choose another -o"
            )
        model = load(input_path)
        input_files = (input_path, *external_files(model))
        had_external_data = len(input_files) > 1
        file_bytes_before = sum(p.stat().st_size for p in input_files if p.exists())
    if data is not None and not isinstance(data, Dataset):
        input_files = (*input_files, Path(data))
        data = load_data(data, model)
    report = run_pipeline(
        model,
        passes,
        data=data,
        shapes=shapes,
        tolerance=tolerance,
        check=check,
        check_samples=check_samples,
        target=target,
        bound=bound,
        keep_initializer_inputs=keep_initializer_inputs,
        stream_above=stream_above,
        scratch_dir=check_writable(output) if output is not None else None,
    )
    report.input_path = str(input_path) if input_path is not None else None
    report.file_bytes_before = file_bytes_before
    if output is not None and is_main_process():
        # Keep external data when the input had it, even if every weight was rewritten.
        external = True if had_external_data else None
        report.file_bytes_after = save(model, output, external_data=external, protect=input_files)
        report.output_path = str(output)
    return model, report


def _same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)

