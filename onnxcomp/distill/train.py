"""Knowledge distillation: the losses and the training loop.

:func:`train` fits a student (an :class:`~onnxcomp.distill.OnnxModule`, or any
``torch.nn.Module`` that takes the inputs positionally) to a :class:`~onnxcomp.distill.teacher.
Teacher`'s outputs. What it promises:

- **Losses.** Per graph output: KL divergence on temperature-softened logits (``kl``, the default
  for float ``[N, classes]`` outputs, scaled by T²), normalised MSE (``mse``: squared error over
  the teacher's mean square; the default for other float outputs such as embeddings or maps)
  or ``cosine``; with labels, ``alpha`` weighs that against hard-label cross-entropy on the
  first output. ``match`` adds a loss on intermediate values of the same name in both models.
  ``l1`` / ``l2`` add penalties on the weights (rank >= 2 parameters): ``l1`` drives further
  weights towards zero for a later ``prune`` to harvest.
- **Optimisation.** AdamW, a cosine learning-rate schedule over all steps, epochs or a step
  count; one fixed seed fixes the shuffling and therefore (on one machine and thread count)
  the trained weights.
- **Evaluation and the kept state.** The held-out split is evaluated before training and after
  every epoch (loss, agreement with the teacher, accuracy when it has labels); the best state
  (accuracy, else agreement, then loss) is the one left in the student, the starting weights
  included, so training never hands back something worse on the held-out split than it got.
- **Resuming.** With a checkpoint path the student, optimiser, schedule, epoch and best state
  are saved after every epoch (written to a temporary file, then renamed); a later run with the
  same path and the same model and step count carries on after the last saved epoch and ends
  with the same weights as an uninterrupted run.
- **Scale-out.** Under ``torchrun`` (``WORLD_SIZE`` > 1) the student trains with
  DistributedDataParallel (gloo on CPU, nccl on CUDA), each rank on its share of every epoch's
  shuffled samples; only rank 0 writes checkpoints and shows progress.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from onnxcomp.data import Dataset
from onnxcomp.distill.module import OnnxModule
from onnxcomp.distill.teacher import Teacher
from onnxcomp.errors import OnnxcompError, UsageError
from onnxcomp.quant.calibrate import trim_padding

LossKind = Literal["kl", "mse", "cosine"]
CHECKPOINT_FORMAT = "onnxcomp-distill-checkpoint/1"
EVAL_BATCH = 128
Progress = Callable[[str, int, int], None]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How :func:`train` trains (the ``distill`` pass's options, less the data-split ones)."""

    epochs: int = 3
    steps: int = 0  # > 0: train this many steps instead of ``epochs`` epochs
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    temperature: float = 2.0
    alpha: float = 0.7  # weight of the teacher loss against hard-label cross-entropy
    output_loss: Literal["auto", "kl", "mse", "cosine"] = "auto"
    match: tuple[str, ...] = ()
    match_loss: Literal["mse", "cosine"] = "mse"
    match_weight: float = 1.0
    l1: float = 0.0
    l2: float = 0.0
    seed: int = 0
    checkpoint: str = ""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    trim: bool = True  # cut token batches to their longest unpadded row
    mixup: float = 0.0  # share of extra rows per batch that mix two samples' float inputs


@dataclasses.dataclass
class Metrics:
    """The student on the held-out split: loss, agreement with the teacher, accuracy."""

    loss: float
    agreement: float  # top-1 agreement on kl outputs, else mean cosine of the first output
    accuracy: float | None = None

    def score(self) -> tuple[float, float]:
        """Higher is better: accuracy if known, else agreement; then lower loss."""
        first = self.accuracy if self.accuracy is not None else self.agreement
        return (first, -self.loss)


@dataclasses.dataclass
class EpochRecord:
    """One epoch: mean training loss and agreement, and the held-out metrics after it."""

    epoch: int
    steps: int
    train_loss: float
    train_agreement: float
    lr: float
    holdout: Metrics | None


@dataclasses.dataclass
class TrainResult:
    """What :func:`train` did; the student holds the best state."""

    epochs: int
    steps: int
    history: list[EpochRecord]
    before: Metrics | None
    best: Metrics | None
    best_epoch: int  # 0: the starting weights were best
    resumed_from: int | None
    world_size: int
    kinds: dict[str, str]


