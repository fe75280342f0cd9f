"""Run the fuzz tests (tests/test_fuzz.py) with thousands of cases instead of CI's few hundred.

    python benchmarks/fuzz.py            # hypothesis profile "thorough" (1500 examples a test)
    python benchmarks/fuzz.py -x -v      # extra arguments go to pytest

Every case must end in exit 0 with a valid model, or one line and exit 1/2 with no output
file; hypothesis prints the smallest failing model mutation it finds.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    args = [str(ROOT / "tests" / "test_fuzz.py"), "--hypothesis-profile=thorough", "-q",
            "-p", "no:cacheprovider", *sys.argv[1:]]  # fmt: skip
    sys.exit(pytest.main(args))
