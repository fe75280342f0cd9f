"""``python -m onnxcomp`` is the ``onnxcomp`` command."""

from onnxcomp.cli import main

raise SystemExit(main())
