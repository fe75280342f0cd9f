"""Defer importing sympy until something uses it.

onnx_ir imports sympy (and its ``_symbolic_shapes``, which reads sympy at import) for the
arithmetic of symbolic dims, which onnxcomp never does: ~0.25 s, a fifth of every command's
start-up. Importing this module (onnxcomp's ``__init__`` does so first) calls
:func:`defer_sympy`, which puts stand-ins for both in ``sys.modules`` before onnx_ir is
imported. The first attribute read from a stand-in, or the first import of a submodule
(``import sympy.core``: :class:`_SubmoduleFinder`), imports the real module and copies its
namespace into the stand-in, so code that bound the stand-in (``import sympy``) sees the
real thing from then on, and later imports get the real module.

:class:`importlib.util.LazyLoader` cannot do this: ``import sympy`` in a second module reads
``__spec__``, which makes it load at once. A stand-in carries its spec and path as plain
attributes. If onnx_ir stops having ``_symbolic_shapes``, or something imported either module
first, nothing is deferred; nothing is ever wrong, only slower.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import threading
import types
from collections.abc import Sequence

_LOCK = threading.RLock()  # a load may import the other stand-in's module


class _StandIn(types.ModuleType):
    """A module not imported yet: its first missing attribute imports it."""

    def __getattr__(self, attribute: str) -> object:
        return getattr(_load(self), attribute)


def _load(stand_in: _StandIn) -> types.ModuleType:
    """The real module behind ``stand_in`` (imported once), its namespace copied in."""
    name = stand_in.__name__
    with _LOCK:
        real = sys.modules.get(name)
        if real is None or real is stand_in:
            sys.modules.pop(name, None)
            try:
                real = importlib.import_module(name)
            except BaseException:
                sys.modules[name] = stand_in
                raise
            parent, _, child = name.rpartition(".")
            if parent and parent in sys.modules:
                setattr(sys.modules[parent], child, real)
        namespace = dict(vars(real))
        namespace.pop("__getattr__", None)
        vars(stand_in).update(namespace)
    return real


class _Existing(importlib.abc.Loader):
    """Hands the import system a module that loading its parent has already imported."""

    def __init__(self, module: types.ModuleType) -> None:
        self.module = module
        self.spec = module.__spec__

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return self.module

    def exec_module(self, module: types.ModuleType) -> None:
        module.__spec__ = self.spec  # the import system set ours


class _SubmoduleFinder(importlib.abc.MetaPathFinder):
    """First on ``sys.meta_path`` while a stand-in waits: importing a submodule of it loads
    the real package first, which may import that submodule itself; then the import gets
    that module. (The import system would run it again from its own ``__spec__``: that is
    None from here until :class:`_Existing` puts it back.)"""

    def find_spec(
        self, name: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        parent = name.rpartition(".")[0]
        if not parent or not isinstance(sys.modules.get(parent), _StandIn):
            return None
        _load(sys.modules[parent])  # type: ignore[arg-type]
        module = sys.modules.get(name)
        if module is None:
            return None  # the path finders find it under the real package
        loader = _Existing(module)
        module.__spec__ = None
        return importlib.util.spec_from_loader(name, loader)


def _stand_in(name: str, spec: importlib.machinery.ModuleSpec) -> None:
    module = _StandIn(name)
    module.__spec__ = spec
    module.__loader__ = spec.loader
    if spec.submodule_search_locations is not None:
        module.__path__ = list(spec.submodule_search_locations)
    sys.modules[name] = module


def defer_sympy() -> bool:
    """Stand-ins for sympy and ``onnx_ir._symbolic_shapes``; False where that cannot be
    done (either is imported already, or not where expected)."""
    if any(name in sys.modules for name in ("sympy", "onnx_ir", "onnx_ir._symbolic_shapes")):
        return False
    sympy = importlib.util.find_spec("sympy")
    onnx_ir = importlib.util.find_spec("onnx_ir")  # a top-level spec: onnx_ir is not run
    if sympy is None or onnx_ir is None or not onnx_ir.submodule_search_locations:
        return False
    shapes = importlib.machinery.PathFinder.find_spec(
        "onnx_ir._symbolic_shapes", list(onnx_ir.submodule_search_locations)
    )
    if shapes is None:
        return False
    if not any(isinstance(finder, _SubmoduleFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _SubmoduleFinder())
    _stand_in("sympy", sympy)
    _stand_in("onnx_ir._symbolic_shapes", shapes)
    return True


defer_sympy()
