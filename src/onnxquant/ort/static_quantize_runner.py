"""``python -m onnxquant.ort.static_quantize_runner -i MODEL -o OUTPUT [options]``: onnxruntime's
static quantization command line (``python -m onnxruntime.quantization.static_quantize_runner``),
backed by :func:`onnxquant.ort.quantize_static`.

Calibration data is read from the ``test_data_set_*`` folders next to the input model (the ONNX
test-data layout): each folder is one feed, its ``input_<i>.pb`` TensorProto files are the model's
inputs in graph order (inputs that have an initializer are skipped, as onnxruntime's session
does), unless a tensor carries a name, which is then used. Folders and files are taken in natural
order (``2`` before ``10``) and read one feed at a time.

The flags are onnxruntime's, with its defaults: activations ``quint8``, weights ``qint8``,
QDQ format, MinMax calibration, and ``--minimum_real_range 0.0001`` (``quantize_static`` itself
has no minimum range by default). The ``extra_options`` flags map one to one onto the keys below
and are always passed (a flag that is not given passes its "off" value, so
``EnableSubgraph`` is ``False`` unless ``--enable_subgraph`` is given, as in onnxruntime):

==============================================  ==============================================
flag                                            ``extra_options`` key
==============================================  ==============================================
``--enable_subgraph``                           ``EnableSubgraph``
``--force_quantize_no_input_check``             ``ForceQuantizeNoInputCheck``
``--matmul_const_b_only``                       ``MatMulConstBOnly``
``--add_qdq_pair_to_weight``                    ``AddQDQPairToWeight``
``--dedicated_qdq_pair``                        ``DedicatedQDQPair``
``--op_types_to_exclude_output_quantization``   ``OpTypesToExcludeOutputQuantization``
``--calib_tensor_range_symmetric``              ``CalibTensorRangeSymmetric``
``--calib_moving_average``                      ``CalibMovingAverage``
``--disable_quantize_bias``                     ``QuantizeBias`` (negated)
``--use_qdq_contrib_ops``                       ``UseQDQContribOps``
``--minimum_real_range``                        ``MinimumRealRange``
``--qdq_keep_removable_activations``            ``QDQKeepRemovableActivations``
``--qdq_disable_weight_adjust_for_int32_bias``  ``QDQDisableWeightAdjustForInt32Bias``
``--op_per_channel_axis OP AXIS`` (repeatable)  ``QDQOpTypePerChannelSupportToAxis``
``--tensor_quant_overrides FILE.json``          ``TensorQuantOverrides``
==============================================  ==============================================

How each key is handled (mapped, no effect, not supported yet: warned about or refused) is
described in :mod:`onnxquant.ort._options`; this module adds nothing to that policy.

:func:`main` behaves as onnxruntime's: it parses ``sys.argv`` (or ``argv``) and raises when
quantization fails (:class:`~onnxquant.core.errors.QuantizationError`, invalid values are also
``ValueError``); a usage error exits through argparse (``SystemExit(2)``). Run as a module, the
command prints the summary of the run and exits with 0 on success, 2 for usage errors and any
:class:`~onnxquant.core.errors.QuantizationError` (``error: <message>``), 1 when the operating
system refuses a file operation.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from onnxquant.calibration.readers import CalibrationDataReader, load_feed_folder
from onnxquant.calibration.session import model_input_specs
from onnxquant.core.errors import FeedError
from onnxquant.ort._command import run_reported
from onnxquant.ort._errors import InvalidOptionError
from onnxquant.ort.calibrate import CalibrationMethod
from onnxquant.ort.quant_utils import QuantFormat, QuantType
from onnxquant.ort.quantize import quantize_static
from onnxquant.static.api import QuantizationResult

__all__ = ["OnnxModelCalibrationDataReader", "build_parser", "parse_arguments",
           "get_extra_options", "main", "run"]


QUANT_TYPES: dict[str, QuantType] = {
    "qint8": QuantType.QInt8,
    "quint8": QuantType.QUInt8,
    "qint16": QuantType.QInt16,
    "quint16": QuantType.QUInt16,
    "qint4": QuantType.QInt4,
    "quint4": QuantType.QUInt4,
    "qfloat8e4m3fn": QuantType.QFLOAT8E4M3FN,
}
QUANT_FORMATS: dict[str, QuantFormat] = {"qdq": QuantFormat.QDQ,
                                         "qoperator": QuantFormat.QOperator}
CALIBRATION_METHODS: dict[str, CalibrationMethod] = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
    "distribution": CalibrationMethod.Distribution,
}
DEFAULT_MINIMUM_REAL_RANGE = 0.0001

_DATA_SET = re.compile(r"test_data_set_.*")


def _natural_key(path: Path) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


class OnnxModelCalibrationDataReader(CalibrationDataReader):
    """Feeds from the ``test_data_set_*`` folders next to a model, one folder per feed.

    The folders are listed when the reader is made (so a model without any fails at once);
    each feed is read from disk only when :meth:`get_next` reaches it.

    Args:
        model_path: The float model; its folder holds the ``test_data_set_*`` folders.

    Raises:
        FeedError: There is no ``test_data_set_*`` folder next to the model.
        ModelLoadError, UnsupportedModelError: The model's inputs cannot be read.
    """

    def __init__(self, model_path: str | os.PathLike[str]) -> None:
        model_dir = Path(model_path).resolve().parent
        self.data_dirs = sorted(
            (child for child in model_dir.iterdir()
             if child.is_dir() and _DATA_SET.fullmatch(child.name)),
            key=_natural_key)
        if not self.data_dirs:
            raise FeedError(
                f"No calibration data next to {model_path}: expected test_data_set_*/input_<i>.pb "
                f"folders in {model_dir}."
            )
        specs, initialized = model_input_specs(os.fspath(model_path))
        # Positions count the inputs a session must be fed, as onnxruntime's session does.
        self.input_specs = [spec for spec in specs if spec.name not in initialized]
        self.rewind()

    def get_next(self) -> dict[str, np.ndarray] | None:
        """Returns the next feed, or ``None`` after the last folder."""
        if self._next >= len(self.data_dirs):
            return None
        folder = self.data_dirs[self._next]
        self._next += 1
        return dict(next(iter(load_feed_folder(folder, self.input_specs))))

    def __len__(self) -> int:
        return len(self.data_dirs)

    def rewind(self) -> None:
        """Restarts at the first folder."""
        self._next = 0


def _axis_pair(parser: argparse.ArgumentParser, pair: Sequence[str]) -> tuple[str, int]:
    op_type, axis = pair
    try:
        return op_type, int(axis)
    except ValueError:
        parser.error(f"--op_per_channel_axis {op_type} {axis}: the axis must be an integer")


def build_parser() -> argparse.ArgumentParser:
    """The parser, with onnxruntime's flags and defaults."""
    parser = argparse.ArgumentParser(
        prog="python -m onnxquant.ort.static_quantize_runner",
        description="Quantize a float model statically; calibration data is read from the "
                    "test_data_set_*/input_<i>.pb folders next to the model.")
    parser.add_argument("-i", "--input_model_path", required=True,
                        help="path of the float model (never modified)")
    parser.add_argument("-o", "--output_quantized_model_path", required=True,
                        help="path of the quantized model to write")
    parser.add_argument("--activation_type", choices=sorted(QUANT_TYPES), default="quint8",
                        help="element type of activations (default quint8)")
    parser.add_argument("--weight_type", choices=sorted(QUANT_TYPES), default="qint8",
                        help="element type of weights (default qint8)")
    parser.add_argument("--quant_format", choices=sorted(QUANT_FORMATS), default="qdq",
                        help="qdq: QuantizeLinear/DequantizeLinear pairs (default); "
                             "qoperator: quantized operators (QLinearConv, ...)")
    parser.add_argument("--calibration_method", choices=list(CALIBRATION_METHODS),
                        default="minmax", help="how activation ranges are chosen "
                        "(default minmax)")
    parser.add_argument("--enable_subgraph", action="store_true",
                        help="quantize the bodies of If/Loop/Scan nodes (EnableSubgraph)")
    parser.add_argument("--force_quantize_no_input_check", action="store_true",
                        help="ForceQuantizeNoInputCheck")
    parser.add_argument("--matmul_const_b_only", action="store_true",
                        help="MatMulConstBOnly")
    parser.add_argument("--add_qdq_pair_to_weight", action="store_true",
                        help="AddQDQPairToWeight")
    parser.add_argument("--dedicated_qdq_pair", action="store_true",
                        help="DedicatedQDQPair")
    parser.add_argument("--op_types_to_exclude_output_quantization", nargs="+", default=[],
                        metavar="OP_TYPE", help="OpTypesToExcludeOutputQuantization")
    parser.add_argument("--calib_tensor_range_symmetric", action="store_true",
                        help="CalibTensorRangeSymmetric")
    parser.add_argument("--calib_moving_average", action="store_true",
                        help="CalibMovingAverage")
    parser.add_argument("--disable_quantize_bias", action="store_true",
                        help="keep biases float (QuantizeBias=False)")
    parser.add_argument("--use_qdq_contrib_ops", action="store_true",
                        help="UseQDQContribOps")
    parser.add_argument("--minimum_real_range", type=float,
                        default=DEFAULT_MINIMUM_REAL_RANGE, metavar="R",
                        help="MinimumRealRange (default 0.0001)")
    parser.add_argument("--qdq_keep_removable_activations", action="store_true",
                        help="QDQKeepRemovableActivations")
    parser.add_argument("--qdq_disable_weight_adjust_for_int32_bias", action="store_true",
                        help="QDQDisableWeightAdjustForInt32Bias")
    parser.add_argument("--per_channel", action="store_true",
                        help="per-channel weight scales")
    parser.add_argument("--nodes_to_quantize", nargs="+", default=None, metavar="NODE",
                        help="quantize only these nodes (default: all)")
    parser.add_argument("--nodes_to_exclude", nargs="+", default=None, metavar="NODE",
                        help="keep these nodes float")
    parser.add_argument("--op_per_channel_axis", nargs=2, action="append", default=[],
                        metavar=("OP_TYPE", "AXIS"),
                        help="per-channel axis of an op type "
                             "(QDQOpTypePerChannelSupportToAxis; repeatable)")
    parser.add_argument("--tensor_quant_overrides", default=None, metavar="FILE.json",
                        help="JSON file of TensorQuantOverrides "
                             "({tensor name: [{scale, zero_point, ...}]})")
    return parser


