"""The teacher: the original (uncompressed) model in ONNX Runtime, run batch by batch.

:class:`Teacher` wraps one ``InferenceSession`` on the teacher model (CPU or CUDA provider),
with the intermediate values named in ``match`` added as extra outputs of a copy of the graph
(the caller's model is not changed). :meth:`Teacher.targets` gives, for a set of sample
indices, every graph output and matched value by name; when the whole data set's targets fit
in :data:`CACHE_LIMIT_BYTES` they are computed once and sliced afterwards, otherwise the
teacher runs on each batch as it comes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from onnxcomp import runtime
from onnxcomp.data import Dataset
from onnxcomp.errors import OnnxcompError, UsageError

CACHE_LIMIT_BYTES = 1 << 30
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
RUN_BATCH = 64


class Teacher:
    """The teacher model's outputs (and matched intermediate values) on a data set.

    ``provider`` is ``cpu`` or ``cuda`` (a one-line error when this onnxruntime has no CUDA
    provider). ``match`` names intermediate values to return alongside the graph outputs; a
    name the teacher does not compute is an error.
    """

    def __init__(
        self,
        model: ir.Model,
        *,
        provider: str = "cpu",
        match: Sequence[str] = (),
        cache_limit: int = CACHE_LIMIT_BYTES,
    ) -> None:
        if provider not in PROVIDERS:
            raise UsageError(f"teacher provider must be one of {', '.join(PROVIDERS)}")
        if PROVIDERS[provider] not in ort.get_available_providers():
            raise UsageError(
                f"onnxruntime {ort.__version__} has no {PROVIDERS[provider]}: install "
                "onnxruntime-gpu (with CUDA and cuDNN) or use provider=cpu"
            )
        self.output_names = [v.name for v in model.graph.outputs]
        self.input_names = [v.name for v in model.graph.inputs if not v.is_initializer()]
        probe = model
        extra = [name for name in dict.fromkeys(match) if name not in self.output_names]
        if extra:
            probe = model.clone()
            produced = {v.name: v for node in probe.graph for v in node.outputs if v.name}
            missing = [name for name in extra if name not in produced]
            if missing:
                raise UsageError(f"match: the teacher computes no value named {', '.join(missing)}")
            probe.graph.outputs.extend(produced[name] for name in extra)
        self.names = [*self.output_names, *extra]
        providers = [PROVIDERS[provider]]
        if provider != "cpu":
            providers.append(PROVIDERS["cpu"])
        self.session = runtime.make_session(probe, providers=providers)
        self.cache_limit = cache_limit
        # id(dataset) -> (dataset, its values or {} when they do not fit); holding the data set
        # keeps its id from being reused.
        self._cache: dict[int, tuple[Dataset, dict[str, np.ndarray]]] = {}

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The teacher's values on one batch of feeds, by name."""
        try:
            values = self.session.run(self.names, {n: feeds[n] for n in self.input_names})
        except KeyError as e:
            raise OnnxcompError(f"the data has no input {e} that the teacher needs") from None
        except Exception as e:
            message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise OnnxcompError(f"the teacher failed to run: {message[:400]}") from None
        return dict(zip(self.names, values, strict=True))

    def targets(self, dataset: Dataset, indices: np.ndarray) -> dict[str, np.ndarray]:
        """The teacher's values for samples ``indices`` of ``dataset`` (cached when it fits)."""
        cached = self._cached(dataset)
        if cached is not None:
            return {name: array[indices] for name, array in cached.items()}
        return self.run({name: array[indices] for name, array in dataset.inputs.items()})

    def _cached(self, dataset: Dataset) -> dict[str, np.ndarray] | None:
        key = id(dataset)
        if key in self._cache:
            return self._cache[key][1] or None
        total = dataset.num_samples
        first = self.run({n: a[:RUN_BATCH] for n, a in dataset.inputs.items()})
        per_sample = sum(a.nbytes for a in first.values()) / max(1, min(RUN_BATCH, total))
        if per_sample * total > self.cache_limit or not _batched(first, min(RUN_BATCH, total)):
            self._cache[key] = (dataset, {})
            return None
        parts = [first]
        for start in range(RUN_BATCH, total, RUN_BATCH):
            parts.append(
                self.run({n: a[start : start + RUN_BATCH] for n, a in dataset.inputs.items()})
            )
        values = {name: np.concatenate([p[name] for p in parts]) for name in self.names}
        self._cache[key] = (dataset, values)
        return values


def _batched(values: Mapping[str, np.ndarray], rows: int) -> bool:
    """Every value has the samples on its first axis (so it can be cached and sliced)."""
    return all(a.ndim >= 1 and a.shape[0] == rows for a in values.values())
