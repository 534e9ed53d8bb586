"""``onnxquant static MODEL -o OUT --calib DATA [--eval DIR]``: static quantization (QDQ or
QOperator) with calibration data, then the summary — with the accuracy measured on ``--eval``
data or on calibration feeds held back from calibration (``--no-eval`` skips it). Arguments
become a :class:`~onnxquant.static.config.StaticQuantConfig` in one place,
:func:`static_config_from_args`."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from onnxquant.cli.args import (
    add_calibration_workers,
    add_model_handling,
    add_node_selection,
    add_objective,
    add_speed_check,
    add_verbosity,
    calibration_worker_fields,
    objective_fields,
    positive_int,
    selection_fields,
)
from onnxquant.cli.common import add_eval, check_data, latency, print_warnings
from onnxquant.cli.summary import format_summary
from onnxquant.core.errors import QuantizationError
from onnxquant.core.qtypes import quant_type_from_name
from onnxquant.core.speed import count_ops, format_advice
from onnxquant.static.api import quantize_static
from onnxquant.static.config import CalibrationMethod, QuantFormat, StaticQuantConfig
from onnxquant.target import AccuracyTarget
from onnxquant.target.scoring import METRICS

__all__ = ["add_static_parser", "static_config_from_args"]

logger = logging.getLogger(__name__)

QUANT_TYPE_CHOICES = ("int8", "uint8", "int16", "uint16")
EXIT_OK = 0


def add_static_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "static",
        help="quantize a float model statically (QDQ) with calibration data",
        description="Quantize a float ONNX model statically into QDQ format: activation ranges "
                    "come from running calibration data through the model with onnxruntime.",
    )
    p.add_argument("model", metavar="MODEL", type=Path, help="float .onnx model (never modified)")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="OUT",
                   help="where to write the quantized model (must differ from MODEL)")
    p.add_argument("--calib", type=Path, metavar="DATA",
                   help="calibration data: a folder of .npz files (keys = input names), a single "
                        ".npz file, or a folder of ONNX test_data_set_* folders (may be omitted "
                        "when --calib-cache exists). Every 10th feed (at most 16) is held back "
                        "to measure the accuracy, unless --eval or --no-eval is given")
    p.add_argument("--max-samples", type=positive_int, metavar="N",
                   help="use at most N calibration feeds")
    add_eval(p, "every 10th --calib feed (at most 16) is held back from calibration for it")
    p.add_argument("--target", type=_target_spec, metavar="METRIC:SCORE",
                   help="search for a model that meets this accuracy on --eval (or held-back "
                        "calibration feeds): cosine:0.99, argmax:0.99 or sqnr:30 (dB); the "
                        "summary shows every candidate, the size/accuracy frontier and what "
                        "stays at higher precision")
    p.add_argument("--target-evaluations", type=positive_int, metavar="N",
                   help="with --target: evaluate at most N candidate models (default 40)")
    calib = p.add_argument_group("calibration")
    calib.add_argument("--method", choices=[m.value for m in CalibrationMethod],
                       default="minmax", help="how activation ranges are found (default minmax)")
    calib.add_argument("--percentile", type=float, default=99.999,
                       help="percentile method: %% of values kept in range (default 99.999)")
    calib.add_argument("--histogram-bins", type=positive_int, default=2048, metavar="N",
                       help="histogram methods: bins over the observed range (default 2048)")
    calib.add_argument("--quantized-bins", type=positive_int, default=128, metavar="N",
                       help="entropy: quantized levels of the KL search (default 128)")
    calib.add_argument("--symmetric-ranges", action="store_true",
                       help="calibrated ranges symmetric around 0")
    calib.add_argument("--moving-average", action="store_true",
                       help="minmax: exponential moving average of per-batch ranges")
    add_calibration_workers(calib)
    calib.add_argument("--calib-cache", type=Path, metavar="JSON",
                       help="statistics cache: reused if it exists (same settings), else written")

    numerics = p.add_argument_group("numerics")
    numerics.add_argument("--format", choices=[f.value for f in QuantFormat], default="qdq",
                          help="qdq: QuantizeLinear/DequantizeLinear around float ops (default); "
                               "qoperator: QLinearConv, QLinearMatMul, QGemm, ... "
                               "(use --activation-type uint8 with it on x86-64)")
    numerics.add_argument("--activation-type", choices=QUANT_TYPE_CHOICES, default="uint8",
                          help="element type of quantized activations (default: uint8, "
                               "i.e. U8S8 with int8 weights: the fast form on x86-64)")
    numerics.add_argument("--weight-type", choices=QUANT_TYPE_CHOICES, default="int8",
                          help="element type of quantized weights (default: int8)")
    numerics.add_argument("--per-channel", action="store_true",
                          help="one scale per output channel for Conv/Gemm/MatMul weights")
    numerics.add_argument("--reduce-range", action="store_true",
                          help="7-bit weights (for CPUs without VNNI)")
    numerics.add_argument("--symmetric-activations", action="store_true",
                          help="symmetric activation ranges")
    numerics.add_argument("--asymmetric-weights", action="store_true",
                          help="asymmetric weight ranges (default: symmetric for signed types)")
    numerics.add_argument("--no-bias-quantization", action="store_true",
                          help="keep Conv/Gemm biases float instead of int32")

    fix = p.add_argument_group("corrections")
    fix.add_argument("--no-bias-correction", action="store_true",
                     help="keep biases as they are (by default the mean output shift that "
                          "weight rounding causes is taken out of them)")
    fix.add_argument("--smooth-quant", type=_alpha, nargs="?", const=0.5, metavar="ALPHA",
                     help="SmoothQuant: move activation outlier channels into the next "
                          "MatMul/Gemm weights (ALPHA: migration strength, default 0.5)")
    fix.add_argument("--equalize-layers", action="store_true",
                     help="cross-layer equalization of consecutive Conv/MatMul layers")

    select = add_node_selection(p)
    select.add_argument("--keep-relu", action="store_true",
                        help="keep Relu/Clip even where the quantized range already clips")
    select.add_argument("--no-subgraphs", action="store_true",
                        help="do not quantize inside If/Loop/Scan bodies")

    model = add_model_handling(p)
    model.add_argument("--plan-json", type=Path, metavar="PATH",
                       help="also write the quantization plan (every decision and parameter) "
                            "as JSON")
    add_speed_check(p)
    add_objective(p)
    add_verbosity(p)
    p.set_defaults(run=_run_static)


def _alpha(text: str) -> float:
    """SmoothQuant's migration strength, in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} is not in [0, 1]")
    return value


