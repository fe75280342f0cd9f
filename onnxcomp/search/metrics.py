"""What the search scores a model by, on data it never calibrated or trained on.

A metric maps a model's outputs on the held-out samples to one number, higher is better:

- ``top1``: top-1 accuracy in percent on the data's ``labels`` (first output, ``[N, classes]``);
- ``cosine``: the lowest cosine over float outputs against the input model's, times 100
  (so ``--max-drop 1`` means cosine >= 0.99);
- ``module:function``: a callable ``f(outputs, arrays) -> float`` given the outputs by name
  (concatenated over the held-out samples) and the data file's arrays that are not graph
  inputs (``labels`` and any other, e.g. detection targets), for tasks that are not
  classification.

A *drop* is the input model's score minus the compressed model's, in the metric's units
(points for ``top1`` and ``cosine``). SQNR against the input model is recorded alongside.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Callable, Mapping

import numpy as np

from onnxcomp.data import Dataset
from onnxcomp.errors import OnnxcompError, UsageError
from onnxcomp.instrument import compare_arrays, min_cosine, top1_accuracy

MetricFunction = Callable[[Mapping[str, np.ndarray], Mapping[str, np.ndarray]], float]
BUILTIN_METRICS = ("top1", "cosine")
DEFAULT_HOLDOUT = 0.3


@dataclasses.dataclass(frozen=True)
class Metric:
    """A named score, higher is better. ``spec`` is what rebuilds it in another process."""

    spec: str  # "top1", "cosine" or "module:function"
    function: MetricFunction | None = None

    @property
    def unit(self) -> str:
        return "pt" if self.spec in BUILTIN_METRICS else ""

    def score(
        self,
        outputs: Mapping[str, np.ndarray],
        reference: Mapping[str, np.ndarray],
        data: Dataset,
    ) -> float:
        """This metric on ``outputs`` (``reference``: the input model's, same samples)."""
        if self.spec == "top1":
            first = next(iter(outputs.values()))
            accuracy = top1_accuracy([[first]], data.labels)
            if accuracy is None:
                raise OnnxcompError(
                    "the top-1 metric needs the first output to be class scores [N, classes] "
                    "matching the data's labels; use --metric cosine or module:function"
                )
            return 100.0 * accuracy
        if self.spec == "cosine":
            cosine = min_cosine(output_diffs(outputs, reference))
            return 100.0 * (1.0 if cosine is None else cosine)
        assert self.function is not None
        arrays = dict(data.extras)
        if data.labels is not None:
            arrays["labels"] = data.labels
        try:
            value = float(self.function(dict(outputs), arrays))
        except Exception as e:
            raise OnnxcompError(f"--metric {self.spec} failed: {type(e).__name__}: {e}") from None
        if not math.isfinite(value):
            raise OnnxcompError(f"--metric {self.spec} returned {value}, not a finite number")
        return value


def resolve_metric(spec: str | MetricFunction | None, data: Dataset) -> Metric:
    """The metric named by ``spec``; None picks top-1 when the data has labels, else cosine.
    A callable is used as it is (it must be importable by name to run in worker processes)."""
    if callable(spec):
        name = f"{getattr(spec, '__module__', '?')}:{getattr(spec, '__qualname__', 'metric')}"
        return Metric(name, spec)
    if spec is None:
        spec = "top1" if data.labels is not None else "cosine"
    if spec == "top1" and data.labels is None:
        raise UsageError("the top-1 metric needs 'labels' in the data; use --metric cosine, or "
                         "--metric module:function for other targets")  # fmt: skip
    if spec in BUILTIN_METRICS:
        return Metric(spec)
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise UsageError(f"unknown metric '{spec}' (use {', '.join(BUILTIN_METRICS)} or "
                         "module:function)")  # fmt: skip
    try:
        function = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise UsageError(f"cannot load --metric {spec}: {e}") from None
    if not callable(function):
        raise UsageError(f"--metric {spec} is not callable")
    return Metric(spec, function)


def output_diffs(outputs: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> list:
    """Per-output comparison (instrument's) of ``outputs`` with ``reference``."""
    return [compare_arrays(name, [reference[name]], [outputs[name]]) for name in reference]


def sqnr_db(outputs: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    """Lowest signal-to-quantisation-noise ratio over float outputs, in dB (inf: identical)."""
    worst = math.inf
    for name, ref in reference.items():
        if ref.dtype.kind != "f" or outputs[name].shape != ref.shape:
            continue
        ref64, new64 = ref.astype(np.float64), outputs[name].astype(np.float64)
        noise = float(np.sum((ref64 - new64) ** 2))
        if noise > 0:
            worst = min(worst, 10 * math.log10(max(float(np.sum(ref64**2)), 1e-300) / noise))
    return worst


def split_holdout(
    data: Dataset, eval_data: Dataset | None, holdout: float = DEFAULT_HOLDOUT, seed: int = 0
) -> tuple[Dataset, Dataset]:
    """(fit, held-out): the data passes calibrate and train on, and the data the bound is judged
    on. With ``eval_data`` that is (data, eval_data); else a fixed-seed ``holdout`` share of
    ``data`` is held out, so no held-out sample ever reaches a pass."""
    if eval_data is not None:
        return data, eval_data
    if not 0 < holdout < 1:
        raise UsageError(f"--holdout must be in (0, 1), not {holdout}")
    n = data.num_samples
    held = round(n * holdout)
    if held < 1 or held >= n:
        raise UsageError(f"--data has {n} samples: too few to hold out {holdout:.0%} for the "
                         "bound; give --eval-data")  # fmt: skip
    order = np.random.default_rng(seed).permutation(n)
    fit_idx, held_idx = np.sort(order[held:]), np.sort(order[:held])
    source = data.description or "data"
    return (
        data.take(fit_idx, f"{source} ({n - held} samples for calibration and training)"),
        data.take(held_idx, f"{source} ({held} held-out samples)"),
    )
