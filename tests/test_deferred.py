"""sympy is imported only when used (onnxcomp/_deferred.py): each case runs in a fresh
interpreter, as the deferral only acts before onnx_ir is first imported."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _python(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def _tiny_model(path: Path) -> None:
    weight = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    w = numpy_helper.from_array(weight, "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], [w],
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), path)


def test_the_main_job_runs_without_importing_sympy(tmp_path: Path) -> None:
    _tiny_model(tmp_path / "m.onnx")
    out = _python(f"""
        import sys
        import onnxcomp
        onnxcomp.optimize({str(tmp_path / "m.onnx")!r}, "int8", output={str(tmp_path / "o.onnx")!r})
        print(type(sys.modules["sympy"]).__name__, "sympy.core" in sys.modules)
    """)
    assert out == "_StandIn False"
    assert (tmp_path / "o.onnx").exists()


def test_sympy_works_when_used_after_all() -> None:
    # Through the stand-in onnx_ir bound, through a submodule import (which loads the package
    # first: one sympy.core, not two), and through from-imports.
    out = _python("""
        import sys
        import onnxcomp, onnx_ir
        assert type(sys.modules["sympy"]).__name__ == "_StandIn"
        print(onnx_ir.SymbolicDim("N") * 2 + 1)
        import sympy.core.numbers
        import sympy
        from sympy import Integer
        assert type(sys.modules["sympy"]).__name__ == "module"
        assert sys.modules["sympy.core"] is sympy.core
        assert sympy.core.numbers.Integer is Integer is sympy.Integer
        print(sympy.Symbol("x") + Integer(1))
    """)
    assert out.splitlines() == ["2*N + 1", "x + 1"]


def test_a_submodule_imported_first_loads_the_package_once() -> None:
    out = _python("""
        import sys
        import onnxcomp
        import sympy.polys.rings as rings
        import sympy
        assert sys.modules["sympy.polys.rings"] is rings is sympy.polys.rings
        assert sympy.polys.rings.ring is rings.ring
        spec = sys.modules["sympy.polys"].__spec__  # its own again, not the stand-in's
        assert spec.name == "sympy.polys" and type(spec.loader).__name__ == "SourceFileLoader"
        print(type(sys.modules["sympy"]).__name__)
    """)
    assert out == "module"


def test_nothing_is_deferred_once_sympy_is_imported() -> None:
    out = _python("""
        import sys
        import sympy
        import onnxcomp
        from onnxcomp._deferred import defer_sympy
        print(type(sys.modules["sympy"]).__name__, defer_sympy())
    """)
    assert out == "module False"