def _target_spec(text: str) -> tuple[str, float]:
    """``metric:score`` (``argmax:0.99``) for ``--target``."""
    metric, _, value = text.partition(":")
    if metric not in METRICS or not value:
        raise argparse.ArgumentTypeError(
            f"'{text}': give METRIC:SCORE with METRIC one of {', '.join(METRICS)} "
            "(e.g. argmax:0.99, cosine:0.995, sqnr:30)")
    try:
        return metric, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{value}' is not a number") from None


def static_config_from_args(args: argparse.Namespace) -> StaticQuantConfig:
    """Translate parsed ``static`` arguments into a :class:`StaticQuantConfig`.

    This is the only place where command-line options become config fields.
    """
    return StaticQuantConfig(
        activation_type=quant_type_from_name(args.activation_type),
        weight_type=quant_type_from_name(args.weight_type),
        format=QuantFormat(args.format),
        per_channel=args.per_channel,
        reduce_range=args.reduce_range,
        activation_symmetric=args.symmetric_activations,
        weight_symmetric=False if args.asymmetric_weights else None,
        **selection_fields(args),
        **objective_fields(args),
        quantize_bias=not args.no_bias_quantization,
        keep_removable_activations=args.keep_relu,
        fold_batchnorm=not args.no_fold_bn,
        subgraphs=not args.no_subgraphs,
        upgrade_opset=args.upgrade_opset,
        external_data=True if args.external_data else None,
        max_calibration_samples=args.max_samples,
        progress=not args.quiet,
        calibration_method=CalibrationMethod(args.method),
        percentile=args.percentile,
        histogram_bins=args.histogram_bins,
        quantized_bins=args.quantized_bins,
        symmetric_ranges=args.symmetric_ranges,
        moving_average=args.moving_average,
        **calibration_worker_fields(args),
        calibration_cache=args.calib_cache,
        evaluate=not args.no_eval,
        bias_correction=not args.no_bias_correction,
        smooth_quant=args.smooth_quant is not None,
        smooth_quant_alpha=0.5 if args.smooth_quant is None else args.smooth_quant,
        equalize_layers=args.equalize_layers,
    )


def _run_static(args: argparse.Namespace) -> int:
    config = static_config_from_args(args)
    if args.calib is None and (args.calib_cache is None or not args.calib_cache.exists()):
        raise QuantizationError("give calibration data with --calib DATA (or an existing "
                                "--calib-cache)")
    check_data(args.calib, args.eval)  # a bad path fails before the model loads
    target = None
    if args.target is not None:
        target = AccuracyTarget(args.target[0], args.target[1],
                                max_evaluations=args.target_evaluations)
    result = quantize_static(args.model, args.output, args.calib, config, eval_data=args.eval,
                             target=target)
    if args.plan_json is not None:
        try:
            result.plan.to_json(args.plan_json)
        except OSError as err:
            raise QuantizationError(
                f"the model was written to '{args.output}', but the plan could not be written "
                f"to '{args.plan_json}': {err.strerror or err}"
            ) from err
    print_warnings(result.warnings(), args.quiet)
    if not args.quiet:
        advice = format_advice(
            count_ops(args.output), activation_bits=config.activation_type.bits,
            activation_signed=config.activation_type.signed,
            weight_signed=config.weight_type.signed,
            qoperator=config.format is QuantFormat.QOPERATOR, reduce_range=config.reduce_range)
        measured, failure = latency(args, [("--eval", args.eval), ("--calib", args.calib)])
        print(format_summary(result, [*advice, *filter(None, [failure])], measured))
    return EXIT_OK
