"""The contract every onnxcomp pass follows.

A pass is an ``onnx_ir`` in-place pass with three additions:

- its options are a frozen dataclass (a subclass of :class:`PassOptions`) whose fields carry
  their help text; the same declaration drives the CLI, ``onnxcomp passes`` and the Python API;
- its result is a :class:`CompressionResult` that says what it did (stats) and what it left
  alone and why (notes), so nothing is skipped silently;
- it declares whether it is ``lossless`` (the pipeline then fails it when outputs move beyond
  the tolerance) and the lowest opset it handles.

Instrumentation (timing, checker, numeric comparison, cleanup) is the pipeline's job, not a pass's.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import onnx_ir as ir

from onnxcomp.errors import UnsupportedModelError, UsageError
from onnxcomp.passes._opset import onnx_opset

if typing.TYPE_CHECKING:
    from onnxcomp.data import Dataset
    from onnxcomp.target import Target


def option(default: Any, help: str) -> Any:
    """Declare one pass option: its default and a one-line help text."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("option defaults must be immutable; use a tuple")
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class PassOptions:
    """Base class of pass options. Subclasses are frozen dataclasses of typed ``option`` fields."""

    @classmethod
    def describe(cls) -> list[tuple[str, str, Any, str]]:
        """(name, type, default, help) for each option, in declaration order."""
        hints = typing.get_type_hints(cls)
        return [
            (f.name, _type_name(hints[f.name]), f.default, f.metadata.get("help", ""))
            for f in dataclasses.fields(cls)
        ]

    @classmethod
    def from_strings(
        cls,
        values: Mapping[str, str],
        *,
        pass_name: str,
        defaults: Mapping[str, Any] | None = None,
    ) -> PassOptions:
        """Build options from ``key=value`` text (command line) over ``defaults`` (presets)."""
        hints = typing.get_type_hints(cls)
        known = [f.name for f in dataclasses.fields(cls)]
        parsed: dict[str, Any] = {}
        for key, text in values.items():
            if key not in hints or key not in known:
                valid = ", ".join(known) or "none"
                raise UsageError(f"unknown option '{key}' for pass '{pass_name}' (valid: {valid})")
            parsed[key] = _parse_value(hints[key], text, f"{pass_name}:{key}")
        return cls(**{**(defaults or {}), **parsed})

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`UsageError` for values out of range; subclasses override."""

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class CompressionResult(ir.passes.PassResult):
    """What a pass did: ``stats`` (numbers for the report) and ``notes`` (what it skipped, why)."""

    stats: dict[str, Any] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)


class CompressionPass(ir.passes.InPlacePass):
    """Base class of onnxcomp passes.

    Subclasses set ``summary``, ``options_class`` and implement :meth:`apply`, returning a
    :class:`CompressionResult`. ``data`` is the user's ``--data`` set, for passes that need
    real inputs (calibration, importance); passes that need it set ``needs_data``. ``target`` is
    the machine the model is for (:mod:`onnxcomp.target`); passes whose output depends on it
    (integer layouts) read it, never the host. Passes that
    train against the pipeline's input model (distillation) set ``needs_teacher``: the pipeline
    then hands them that model, as it was before any pass ran, in ``teacher``.
    """

    summary: ClassVar[str] = ""
    options_class: ClassVar[type[PassOptions]] = PassOptions
    lossless: ClassVar[bool] = False
    min_opset: ClassVar[int] = 1
    needs_data: ClassVar[bool] = False
    needs_teacher: ClassVar[bool] = False
    teacher: ir.Model | None = None

    def __init__(
        self,
        options: PassOptions | None = None,
        *,
        data: Dataset | None = None,
        target: Target | None = None,
    ):
        super().__init__()
        if options is None:
            options = self.options_class()
        if not isinstance(options, self.options_class):
            raise TypeError(
                f"{type(self).__name__} takes {self.options_class.__name__}, "
                f"not {type(options).__name__}"
            )
        self.options = options
        self.data = data
        self.target = target

    def resolved_target(self) -> Target:
        """The target handed down by the pipeline, or the default one (``portable``)."""
        from onnxcomp.target import resolve_target

        return resolve_target(self.target)

    def preflight(self) -> None:
        """Checks that need no model (real inputs given, optional dependencies installed): the
        pipeline runs them for every pass before the first pass runs, so a long pipeline does
        not fail at its last step for a missing --data."""
        if self.needs_data and self.data is None:
            raise UsageError(f"{type(self).__name__} needs real inputs: pass --data FILE.npz")

    def requires(self, model: ir.Model) -> None:
        self.preflight()
        opset = onnx_opset(model)
        # A model importing only other domains (ai.onnx.ml) has no default opset to check.
        if opset and opset < self.min_opset:
            raise UnsupportedModelError(
                f"{type(self).__name__} needs opset >= {self.min_opset}, the model has opset "
                f"{opset}; upgrade it first (e.g. onnx.version_converter)"
            )

    def call(self, model: ir.Model) -> CompressionResult:
        return self.apply(model)

    def apply(self, model: ir.Model) -> CompressionResult:
        raise NotImplementedError


def name_list(names: Sequence[str], shown: int = 6) -> str:
    """``a, b, c and 4 more``: names for a report note without flooding it."""
    text = ", ".join(names[:shown])
    return text + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "|".join(str(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "none"
    return getattr(tp, "__name__", str(tp))


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _parse_value(tp: Any, text: str, where: str) -> Any:
    """Parse option text into ``tp``; lists are written ``a+b+c`` so pipelines stay shell-safe."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and text.lower() in {"none", ""}:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _parse_value(arg, text, where)
            except UsageError:
                continue
        raise UsageError(f"bad value '{text}' for {where}: expected {_type_name(tp)}")
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        for choice in choices:
            if str(choice) == text:
                return choice
        raise UsageError(
            f"bad value '{text}' for {where}: choose one of {', '.join(map(str, choices))}"
        )
    if origin is tuple:
        (item,) = typing.get_args(tp)[:1]
        return tuple(_parse_value(item, part, where) for part in text.split("+") if part)
    if tp is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise UsageError(f"bad value '{text}' for {where}: expected true or false")
    if tp in (int, float):
        try:
            return tp(text)
        except ValueError:
            raise UsageError(f"bad value '{text}' for {where}: expected {tp.__name__}") from None
    if tp is str:
        return text
    raise TypeError(f"option {where} has a type the parser does not know: {tp!r}")
