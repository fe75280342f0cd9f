"""Reading and writing model files: the only module that touches model paths.

Promises: the input is never modified; outputs appear atomically (written into a temporary
folder beside the target, then renamed), so a failure or a kill leaves no partial file; a
model with external data is two files, so its old copy is removed before the new pair is
renamed in (a kill between the renames leaves no model, never one reading another's data),
and concurrent writers to one folder rename under a lock (the last leaves one whole model,
never one's model with another's data); a write that would land on a file the model is still
reading weights from (its own external data) is refused; external data is used when the input
had it or the weights pass ~1.5 GB, since a protobuf cannot exceed 2 GB.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import weakref
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from glob import escape as glob_escape
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import onnx
import onnx_ir as ir

from onnxcomp.errors import ModelLoadError, UsageError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

EXTERNAL_DATA_THRESHOLD_BYTES = 1_500_000_000
T = TypeVar("T")


def load(path: str | os.PathLike) -> ir.Model:
    """Load an ONNX file as an onnx_ir model, with a one-line error for anything that is not one.

    Weights in external data stay on disk (memory-mapped) until something reads them.
    """
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"no such file: {path}")
    if path.is_dir():
        raise ModelLoadError(f"{path} is a directory, not an ONNX model file")
    if not os.access(path, os.R_OK):
        raise ModelLoadError(f"cannot read {path}: permission denied")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"{path} is empty")
    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError, onnx may raise others
        reason = _first_line(e)
        raise ModelLoadError(f"{path} is not an ONNX model (cannot parse it: {reason})") from None
    if not proto.HasField("graph") or proto.ir_version <= 0 or not proto.graph.output:
        raise ModelLoadError(f"{path} parses as protobuf but is not an ONNX model (no graph)")
    _check_tensors(proto, path)
    try:
        onnx.checker.check_model(str(path))
    except Exception as e:
        raise ModelLoadError(f"{path} is not a valid ONNX model: {_first_line(e)}") from None
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as e:
        raise ModelLoadError(f"{path} cannot be read as an ONNX model: {_first_line(e)}") from None
    ir.external_data.set_base_dir(model.graph, str(path.parent))
    return model


def save(
    model: ir.Model,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
    protect: tuple[str | os.PathLike, ...] = (),
) -> int:
    """Write ``model`` to ``path`` atomically and return the bytes written (model + data file).

    ``external_data=None`` chooses: external when any weight is external now or the weights
    exceed :data:`EXTERNAL_DATA_THRESHOLD_BYTES`. ``protect`` lists files that must not be
    written over (the input model); files the model's weights are read from are protected too.
    """
    path = Path(path)
    target_dir = check_writable(path)
    if external_data is None:
        external_data = (
            has_external_tensors(model) or weight_bytes(model) > EXTERNAL_DATA_THRESHOLD_BYTES
        )
    data_name = f"{path.name}.data"
    written_files = [path] + ([target_dir / data_name] if external_data else [])
    guarded = {_real(p) for p in protect} | {_real(p) for p in external_files(model)}
    for target in written_files:
        if _real(target) in guarded:
            raise UsageError(f"refusing to overwrite {target}: the input model is read from it")

    if not external_data and has_external_tensors(model):
        # Inline the weights we are still reading from another file before it is left behind.
        ir.external_data.load_to_model(model)

    try:
        _remove_orphans(target_dir, path.name)
        _remove_dead_scratch(target_dir)
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", dir=target_dir))
    except OSError as e:
        raise UsageError(f"cannot write to {target_dir}: {e.strerror}") from None
    scratch = model.graph.meta.get(SCRATCH_KEY)
    moved: Path | None = None  # where the scratch file was, when it became the output's data
    written = False
    try:
        if external_data and isinstance(scratch, ScratchData):
            moved = scratch.adopt_into(model, tmp_dir / path.name, data_name)
        if moved is None:
            ir.save(model, tmp_dir / path.name, external_data=data_name if external_data else None)
        # Counted here: once renamed, another writer of the same output may replace them.
        size = sum((tmp_dir / p.name).stat().st_size for p in written_files)
        with _folder_lock(target_dir):
            if external_data:
                path.unlink(missing_ok=True)
                os.replace(tmp_dir / data_name, target_dir / data_name)
            os.replace(tmp_dir / path.name, path)
        written = True
        if moved is not None:
            _read_from(model, moved, target_dir / data_name)
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if moved is not None and not written:
            for place in (tmp_dir / data_name, target_dir / data_name):
                if place.exists():  # the model's new weights go back where the model reads them
                    os.replace(place, moved)
                    break
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return size


# Where a pipeline streaming a big model keeps its ScratchData (``model.graph.meta[...]``).
SCRATCH_KEY = "onnxcomp.scratch"
SCRATCH_PREFIX = ".onnxcomp-scratch."
_SCRATCH_ALIGN = 64
# A scratch file becomes the output's data file (no copy) when the model reads at least this
# share of it; below, the weights later passes replaced would be dead bytes in the output.
ADOPT_MIN_LIVE = 0.9
# Initializers of at least this many bytes go to external data (ir.save's default threshold).
EXTERNAL_MIN_BYTES = 256


class ScratchData:
    """An external data file that new weights are appended to as passes make them, so that
    rewriting a big model never holds all of its new weights in memory: each is written once
    and read back memory-mapped (:class:`onnx_ir.ExternalTensor`) when a later pass or
    :func:`save` needs it; ``save`` makes the file the output's data (:meth:`adopt_into`).

    Writes run on a background thread, one at a time, while the pass makes the next weight:
    a tensor :meth:`store` returns waits for its bytes when first read, and :meth:`flush`
    waits for all (the pipeline flushes after each pass; a failed write raises there).

    The folder (``.onnxcomp-scratch.PID.*`` in ``folder``, default the system's temporary
    folder) is removed when this object is garbage collected or at exit; one left by a killed
    process is removed by the next ``ScratchData`` made in the same folder.
    """

    def __init__(self, folder: str | os.PathLike | None = None):
        parent = Path(folder) if folder is not None else Path(tempfile.gettempdir())
        _remove_dead_scratch(parent)
        try:
            self.dir = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}.", dir=parent))
        except OSError as e:
            raise UsageError(f"cannot make a scratch folder in {parent}: {e.strerror}") from None
        self.path = self.dir / "weights.data"
        self.path.touch()
        self.bytes = 0
        self._end = 0  # where the next tensor goes in self.path
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="onnxcomp-scratch")
        self._pending: Future | None = None
        self._finalizer = weakref.finalize(self, _close_scratch, self._writer, self.dir)

    def store(self, tensor: ir.TensorProtocol) -> ir.ExternalTensor:
        """Append ``tensor``'s bytes and return a tensor reading them back from the file (its
        first read waits for the write). The caller must not change ``tensor`` afterwards."""
        self.flush()  # one write in flight: the memory held stays one tensor's
        offset = -(-self._end // _SCRATCH_ALIGN) * _SCRATCH_ALIGN
        length = tensor.nbytes
        self._end = offset + length
        self.bytes += length
        self._pending = self._writer.submit(_write_at, self.path, offset, length, tensor)
        return _WrittenLater(
            self.path.name, offset, length, tensor.dtype, shape=ir.Shape(tensor.shape),
            name=tensor.name or "", base_dir=self.dir, written=self._pending,
        )  # fmt: skip

    def holds(self, tensor: ir.TensorProtocol) -> bool:
        """Whether ``tensor`` is read from a file of this scratch folder (already stored)."""
        return isinstance(tensor, ir.ExternalTensor) and Path(_real(tensor.path)).parent == Path(
            _real(self.dir)
        )

    def flush(self) -> None:
        """Wait until every stored tensor is in the file; raises what a write raised."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def adopt_into(self, model: ir.Model, onnx_path: Path, data_name: str) -> Path | None:
        """Write ``model`` as ``onnx_path`` with the scratch file itself, moved beside it as
        ``data_name``, as its external data (the model's other weights appended), so saving
        copies none of the new weights. Returns where the file was (the caller moves it back
        there if the output cannot be put in place), or None, having written nothing, when a
        copy is the better choice: the model reads less than :data:`ADOPT_MIN_LIVE` of the
        file (weights a later pass replaced), or the output is on another file system. The
        model's tensors are left as they were (the caller points them at the output once it
        is in place: :func:`_read_from`)."""
        self.flush()
        initializers = [
            v for graph in model.graphs() for v in graph.initializers.values()
            if v.const_value is not None
        ]  # fmt: skip
        scratch_file = _real(self.path)
        ours = {
            (v.const_value.offset, v.const_value.length)
            for v in initializers
            if isinstance(v.const_value, ir.ExternalTensor)
            and _real(v.const_value.path) == scratch_file
        }
        size = self.path.stat().st_size
        if not ours or sum(length for _, length in ours) < ADOPT_MIN_LIVE * size:
            return None
        data_path = onnx_path.parent / data_name
        moved = self.path
        try:
            os.rename(moved, data_path)  # fails across file systems: then copy
        except OSError:
            return None
        # Later stores go to a new file: the output's data must not grow after it is written.
        self.path = self.dir / f"weights.{len(list(self.dir.iterdir()))}.data"
        self.path.touch()
        self._end = 0
        kept = {v: v.const_value for v in initializers}
        try:
            with open(data_path, "r+b") as f:
                for value, tensor in kept.items():
                    if isinstance(tensor, ir.ExternalTensor) and _real(tensor.path) == scratch_file:
                        offset, length = tensor.offset, tensor.length
                    elif tensor.nbytes >= EXTERNAL_MIN_BYTES:
                        offset, length = _append(f, tensor)
                    else:
                        continue  # small: inline, as ir.save leaves it
                    value.const_value = ir.ExternalTensor(
                        data_name, offset, length, tensor.dtype, shape=ir.Shape(tensor.shape),
                        name=tensor.name or value.name or "", base_dir=onnx_path.parent,
                    )  # fmt: skip
            onnx_path.write_bytes(ir.to_proto(model).SerializeToString())
        except BaseException:
            os.replace(data_path, moved)
            raise
        finally:
            for value, tensor in kept.items():
                value.const_value = tensor
        return moved

    def close(self) -> None:
        """Remove the folder now (tensors stored in it can no longer be read)."""
        self._finalizer()