# -- losses -----------------------------------------------------------------------------------


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) on softmax(logits / T) over the last axis, times T² (so gradients
    keep their size as T changes), averaged over rows."""
    classes = student.shape[-1]
    s = F.log_softmax(student.reshape(-1, classes).float() / temperature, dim=-1)
    t = F.log_softmax(teacher.reshape(-1, classes).float() / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def mse_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the teacher's mean square: scale-free, 1.0 for a zero student."""
    t = teacher.float()
    return (student.float() - t).square().mean() / (t.square().mean() + 1e-8)


def cosine_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity per sample (all axes but the first flattened), averaged."""
    rows = student.shape[0] if student.ndim else 1
    s, t = student.reshape(rows, -1).float(), teacher.reshape(rows, -1).float()
    return (1 - F.cosine_similarity(s, t, dim=1, eps=1e-8)).mean()


def value_loss(
    kind: str, student: torch.Tensor, teacher: torch.Tensor, temperature: float
) -> torch.Tensor:
    """The loss ``kind`` (kl, mse or cosine) between a student and a teacher value."""
    if kind == "kl":
        return kd_loss(student, teacher, temperature)
    if kind == "cosine":
        return cosine_loss(student, teacher)
    return mse_loss(student, teacher)


def output_kinds(
    values: Mapping[str, np.ndarray], output_names: Sequence[str], choice: str
) -> dict[str, str]:
    """The loss for each graph output: ``choice``, or under ``auto`` kl for float [N, C>1]
    outputs (class scores) and mse for other float outputs. Non-float outputs are left out."""
    kinds = {}
    for name in output_names:
        array = values[name]
        if array.dtype.kind != "f":
            continue
        if choice != "auto":
            kinds[name] = choice
        else:
            kinds[name] = "kl" if array.ndim == 2 and array.shape[1] > 1 else "mse"
    if not kinds:
        raise OnnxcompError(
            "the teacher has no float outputs to distil from "
            f"(outputs: {', '.join(f'{n} {values[n].dtype}' for n in output_names)})"
        )
    return kinds


def weight_penalty(module: nn.Module, l1: float, l2: float) -> torch.Tensor | None:
    """``l1·Σ|w| + l2·Σw²`` over weight tensors (rank >= 2; biases and norms are left alone)."""
    if not l1 and not l2:
        return None
    total = None
    for param in module.parameters():
        if param.ndim < 2 or not param.requires_grad:
            continue
        term = 0.0
        if l1:
            term = term + l1 * param.abs().sum()
        if l2:
            term = term + l2 * param.square().sum()
        total = term if total is None else total + term
    return total


# -- the student as one forward function -------------------------------------------------------


class StudentForward(nn.Module):
    """The student as a module whose forward takes the inputs positionally and returns a dict of
    graph outputs (and, for an OnnxModule, the ``match`` values) by name; DDP wraps this."""

    def __init__(
        self,
        student: nn.Module,
        input_names: Sequence[str],
        output_names: Sequence[str],
        match: Sequence[str] = (),
    ) -> None:
        super().__init__()
        self.student = student
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self.match = list(match)
        if self.match and not isinstance(student, OnnxModule):
            raise UsageError("match (intermediate values) needs an ONNX student")
        if isinstance(student, OnnxModule):
            unknown = sorted(set(self.match) - student.value_names())
            if unknown:
                raise UsageError(f"match: the student computes no value named {', '.join(unknown)}")

    def forward(self, *inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.match:
            assert isinstance(self.student, OnnxModule)
            return self.student.values([*self.output_names, *self.match], *inputs)
        outputs = self.student(*inputs)
        if isinstance(outputs, torch.Tensor):
            outputs = (outputs,)
        elif isinstance(outputs, Mapping):
            outputs = tuple(outputs.values())
        if len(outputs) != len(self.output_names):
            raise OnnxcompError(
                f"the student returns {len(outputs)} outputs, the teacher has "
                f"{len(self.output_names)} ({', '.join(self.output_names)})"
            )
        return dict(zip(self.output_names, outputs, strict=True))


# -- data --------------------------------------------------------------------------------------


def subset(dataset: Dataset, indices: np.ndarray, description: str = "") -> Dataset:
    """The samples ``indices`` of ``dataset``, labels included."""
    return Dataset(
        inputs={name: array[indices] for name, array in dataset.inputs.items()},
        labels=None if dataset.labels is None else dataset.labels[indices],
        description=description or dataset.description,
    )


def split_holdout(dataset: Dataset, share: float, seed: int) -> tuple[Dataset, Dataset | None]:
    """(train, held out): a fixed-seed random ``share`` of the samples held out (at least one
    sample each side, none held out when ``share`` is 0 or there is a single sample)."""
    total = dataset.num_samples
    held = min(total - 1, max(1, round(total * share))) if share > 0 else 0
    if held <= 0:
        return dataset, None
    order = np.random.default_rng(seed).permutation(total)
    train_part = np.sort(order[held:])
    held_part = np.sort(order[:held])
    return (
        subset(dataset, train_part, f"{dataset.description} ({total - held} samples)"),
        subset(dataset, held_part, f"{dataset.description} (held out: {held} samples)"),
    )


# -- distributed ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class World:
    """This process's place in a torchrun job (a single process: size 1, rank 0)."""

    size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world() -> World:
    """The torchrun job this process belongs to, from the variables torchrun sets."""
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        return World()
    return World(size, rank, local) if size > 1 else World()


