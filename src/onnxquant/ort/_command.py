"""What onnxquant.ort's ``python -m`` commands share: run the work, print its summary, and turn
a typed error into a message on stderr and an exit code."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from onnxquant.core.errors import QuantizationError

__all__ = ["EXIT_OK", "EXIT_OS_ERROR", "EXIT_USAGE", "run_reported"]

EXIT_OK = 0
EXIT_OS_ERROR = 1
EXIT_USAGE = 2


def run_reported(work: Callable[[], Any]) -> int:
    """Call ``work``; print the summary of what it returns, or the error; the exit code."""
    try:
        result = work()
    except QuantizationError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as err:
        where = f" ('{err.filename}')" if err.filename else ""
        print(f"error: {err.strerror or err}{where}", file=sys.stderr)
        return EXIT_OS_ERROR
    print(result.summary())
    return EXIT_OK
