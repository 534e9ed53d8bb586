"""The ``onnxquant`` command line: a thin layer over the Python API.

``onnxquant static MODEL -o OUT --calib DATA [options]`` quantizes a float model statically
(QDQ or QOperator, with calibration data), ``onnxquant dynamic MODEL -o OUT`` dynamically (no
data; :mod:`onnxquant.cli.dynamic`) and ``onnxquant weights MODEL -o OUT`` block-wise
weight-only (:mod:`onnxquant.cli.weights`); each prints a summary. ``onnxquant report FLOAT QUANT
--data DATA -o REPORT.html`` compares a quantized model with its float model layer by layer
(:mod:`onnxquant.cli.report`). ``onnxquant preprocess MODEL -o OUT`` prepares a float model for
quantization: shapes inferred, graph optimized (:mod:`onnxquant.cli.preprocess`). Arguments are
turned into a :class:`~onnxquant.static.config.StaticQuantConfig` in one place,
:func:`static_config_from_args`.

Exit codes: 0 on success, 2 for usage errors and for any
:class:`~onnxquant.core.errors.QuantizationError` (printed as ``error: <message>``, with a traceback
only under ``-v``), 1 when the operating system refuses a file operation, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Callable, Sequence

from onnxquant import __version__
from onnxquant.cli.calibrate import add_calibrate_parser
from onnxquant.cli.dynamic import add_dynamic_parser
from onnxquant.cli.preprocess import add_preprocess_parser
from onnxquant.cli.report import add_report_parser
from onnxquant.cli.static import add_static_parser
from onnxquant.cli.weights import add_weights_parser
from onnxquant.core.errors import QuantizationError

__all__ = ["main", "build_parser"]

EXIT_OS_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``onnxquant`` command, with all subcommands."""
    parser = argparse.ArgumentParser(
        prog="onnxquant",
        description="Quantize ONNX models for ONNX Runtime.",
    )
    parser.add_argument("--version", action="version", version=f"onnxquant {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_preprocess_parser(subparsers)
    add_static_parser(subparsers)
    add_calibrate_parser(subparsers)
    add_dynamic_parser(subparsers)
    add_weights_parser(subparsers)
    add_report_parser(subparsers)
    return parser


def _setup_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    package_logger = logging.getLogger("onnxquant")
    package_logger.handlers[:] = [handler]
    package_logger.setLevel(level)
    package_logger.propagate = False


def _fail(message: str, verbose: int, code: int) -> int:
    if verbose:
        traceback.print_exc(file=sys.stderr)
    print(f"error: {message}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``onnxquant`` command.

    Args:
        argv: Arguments without the program name; ``None`` means ``sys.argv[1:]``.

    Returns:
        The exit code: 0 on success, 2 for usage and quantization errors, 1 for operating-system
        errors, 130 when interrupted. (argparse itself exits with 2 on bad arguments.)
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    run: Callable[[argparse.Namespace], int] | None = getattr(args, "run", None)
    if run is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    _setup_logging(args.verbose)
    try:
        return run(args)
    except QuantizationError as err:
        return _fail(str(err), args.verbose, EXIT_USAGE)
    except OSError as err:
        where = f" ('{err.filename}')" if err.filename else ""
        return _fail(f"{err.strerror or err}{where}", args.verbose, EXIT_OS_ERROR)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