def _init_distributed(where: World, device: torch.device) -> bool:
    """Join the torchrun job's process group; True if this call created it."""
    import torch.distributed as dist

    if not dist.is_available():
        raise OnnxcompError("this torch build has no torch.distributed: cannot run under torchrun")
    if dist.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=where.rank, world_size=where.size)
    return True


def _device(choice: str, where: World) -> torch.device:
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UsageError("device=cuda, but this torch build sees no CUDA device")
    return torch.device("cuda", where.local_rank % torch.cuda.device_count())


# -- the loop -------------------------------------------------------------------------------


class _Run:
    """State shared by the training and evaluation steps of one :func:`train` call."""

    def __init__(
        self,
        forward: StudentForward,
        teacher: Teacher,
        config: TrainConfig,
        kinds: dict[str, str],
        device: torch.device,
        trim: bool,
    ) -> None:
        self.forward = forward
        self.teacher = teacher
        self.config = config
        self.kinds = kinds
        self.device = device
        self.trim = trim
        self.input_names = list(forward.input_names)

    def batch(
        self, dataset: Dataset, indices: np.ndarray, rng: np.random.Generator | None = None
    ) -> tuple[list[torch.Tensor], dict[str, torch.Tensor], torch.Tensor | None]:
        """Inputs, teacher targets and labels of samples ``indices``; with ``rng`` and mixup,
        extra rows that blend two samples' float inputs, their targets from the teacher."""
        feeds = {name: dataset.inputs[name][indices] for name in self.input_names}
        targets_np = self.teacher.targets(dataset, indices)
        if rng is not None and self.config.mixup > 0:
            feeds, targets_np = self._mix(dataset, indices, feeds, targets_np, rng)
        if self.trim:
            feeds = trim_padding(feeds)
        inputs = [torch.from_numpy(np.ascontiguousarray(feeds[n])).to(self.device)
                  for n in self.input_names]  # fmt: skip
        targets = {name: torch.from_numpy(a).to(self.device) for name, a in targets_np.items()}
        labels = None
        if dataset.labels is not None:
            labels = torch.from_numpy(np.asarray(dataset.labels[indices])).long().to(self.device)
        return inputs, targets, labels

    def _mix(
        self,
        dataset: Dataset,
        indices: np.ndarray,
        feeds: dict[str, np.ndarray],
        targets: dict[str, np.ndarray],
        rng: np.random.Generator,
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        rows = max(1, round(len(indices) * self.config.mixup))
        first = rng.integers(0, len(indices), rows)
        second = rng.integers(0, len(indices), rows)
        mixed = {}
        for name, array in feeds.items():
            if array.dtype.kind != "f":
                mixed[name] = array[first]
                continue
            weight = rng.uniform(0, 1, (rows,) + (1,) * (array.ndim - 1)).astype(array.dtype)
            mixed[name] = weight * array[first] + (1 - weight) * array[second]
        extra = self.teacher.run({**{n: a[:0] for n, a in dataset.inputs.items()}, **mixed})
        return (
            {n: np.concatenate([feeds[n], mixed[n]]) for n in feeds},
            {n: np.concatenate([targets[n], extra[n]]) for n in targets},
        )

    def loss(
        self,
        values: Mapping[str, torch.Tensor],
        targets: Mapping[str, torch.Tensor],
        labels: torch.Tensor | None,
    ) -> tuple[torch.Tensor, float, int]:
        """(loss, summed agreement, samples) for one batch."""
        c = self.config
        total = None
        for name, kind in self.kinds.items():
            _check_shapes(name, values[name], targets[name])
            term = value_loss(kind, values[name], targets[name], c.temperature)
            total = term if total is None else total + term
        assert total is not None
        first = next(iter(self.kinds))
        if labels is not None and self.kinds[first] == "kl" and values[first].ndim == 2:
            ce = F.cross_entropy(values[first][: len(labels)].float(), labels)  # not mixed rows
            total = c.alpha * total + (1 - c.alpha) * ce
        for name in c.match:
            _check_shapes(name, values[name], targets[name])
            term = value_loss(c.match_loss, values[name], targets[name], c.temperature)
            total = total + c.match_weight * term
        agreement, count = _agreement(self.kinds[first], values[first], targets[first])
        return total, agreement, count

    @torch.no_grad()
    def evaluate(self, dataset: Dataset) -> Metrics:
        self.forward.eval()
        loss = agreement = 0.0
        correct = count = 0
        first = next(iter(self.kinds))
        for start in range(0, dataset.num_samples, EVAL_BATCH):
            indices = np.arange(start, min(start + EVAL_BATCH, dataset.num_samples))
            inputs, targets, labels = self.batch(dataset, indices)
            values = self.forward(*inputs)
            batch_loss, batch_agreement, rows = self.loss(values, targets, labels)
            loss += float(batch_loss.detach()) * len(indices)
            agreement += batch_agreement
            count += rows
            if labels is not None and values[first].ndim == 2:
                correct += int((values[first].argmax(dim=1) == labels).sum())
        samples = dataset.num_samples
        accuracy = None
        if dataset.labels is not None and self.kinds[first] == "kl":
            accuracy = correct / samples
        return Metrics(loss / samples, agreement / max(1, count), accuracy)


def _check_shapes(name: str, student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.shape != teacher.shape:
        raise OnnxcompError(
            f"'{name}' has shape {list(student.shape)} in the student and "
            f"{list(teacher.shape)} in the teacher: they must match to distil"
        )


def _agreement(kind: str, student: torch.Tensor, teacher: torch.Tensor) -> tuple[float, int]:
    """Summed agreement over the rows of one batch and the row count: same top-1 for kl
    outputs, cosine per sample otherwise."""
    with torch.no_grad():
        if kind == "kl":
            classes = student.shape[-1]
            same = student.reshape(-1, classes).argmax(1) == teacher.reshape(-1, classes).argmax(1)
            return float(same.sum()), int(same.numel())
        rows = student.shape[0] if student.ndim else 1
        cos = F.cosine_similarity(
            student.reshape(rows, -1).float(), teacher.reshape(rows, -1).float(), dim=1
        )
        return float(cos.sum()), rows


def _fixed_width(teacher: Teacher) -> bool:
    """Whether the model fixes the second axis of an input (an exporter's static sequence
    length): token batches cut shorter would not run."""
    return any(
        len(i.shape) >= 2 and isinstance(i.shape[1], int) for i in teacher.session.get_inputs()
    )


def train(
    student: nn.Module,
    teacher: Teacher,
    data: Dataset,
    holdout: Dataset | None,
    config: TrainConfig,
    *,
    input_names: Sequence[str] | None = None,
    progress: Progress | None = None,
    on_epoch: Callable[[EpochRecord], None] | None = None,
) -> TrainResult:
    """Distil ``teacher`` into ``student`` on ``data``; the student ends in its best state.

    ``input_names`` orders the inputs the student takes positionally (default: the
    OnnxModule's graph inputs, else the teacher's). ``progress(what, done, total)`` is called
    after every step on rank 0; ``on_epoch`` after every epoch (after the checkpoint is saved).
    """
    c = config
    where = world()
    device = _device(c.device, where)
    if input_names is None:
        input_names = (
            student.input_names if isinstance(student, OnnxModule) else teacher.input_names
        )
    missing = [n for n in input_names if n not in data.inputs]
    if missing:
        raise OnnxcompError(f"the data lacks the student's inputs {', '.join(missing)}")
    sample = teacher.targets(data, np.arange(min(2, data.num_samples)))
    kinds = output_kinds(sample, teacher.output_names, c.output_loss)
    trim = (
        c.trim
        and not c.match
        and not any(a.ndim >= 2 and a.shape[1] == _width(data) for a in sample.values())
        and not _fixed_width(teacher)
    )
    student.to(device)
    forward = StudentForward(student, input_names, teacher.output_names, c.match)
    run = _Run(forward, teacher, c, kinds, device, trim)

    created_group = False
    if where.size > 1:
        created_group = _init_distributed(where, device)
        from torch.nn.parallel import DistributedDataParallel

        model: nn.Module = DistributedDataParallel(
            forward, device_ids=[device.index] if device.type == "cuda" else None
        )
    else:
        model = forward

    torch.manual_seed(c.seed)
    per_rank = data.num_samples // where.size
    if per_rank < 1:
        raise OnnxcompError(f"{data.num_samples} training samples for {where.size} processes")
    steps_per_epoch = math.ceil(per_rank / c.batch_size)
    total_steps = c.steps if c.steps > 0 else c.epochs * steps_per_epoch
    epochs = math.ceil(total_steps / steps_per_epoch)
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise OnnxcompError("the student has no trainable weights (all frozen?)")
    optimizer = torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_steps))

    state = _State(student)
    resumed_from = None
    if c.checkpoint and Path(c.checkpoint).exists():
        resumed_from = state.load(c.checkpoint, optimizer, schedule, total_steps, device)
    elif holdout is not None:
        state.before = run.evaluate(holdout)
        state.keep_best(0, state.before)

    step = state.epoch * steps_per_epoch
    for epoch in range(state.epoch + 1, epochs + 1):
        model.train()
        order = np.random.default_rng([c.seed, epoch]).permutation(data.num_samples)
        mine = order[: per_rank * where.size][where.rank :: where.size]
        loss_sum = agree_sum = 0.0
        rows = batches = 0
        for start in range(0, per_rank, c.batch_size):
            if step >= total_steps:
                break
            rng = np.random.default_rng([c.seed, epoch, step])
            inputs, targets, labels = run.batch(data, mine[start : start + c.batch_size], rng)
            values = model(*inputs)
            loss, agreement, count = run.loss(values, targets, labels)
            penalty = weight_penalty(student, c.l1, c.l2)
            objective = loss if penalty is None else loss + penalty
            if not torch.isfinite(objective):
                raise OnnxcompError(
                    f"the distillation loss became {float(objective)} at step {step + 1}; lower lr"
                )
            optimizer.zero_grad(set_to_none=True)
            objective.backward()
            optimizer.step()
            schedule.step()
            step += 1
            batches += 1
            loss_sum += float(loss.detach())
            agree_sum += agreement
            rows += count
            if progress is not None and where.is_main:
                progress(
                    f"distill epoch {epoch}/{epochs} loss {loss_sum / batches:.4f} "
                    f"agree {agree_sum / max(1, rows):.1%}",
                    step,
                    total_steps,
                )
        metrics = run.evaluate(holdout) if holdout is not None else None
        record = EpochRecord(
            epoch, batches, loss_sum / max(1, batches), agree_sum / max(1, rows),
            schedule.get_last_lr()[0], metrics,
        )  # fmt: skip
        state.epoch = epoch
        state.history.append(record)
        if (
            metrics is None
            or state.best_metrics is None
            or (metrics.score() > state.best_metrics.score())
        ):
            state.keep_best(epoch, metrics)
        if c.checkpoint and where.is_main:
            state.save(c.checkpoint, optimizer, schedule, total_steps)
        if on_epoch is not None:
            on_epoch(record)

    if state.best_state is not None:
        student.load_state_dict(state.best_state)
    if created_group:
        import torch.distributed as dist

        dist.barrier()  # rank 0's checkpoint is complete before any rank moves on
        dist.destroy_process_group()
    return TrainResult(
        epochs=epochs,
        steps=step,
        history=state.history,
        before=state.before,
        best=state.best_metrics,
        best_epoch=state.best_epoch,
        resumed_from=resumed_from,
        world_size=where.size,
        kinds=kinds,
    )