def _read_from(model: ir.Model, old: Path, new: Path) -> None:
    """Point the model's tensors stored in file ``old`` (moved) at the same bytes in ``new``:
    the model reads its new weights from the output it was saved as, as if loaded from it."""
    old_file = _real(old)
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor) and _real(tensor.path) == old_file:
                value.const_value = ir.ExternalTensor(
                    new.name, tensor.offset, tensor.length, tensor.dtype,
                    shape=ir.Shape(tensor.shape), name=tensor.name, base_dir=new.parent,
                )  # fmt: skip


class _WrittenLater(ir.ExternalTensor):
    """A tensor in a :class:`ScratchData` file whose bytes a background write may still be
    putting there: reading it waits for the write (and raises what the write raised)."""

    def __init__(self, *args: Any, written: Future, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._written = written

    def _load(self) -> None:
        self._written.result()
        super()._load()

    def tofile(self, file: Any) -> None:
        self._written.result()
        super().tofile(file)


def _write_at(path: Path, offset: int, length: int, tensor: ir.TensorProtocol) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        tensor.tofile(f)
        if f.tell() - offset != length:  # nbytes promised what the file now holds
            raise OSError(f"wrote {f.tell() - offset} bytes of '{tensor.name}', not {length}")


def _close_scratch(writer: ThreadPoolExecutor, folder: Path) -> None:
    writer.shutdown(wait=True)
    shutil.rmtree(folder, ignore_errors=True)


def _append(f, tensor: ir.TensorProtocol) -> tuple[int, int]:
    """Write ``tensor``'s bytes at the end of open file ``f`` (aligned); offset and length."""
    f.seek(0, os.SEEK_END)
    offset = -(-f.tell() // _SCRATCH_ALIGN) * _SCRATCH_ALIGN
    f.seek(offset)
    tensor.tofile(f)
    return offset, f.tell() - offset


# Bytes between the pages a prefetch touches: one per page brings the page in, and the kernel
# reads ahead of those faults in large requests (a cold weight comes in at the disk's speed).
_PAGE = 4096


class Prefetcher:
    """Reads weights held in external data into the page cache on a background thread, so a
    pass going through a model weight by weight works on one while the disk delivers the next
    (``prefetch(next_weight)`` before working on this one). It touches a byte per page of a
    mapping of its own: no copy, no memory held but the page cache, and next to nothing when
    the pages are there already. Tensors in memory are ignored. Use as a context manager: on
    exit, reads not started are dropped."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None

    def __call__(self, *tensors: ir.TensorProtocol | None) -> None:
        for tensor in tensors:
            if isinstance(tensor, ir.ExternalTensor) and tensor.length >= _PAGE:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(1, thread_name_prefix="onnxcomp-prefetch")
                self._pool.submit(_touch_pages, tensor.path, tensor.offset, tensor.length)

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def read_ahead(items: Iterable[T], tensor: Callable[[T], ir.TensorProtocol | None]) -> Iterator[T]:
    """``items`` in order, the next one's ``tensor(item)`` read from disk in the background
    (:class:`Prefetcher`) while the caller works on the current one."""
    items = list(items)
    with Prefetcher() as prefetch:
        for index, item in enumerate(items):
            prefetch(*[tensor(ahead) for ahead in items[index + (index > 0) : index + 2]])
            yield item


# Bytes a prefetch maps at once: pages it touched count in the process's resident memory
# while mapped, so it maps a window at a time, not the tensor.
_WINDOW = 16 << 20


def _touch_pages(path: str | os.PathLike, offset: int, length: int) -> None:
    with contextlib.suppress(OSError, ValueError):  # gone or shorter: the reader will say so
        for start in range(offset, offset + length, _WINDOW):
            size = min(_WINDOW, offset + length - start)
            pages = np.memmap(path, dtype=np.uint8, mode="r", offset=start, shape=(size,))
            pages[::_PAGE].max()  # numpy releases the GIL while it faults the pages in
            del pages


def release(tensor: ir.TensorProtocol | None) -> None:
    """Unmap a weight held in external data once it has been read: a large model then never
    has all of its weights resident at once (it is mapped again if read again)."""
    if isinstance(tensor, ir.ExternalTensor):
        with contextlib.suppress(BufferError):  # a view of it is still alive somewhere
            tensor.release()


def _remove_dead_scratch(folder: Path) -> None:
    """Remove scratch folders (:class:`ScratchData`) of processes that are gone (killed)."""
    for old in folder.glob(f"{glob_escape(SCRATCH_PREFIX)}*.*"):
        pid = old.name[len(SCRATCH_PREFIX) :].partition(".")[0]
        if old.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)


def _remove_orphans(folder: Path, name: str) -> None:
    """Remove temporary folders an earlier write of ``name`` left when it was killed: those
    whose process (named in the folder name) is gone. A live writer's folder stays."""
    for tmp in folder.glob(f".{glob_escape(name)}.*.*"):
        pid, _, suffix = tmp.name[len(name) + 2 :].partition(".")
        # ".NAME.PID.RANDOM", RANDOM without dots: not another output's ".NAME.x.PID.RANDOM".
        if tmp.is_dir() and pid.isdigit() and "." not in suffix and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive flock on ``folder`` for the renames of one save: concurrent onnxcomp
    writers to one folder rename one at a time. The kernel drops it if the process dies."""
    if fcntl is None:  # not POSIX: renames are still atomic one by one
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def guard_paths(
    reads: Mapping[str, str | os.PathLike | None],
    writes: Mapping[str, str | os.PathLike | None],
    *,
    models_written: Collection[str] = (),
) -> None:
    """Refuse, before any work starts, a run that would write over a file it reads (a model,
    its external data, a data file) or write two outputs to one file.

    ``reads`` and ``writes`` map a flag (``--data``, ``-o``) to a path; a model written under
    one of ``models_written`` also claims its ``.data`` file. Every write target must be in a
    writable directory.
    """
    read_files: dict[str, str] = {}
    for flag, path in reads.items():
        if path is None:
            continue
        read_files.setdefault(_real(path), flag)
        for data_file in _external_data_files(Path(path)):
            read_files.setdefault(_real(data_file), f"the external data of {flag}")
    claimed: dict[str, str] = {}
    for flag, path in writes.items():
        if path is None:
            continue
        check_writable(path)
        targets = [Path(path)]
        if flag in models_written:
            targets.append(Path(path).with_name(f"{Path(path).name}.data"))
        for target in targets:
            real = _real(target)
            if real in read_files:
                raise UsageError(f"{flag} {target} would overwrite {read_files[real]}")
            if real in claimed:
                raise UsageError(f"{flag} {target} would overwrite the file {claimed[real]} writes")
            claimed[real] = flag


def _external_data_files(path: Path) -> list[Path]:
    """External data files an ONNX file names (none if it is not a readable model)."""
    if path.suffix != ".onnx" or not path.is_file():
        return []
    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception:
        return []  # not a model: load() reports that with its own message
    files = []
    for tensor in _all_tensors(proto):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = {e.key: e.value for e in tensor.external_data}.get("location")
            if location:
                files.append(path.parent / location)
    return files


def check_writable(path: str | os.PathLike) -> Path:
    """The directory ``path`` will be written in, or a UsageError saying why it cannot be.

    Called before any work starts, so a long run does not end on a bad ``-o``.
    """
    path = Path(path)
    target_dir = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise UsageError(f"output {path} is a directory; give a file name")
    if not target_dir.is_dir():
        raise UsageError(f"output directory {target_dir} does not exist")
    if not os.access(target_dir, os.W_OK | os.X_OK):
        raise UsageError(f"output directory {target_dir} is not writable")
    return target_dir


def is_main_process() -> bool:
    """False in the worker processes (rank > 0) of a torchrun job: only rank 0 writes files."""
    try:
        return int(os.environ.get("RANK", "0")) == 0
    except ValueError:
        return True


def weight_bytes(model: ir.Model) -> int:
    """Bytes held by initializers of the main graph and its subgraphs."""
    return sum(
        v.const_value.nbytes for v in iter_initializers(model) if v.const_value is not None
    )


def iter_initializers(model: ir.Model):
    """Every initializer value in the model, subgraphs included."""
    for graph in model.graphs():
        yield from graph.initializers.values()


def external_files(model: ir.Model) -> set[Path]:
    """Files that weights of ``model`` are currently read from."""
    files = set()
    for value in iter_initializers(model):
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor):
            files.add(Path(tensor.path))
    return files


def has_external_tensors(model: ir.Model) -> bool:
    return any(isinstance(v.const_value, ir.ExternalTensor) for v in iter_initializers(model))


def _check_tensors(proto: onnx.ModelProto, path: Path) -> None:
    """Fail early, with the tensor's name, when a tensor's data does not match its declared
    type and shape (a corrupt file: onnx.checker does not compare them, and the first pass to
    read the tensor would crash), or an external data file is missing or too short."""
    for tensor in _all_tensors(proto):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in tensor.external_data}
            data_path = path.parent / info.get("location", "")
            if not data_path.is_file():
                raise ModelLoadError(f"{path}: external data file {data_path} is missing")
            end = int(info.get("offset", 0)) + int(info.get("length", 0))
            if data_path.stat().st_size < end:
                raise ModelLoadError(f"{path}: external data file {data_path} is truncated")
            continue
        problem = _data_mismatch(tensor)
        if problem:
            raise ModelLoadError(f"{path}: tensor '{tensor.name}' {problem}")


# Typed repeated fields of TensorProto; a tensor stores its values in one of them.
_TYPED_FIELDS = ("float_data", "int32_data", "int64_data", "double_data", "uint64_data")


def _data_mismatch(tensor: onnx.TensorProto) -> str | None:
    """Why ``tensor``'s in-file data cannot be its declared dtype and shape, or None."""
    dims = list(tensor.dims)
    if any(d < 0 for d in dims):
        return f"has negative dims {dims}"
    if tensor.HasField("segment"):
        return None
    try:
        dtype = ir.DataType(tensor.data_type)
    except ValueError:
        return f"has an unknown data type {tensor.data_type}"
    count = math.prod(dims)
    if dtype == ir.DataType.STRING:
        found = len(tensor.string_data)
        return None if found == count else f"holds {found} strings for shape {dims}"
    if dtype == ir.DataType.UNDEFINED:
        return "has an undefined data type"
    if tensor.raw_data or not any(len(getattr(tensor, f)) for f in _TYPED_FIELDS):
        expected = math.ceil(count * dtype.bitwidth / 8)
        found = len(tensor.raw_data)
        if found != expected:
            return f"holds {found} bytes of data, its {dtype.name} shape {dims} needs {expected}"
        return None
    if dtype.bitwidth < 8:
        return None  # sub-byte codes may be packed into the typed field
    values = sum(len(getattr(tensor, f)) for f in _TYPED_FIELDS)
    expected = count * (2 if dtype in (ir.DataType.COMPLEX64, ir.DataType.COMPLEX128) else 1)
    if values != expected:
        return f"holds {values} values, its {dtype.name} shape {dims} needs {expected}"
    return None


def _all_tensors(proto: onnx.ModelProto):
    graphs = [proto.graph]
    while graphs:
        graph = graphs.pop()
        yield from graph.initializer
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                if attr.HasField("g"):
                    graphs.append(attr.g)
                graphs.extend(attr.graphs)


def _real(path: str | os.PathLike) -> str:
    return os.path.realpath(path)


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file (a JSON report) atomically: temp file beside it, then rename."""
    path = Path(path)
    target_dir = check_writable(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=target_dir)
    except OSError as e:
        raise UsageError(f"cannot write to {target_dir}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes files private; reports are not
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise UsageError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
