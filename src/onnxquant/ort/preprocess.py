"""``python -m onnxquant.ort.preprocess --input IN --output OUT``: onnxruntime's pre-processing
command line (``python -m onnxruntime.quantization.preprocess``), backed by
:func:`onnxquant.ort.shape_inference.quant_pre_process`.

The flags are onnxruntime's. Boolean flags take ``true``/``false``/``1``/``0`` (any case) or
no value (meaning true) and refuse anything else: onnxruntime 1.32 parses
``--skip_optimization False`` as *true*. Unlike onnxruntime, skipping every step is a usage
error (exit code 2), ``--save_as_external_data`` works with optimization, and the summary of
what changed is printed. Exit codes: 0 on success, 2 for usage errors and any
:class:`~onnxquant.core.errors.QuantizationError` (``error: <message>``), 1 when the operating
system refuses a file operation.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from onnxquant.ort._command import run_reported
from onnxquant.ort.shape_inference import quant_pre_process

__all__ = ["main", "build_parser", "parse_bool"]

_TRUE = ("true", "1")
_FALSE = ("false", "0")


def parse_bool(text: str) -> bool:
    """argparse type of the boolean flags: ``true``/``false``/``1``/``0``, any case."""
    word = text.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true, false, 1 or 0, got {text!r}")


def _flag(parser: argparse.ArgumentParser, name: str, help_text: str) -> None:
    parser.add_argument(name, type=parse_bool, nargs="?", const=True, default=False,
                        metavar="{true,false}", help=help_text)


def build_parser() -> argparse.ArgumentParser:
    """The parser, with onnxruntime's flags."""
    parser = argparse.ArgumentParser(
        prog="python -m onnxquant.ort.preprocess",
        description="Prepare a float model for quantization, in three skippable steps: "
                    "symbolic shape inference, graph optimization (onnxruntime's basic level), "
                    "ONNX shape inference.")
    parser.add_argument("--input", required=True, help="path of the input model (never "
                        "modified)")
    parser.add_argument("--output", required=True, help="path of the output model")
    _flag(parser, "--skip_optimization", "skip the graph optimization step")
    _flag(parser, "--skip_onnx_shape", "skip ONNX shape inference")
    _flag(parser, "--skip_symbolic_shape", "skip symbolic shape inference")
    _flag(parser, "--auto_merge", "merge symbolic dimensions that conflict instead of "
          "stopping symbolic inference there")
    parser.add_argument("--int_max", type=int, default=2**31 - 1,
                        help="the integer treated as unbounded in ops like Slice")
    _flag(parser, "--guess_output_rank", "give outputs of unknown ops the rank of input 0")
    parser.add_argument("--verbose", type=int, default=0,
                        help="accepted for compatibility; 1 or more prints the log of each "
                             "step")
    _flag(parser, "--save_as_external_data", "write the weights to an external-data file")
    _flag(parser, "--all_tensors_to_one_file", "accepted for compatibility: external data "
          "always goes to one file")
    parser.add_argument("--external_data_location", default=None, metavar="NAME",
                        help="external-data file name, next to the output (default "
                             "<output>.data)")
    parser.add_argument("--external_data_size_threshold", type=int, default=1024,
                        metavar="BYTES",
                        help="tensors of at least this size go to external data")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.skip_optimization and args.skip_onnx_shape and args.skip_symbolic_shape:
        parser.error("every step is skipped (--skip_optimization, --skip_onnx_shape and "
                     "--skip_symbolic_shape): nothing to do")
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_reported(lambda: quant_pre_process(
        args.input, args.output, args.skip_optimization, args.skip_onnx_shape,
        args.skip_symbolic_shape, args.auto_merge, args.int_max, args.guess_output_rank,
        args.verbose, args.save_as_external_data, args.all_tensors_to_one_file,
        args.external_data_location, args.external_data_size_threshold))


if __name__ == "__main__":
    sys.exit(main())