def _width(data: Dataset) -> int | None:
    for array in data.inputs.values():
        if array.ndim >= 2:
            return array.shape[1]
    return None


class _State:
    """Epoch counter, history and best state, and their checkpoint file."""

    def __init__(self, student: nn.Module) -> None:
        self.student = student
        self.epoch = 0
        self.history: list[EpochRecord] = []
        self.before: Metrics | None = None
        self.best_metrics: Metrics | None = None
        self.best_epoch = 0
        self.best_state: dict[str, torch.Tensor] | None = None

    def keep_best(self, epoch: int, metrics: Metrics | None) -> None:
        self.best_epoch = epoch
        self.best_metrics = metrics
        self.best_state = {k: v.detach().clone() for k, v in self.student.state_dict().items()}

    def _shapes(self) -> dict[str, list[int]]:
        return {k: list(v.shape) for k, v in self.student.state_dict().items()}

    def save(self, path: str, optimizer: Any, schedule: Any, total_steps: int) -> None:
        """Write the checkpoint atomically: a temporary file beside it, then a rename."""
        target = Path(path)
        payload = {
            "format": CHECKPOINT_FORMAT,
            "total_steps": total_steps,
            "epoch": self.epoch,
            "shapes": self._shapes(),
            "student": self.student.state_dict(),
            "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(),
            "best_state": self.best_state,
            "best_epoch": self.best_epoch,
            "best_metrics": _as_dict(self.best_metrics),
            "before": _as_dict(self.before),
            "history": [_record_dict(r) for r in self.history],
        }
        try:
            handle, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent or ".")
            os.close(handle)
            torch.save(payload, tmp)
            os.replace(tmp, target)
        except OSError as e:
            raise UsageError(f"cannot write the checkpoint {path}: {e.strerror or e}") from None

    def load(
        self, path: str, optimizer: Any, schedule: Any, total_steps: int, device: torch.device
    ) -> int:
        """Restore from ``path``; returns the epoch it had reached."""
        try:
            payload = torch.load(path, map_location=device, weights_only=True)
        except Exception as e:
            raise OnnxcompError(f"cannot read the checkpoint {path}: {e}") from None
        if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
            raise OnnxcompError(f"{path} is not an onnxcomp distill checkpoint")
        shapes = self._shapes()
        saved = payload["shapes"]
        if saved != shapes:
            differ = sorted(set(shapes) ^ set(saved)) or [
                k for k in shapes if shapes[k] != saved.get(k)
            ]
            raise OnnxcompError(
                f"the checkpoint {path} was saved for another model ({len(differ)} tensors "
                f"differ in name or shape, e.g. {', '.join(differ[:3])}); delete it or choose "
                "another checkpoint path"
            )
        if payload["total_steps"] != total_steps:
            raise OnnxcompError(
                f"the checkpoint {path} is for a run of {payload['total_steps']} steps, this run "
                f"has {total_steps} (epochs, steps, batch size or data changed); delete it or "
                "choose another checkpoint path"
            )
        self.student.load_state_dict(payload["student"])
        optimizer.load_state_dict(payload["optimizer"])
        schedule.load_state_dict(payload["schedule"])
        self.epoch = int(payload["epoch"])
        self.best_state = payload["best_state"]
        self.best_epoch = int(payload["best_epoch"])
        self.best_metrics = _metrics(payload["best_metrics"])
        self.before = _metrics(payload["before"])
        self.history = [
            EpochRecord(**{**r, "holdout": _metrics(r["holdout"])}) for r in payload["history"]
        ]
        return self.epoch


def _as_dict(metrics: Metrics | None) -> dict[str, Any] | None:
    return None if metrics is None else dataclasses.asdict(metrics)


def _metrics(data: Mapping[str, Any] | None) -> Metrics | None:
    return None if data is None else Metrics(**data)


def _record_dict(record: EpochRecord) -> dict[str, Any]:
    return {**dataclasses.asdict(record), "holdout": _as_dict(record.holdout)}