def parse_arguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses ``argv`` (default ``sys.argv[1:]``); a usage error exits with code 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.op_per_channel_axis = [_axis_pair(parser, pair) for pair in args.op_per_channel_axis]
    if not args.minimum_real_range >= 0:
        parser.error(f"--minimum_real_range must be >= 0, got {args.minimum_real_range}")
    return args


def _read_overrides(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as file:
        try:
            overrides = json.load(file)
        except json.JSONDecodeError as err:
            raise InvalidOptionError(f"--tensor_quant_overrides {path}: not valid JSON: {err}"
                                     ) from err
    if not isinstance(overrides, dict):
        raise InvalidOptionError(
            f"--tensor_quant_overrides {path}: expected a JSON object mapping tensor names to "
            f"lists of overrides, got a {type(overrides).__name__}"
        )
    return overrides


def get_extra_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ``extra_options`` of parsed arguments (reads the overrides file, if any).

    Raises:
        InvalidOptionError: The overrides file is not a JSON object.
        OSError: The overrides file cannot be read.
    """
    extra_options: dict[str, Any] = {
        "EnableSubgraph": args.enable_subgraph,
        "ForceQuantizeNoInputCheck": args.force_quantize_no_input_check,
        "MatMulConstBOnly": args.matmul_const_b_only,
        "AddQDQPairToWeight": args.add_qdq_pair_to_weight,
        "DedicatedQDQPair": args.dedicated_qdq_pair,
        "OpTypesToExcludeOutputQuantization": list(args.op_types_to_exclude_output_quantization),
        "CalibTensorRangeSymmetric": args.calib_tensor_range_symmetric,
        "CalibMovingAverage": args.calib_moving_average,
        "QuantizeBias": not args.disable_quantize_bias,
        "UseQDQContribOps": args.use_qdq_contrib_ops,
        "MinimumRealRange": args.minimum_real_range,
        "QDQKeepRemovableActivations": args.qdq_keep_removable_activations,
        "QDQDisableWeightAdjustForInt32Bias": args.qdq_disable_weight_adjust_for_int32_bias,
        "QDQOpTypePerChannelSupportToAxis": dict(args.op_per_channel_axis),
    }
    if args.tensor_quant_overrides:
        extra_options["TensorQuantOverrides"] = _read_overrides(args.tensor_quant_overrides)
    return extra_options


def main(argv: Sequence[str] | None = None) -> QuantizationResult:
    """Quantizes the model named on the command line (``sys.argv`` unless ``argv`` is given).

    Returns:
        The :class:`onnxquant.QuantizationResult` of the run.

    Raises:
        onnxquant.core.errors.QuantizationError: Quantization failed or an option is invalid or
            not supported yet (nothing is written then).
        OSError: A file cannot be read or written.
        SystemExit: A usage error (code 2), from argparse.
    """
    args = parse_arguments(argv)
    extra_options = get_extra_options(args)
    reader = OnnxModelCalibrationDataReader(args.input_model_path)
    return quantize_static(
        args.input_model_path,
        args.output_quantized_model_path,
        reader,
        quant_format=QUANT_FORMATS[args.quant_format],
        per_channel=args.per_channel,
        activation_type=QUANT_TYPES[args.activation_type],
        weight_type=QUANT_TYPES[args.weight_type],
        nodes_to_quantize=args.nodes_to_quantize,
        nodes_to_exclude=args.nodes_to_exclude,
        calibrate_method=CALIBRATION_METHODS[args.calibration_method],
        extra_options=extra_options,
    )


def run(argv: Sequence[str] | None = None) -> int:
    """The command: :func:`main`, with errors reported on stderr; returns the exit code."""
    return run_reported(lambda: main(argv))


if __name__ == "__main__":
    sys.exit(run())
