"""Knowledge distillation (``distill``): retrain the compressed model against the original.

The teacher is the pipeline's input model (the pipeline hands it over: ``needs_teacher``), run
in ONNX Runtime; the student is the model as the earlier passes left it, interpreted as a
torch module (:class:`onnxcomp.distill.OnnxModule`) and trained on ``--data`` (see
:mod:`onnxcomp.distill.train` for the losses, the schedule and resuming). What it keeps:

- the graph: the trained weights are written back into the same initializers (same names,
  shapes and dtypes); no node changes, so the pipeline checks the result like any pass's;
- pruning: exact zeros stay zero (masks), structured pruning's shapes stay;
- quantisation: quantised weights train on their grid (fake quantisation) and are written back
  as integer codes with the same scales.

A fixed-seed ``holdout`` share of ``--data`` (or ``eval_data``) is evaluated before training
and after every epoch; the best state on it is the one written back. Needs torch (imported
only when the pass runs); under ``torchrun`` it trains with DistributedDataParallel.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Literal

import onnx_ir as ir

from onnxcomp.data import Dataset, graph_inputs, static_batch
from onnxcomp.errors import OnnxcompError, UnsupportedModelError, UsageError
from onnxcomp.passes._base import CompressionPass, CompressionResult, PassOptions, option

if TYPE_CHECKING:
    from onnxcomp.distill.train import TrainConfig, TrainResult
    from onnxcomp.target import Target

TORCH_HINT = "pip install torch==2.13.0 (the CPU build), then pip install -e '.[torch]'"


def require_torch() -> None:
    """A one-line UsageError saying how to install torch, when it is missing."""
    try:
        import torch  # noqa: F401
    except ImportError:
        raise UsageError(f"distill needs torch: {TORCH_HINT}") from None


@dataclasses.dataclass(frozen=True)
class DistillOptions(PassOptions):
    """Options of ``distill``."""

    epochs: int = option(3, "passes over the training data (ignored when steps > 0)")
    steps: int = option(0, "if > 0: train this many optimiser steps instead of epochs")
    batch_size: int = option(32, "samples per step (per process under torchrun)")
    lr: float = option(1e-3, "AdamW learning rate at the start of the cosine schedule")
    weight_decay: float = option(0.0, "AdamW decoupled weight decay")
    temperature: float = option(2.0, "softmax temperature of the KL loss on logits")
    alpha: float = option(0.7, "weight of the teacher loss vs hard-label cross-entropy (labels)")
    output_loss: Literal["auto", "kl", "mse", "cosine"] = option(
        "auto", "loss on graph outputs; auto: kl for [N, classes] scores, mse otherwise"
    )
    match: tuple[str, ...] = option((), "intermediate values to match by name (same shapes)")
    match_loss: Literal["mse", "cosine"] = option("mse", "loss on the matched values")
    match_weight: float = option(1.0, "weight of each matched value's loss")
    l1: float = option(0.0, "L1 penalty on weights (more zeros for a later prune)")
    l2: float = option(0.0, "L2 penalty on weights")
    seed: int = option(0, "seed of the holdout split, the shuffling and torch")
    holdout: float = option(0.2, "share of --data held out for per-epoch evaluation")
    eval_data: str = option("", ".npz evaluated each epoch instead of a holdout share")
    provider: Literal["cpu", "cuda"] = option("cpu", "ONNX Runtime provider of the teacher")
    device: Literal["auto", "cpu", "cuda"] = option("auto", "where the student trains")
    checkpoint: str = option("", "file to save after each epoch and resume from if it exists")
    freeze: tuple[str, ...] = option((), "fnmatch patterns of weight names left untrained")
    trim: bool = option(True, "cut token batches to their longest unpadded row")
    mixup: float = option(
        0.0, "extra rows per batch (as a share) blending two samples' float inputs, teacher-scored"
    )
    threads: int = option(
        0, "torch intra-op threads while training (0: torch's default, one per core); small "
        "models train several times faster with 1 on a busy machine"
    )

    def validate(self) -> None:
        checks = [
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.steps >= 0, f"steps must be >= 0 (0: by epochs), got {self.steps}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (0 < self.lr < 1, f"lr must be in (0, 1), got {self.lr}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.temperature > 0, f"temperature must be > 0, got {self.temperature}"),
            (0 <= self.alpha <= 1, f"alpha must be in [0, 1], got {self.alpha}"),
            (self.match_weight >= 0, f"match_weight must be >= 0, got {self.match_weight}"),
            (self.l1 >= 0 and self.l2 >= 0, f"l1 and l2 must be >= 0, got {self.l1}, {self.l2}"),
            (0 <= self.holdout < 1, f"holdout must be in [0, 1), got {self.holdout}"),
            (0 <= self.mixup <= 4, f"mixup must be in [0, 4], got {self.mixup}"),
            (self.threads >= 0, f"threads must be >= 0 (0: torch's default), got {self.threads}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(f"distill:{message}")

    def train_config(self) -> TrainConfig:
        """These options as the trainer's configuration (imports torch)."""
        from onnxcomp.distill.train import TrainConfig

        names = {f.name for f in dataclasses.fields(TrainConfig)}
        return TrainConfig(**{k: v for k, v in self.as_dict().items() if k in names})


