"""Errors that onnxcomp reports to a user as one line, with the exit code the CLI uses.

Anything that is not an :class:`OnnxcompError` reaching the CLI is a bug in onnxcomp;
the CLI still prints one line for it and points at ``--debug`` for the traceback.
"""

from __future__ import annotations


class OnnxcompError(Exception):
    """A problem with the model or the data a user handed us (CLI exit code 1)."""

    exit_code = 1

    def with_context(self, context: str) -> OnnxcompError:
        """This error, its message prefixed with ``context`` (e.g. the pass that raised it);
        type and attributes are kept, so any subclass can be re-raised this way."""
        self.args = (f"{context}: {self}", *self.args[1:])
        return self


class UsageError(OnnxcompError):
    """A problem with how onnxcomp was called: unknown pass, bad option, bad path (exit code 2)."""

    exit_code = 2


class ModelLoadError(OnnxcompError):
    """The input file is missing, unreadable or not an ONNX model."""


class UnsupportedModelError(OnnxcompError):
    """The model is valid ONNX but a pass cannot handle it (opset too old, op not supported)."""


class PassFailedError(OnnxcompError):
    """A pass raised or produced a model that failed verification; nothing was written."""

    def __init__(self, pass_name: str, reason: str) -> None:
        super().__init__(f"pass '{pass_name}' failed: {reason}")
        self.pass_name = pass_name
        self.reason = reason


class LossBoundError(OnnxcompError):
    """The pipeline's result fell below the loss bound (--max-drop / --min-cosine); nothing was
    written. ``pass_name`` is where the metric fell most."""

    def __init__(self, message: str, pass_name: str | None) -> None:
        super().__init__(message)
        self.pass_name = pass_name
