"""``python -m onnxquant``: the same as the ``onnxquant`` command."""

from __future__ import annotations

import sys

from onnxquant.cli import main

__all__: list[str] = []

if __name__ == "__main__":
    sys.exit(main())