class DistillPass(CompressionPass):
    """Train the model (the student) to reproduce a teacher model's outputs on ``data``.

    In a pipeline the teacher is the pipeline's input model; standalone, give it as
    ``teacher`` (an onnx_ir model or a path).
    """

    summary = "knowledge distillation from the input model: retrain weights, keep masks and grids"
    options_class = DistillOptions
    options: DistillOptions
    needs_data = True
    needs_teacher = True

    def __init__(
        self,
        options: DistillOptions | None = None,
        *,
        data: Dataset | None = None,
        target: Target | None = None,
        teacher: ir.Model | str | os.PathLike | None = None,
    ) -> None:
        super().__init__(options, data=data, target=target)
        if teacher is not None and not isinstance(teacher, ir.Model):
            from onnxcomp.io import load

            teacher = load(teacher)
        self.teacher = teacher
        self.last_result: TrainResult | None = None

    def preflight(self) -> None:
        super().preflight()
        require_torch()

    def requires(self, model: ir.Model) -> None:
        super().requires(model)
        if self.teacher is None:
            raise UsageError(
                "DistillPass needs a teacher: run it in a pipeline (the input model is the "
                "teacher) or give teacher=MODEL"
            )

    def apply(self, model: ir.Model) -> CompressionResult:
        require_torch()
        from onnxcomp.distill import OnnxModule
        from onnxcomp.distill.teacher import Teacher
        from onnxcomp.distill.train import train

        assert self.data is not None and self.teacher is not None
        o = self.options
        check_inputs(self.teacher, model, self.data)
        module = OnnxModule(model, frozen=o.freeze)
        teacher = Teacher(self.teacher, provider=o.provider, match=o.match)
        training, held = training_split(o, self.data, self.teacher)
        with terminal_progress() as progress, torch_threads(o.threads):
            result = train(module, teacher, training, held, o.train_config(), progress=progress)
        self.last_result = result
        written = module.write_back(model)
        notes = []
        if result.resumed_from is not None:
            notes.append(f"resumed from {o.checkpoint} after epoch {result.resumed_from}")
        if held is None:
            notes.append("no held-out data (holdout=0): the last state is written back")
        elif result.best_epoch == 0:
            notes.append("training did not beat the starting weights on the held-out data: "
                         "they are written back unchanged")  # fmt: skip
        if o.freeze:
            notes.append(f"frozen (not trained): weights matching {', '.join(o.freeze)}")
        return CompressionResult(
            model, result.best_epoch > 0, stats=train_stats(result, len(written), training, held),
            notes=notes,
        )  # fmt: skip


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op threads set to ``count`` (0: left alone) while training, then put back:
    per-op thread hand-offs cost more than tiny kernels save, and a waiting OpenMP team loses
    its time slices when other processes share the cores (4x slower on the demo encoder)."""
    if count <= 0:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def training_split(
    options: DistillOptions, data: Dataset, teacher: ir.Model
) -> tuple[Dataset, Dataset | None]:
    """(training data, held-out data): ``eval_data`` if given, else a ``holdout`` share."""
    if options.eval_data:
        from onnxcomp.data import load_data

        return data, load_data(options.eval_data, teacher)
    from onnxcomp.distill.train import split_holdout

    return split_holdout(data, options.holdout, options.seed)


def distill_torch_student(
    teacher: ir.Model, spec: str, args: str | None, data: Dataset, options: DistillOptions
) -> tuple[ir.Model, dict[str, Any]]:
    """Train the torch module ``spec`` (``module:Class``, JSON ``args``) against ``teacher``
    and export it; returns the exported model and the training stats."""
    require_torch()
    from onnxcomp.distill.student import export_student, load_student
    from onnxcomp.distill.teacher import Teacher
    from onnxcomp.distill.train import train

    if options.match:
        raise UsageError("distill:match needs an ONNX student (intermediate values by name)")
    student = load_student(spec, args)
    check_inputs(teacher, teacher, data)
    runner = Teacher(teacher, provider=options.provider)
    training, held = training_split(options, data, teacher)
    with terminal_progress() as progress, torch_threads(options.threads):
        result = train(student, runner, training, held, options.train_config(), progress=progress)
    examples = [data.inputs[name][:2] for name in runner.input_names]
    model = export_student(student, teacher, examples)
    params = sum(p.numel() for p in student.parameters())
    return model, {"student": spec, "parameters": params,
                   **train_stats(result, params, training, held)}  # fmt: skip


def check_inputs(teacher: ir.Model, student: ir.Model, data: Dataset) -> None:
    """The data feeds every input of the teacher and of the student; one-line errors if not."""
    for who, model in (("teacher", teacher), ("student", student)):
        names = [v.name for v in graph_inputs(model)]
        missing = [n for n in names if n not in data.inputs]
        if missing:
            raise OnnxcompError(
                f"--data has no {', '.join(missing)}, which the {who} needs "
                f"(data: {', '.join(data.inputs) or 'nothing'}; {who} inputs: {', '.join(names)})"
            )
    batch = static_batch(teacher)
    if batch is not None:
        # Training batches (and the holdout) are of any size; a fixed batch dim rejects them.
        raise UnsupportedModelError(
            f"distillation feeds batches of any size, but the model fixes its batch dim at "
            f"{batch}; export it with a dynamic batch dim"
        )
    scalars = [name for name, array in data.inputs.items() if not array.ndim]
    if scalars:
        # Training shuffles and splits samples along the first axis, which a 0-d input lacks.
        raise UnsupportedModelError(
            f"distillation needs a sample axis on every input; {', '.join(scalars)} is 0-d"
        )


def train_stats(
    result: TrainResult, written: int, training: Dataset, held: Dataset | None
) -> dict[str, Any]:
    stats: dict[str, Any] = {
        "epochs": result.epochs,
        "steps": result.steps,
        "train_samples": training.num_samples,
        "holdout_samples": 0 if held is None else held.num_samples,
        "tensors_trained": written,
        "losses": ",".join(f"{name}:{kind}" for name, kind in result.kinds.items()),
    }
    if result.history:
        stats["train_loss_first"] = round(result.history[0].train_loss, 5)
        stats["train_loss_last"] = round(result.history[-1].train_loss, 5)
    if result.before is not None and result.best is not None:
        stats["holdout_loss"] = f"{result.before.loss:.4f} -> {result.best.loss:.4f}"
        stats["holdout_agreement"] = f"{result.before.agreement:.4f} -> {result.best.agreement:.4f}"
        if result.before.accuracy is not None and result.best.accuracy is not None:
            stats["holdout_accuracy"] = (
                f"{result.before.accuracy:.4f} -> {result.best.accuracy:.4f}"
            )
    stats["best_epoch"] = result.best_epoch
    if result.world_size > 1:
        stats["processes"] = result.world_size
    return stats


@contextlib.contextmanager
def terminal_progress() -> Iterator[Callable[[str, int, int], None] | None]:
    """The rich progress bar on stderr when stderr is a terminal; otherwise no callback."""
    if not sys.stderr.isatty():
        yield None
        return
    from onnxcomp.report import progress_bar

    with progress_bar("distill") as update:
        yield update
