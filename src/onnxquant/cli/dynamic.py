"""The ``onnxquant dynamic`` subcommand: dynamic quantization, no calibration data.

``onnxquant dynamic MODEL -o OUT [--format qoperator|qdq] [--per-channel] ...`` quantizes
MatMul/Gemm/Conv/Gather/LSTM/Attention/EmbedLayerNormalization weights and prints a summary:
nodes per op type, float nodes by reason, the forms chosen for this runtime and why, the
accuracy (on ``--eval DIR``, else on random feeds when every input is float), warnings about
choices known to be slow on this CPU, sizes and time. Arguments become a
:class:`~onnxquant.dynamic.config.DynamicQuantConfig` in one place,
:func:`dynamic_config_from_args`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from onnxquant.cli.args import (
    add_model_handling,
    add_node_selection,
    add_objective,
    add_speed_check,
    add_verbosity,
    objective_fields,
    selection_fields,
)
from onnxquant.cli.common import add_eval, check_data, latency, print_warnings
from onnxquant.core.qtypes import QuantFormat, quant_type_from_name
from onnxquant.core.speed import count_ops, format_advice
from onnxquant.dynamic.api import quantize_dynamic
from onnxquant.dynamic.config import DynamicQuantConfig
from onnxquant.dynamic.result import format_dynamic_summary

__all__ = ["add_dynamic_parser", "run_dynamic", "dynamic_config_from_args",
           "format_dynamic_summary"]


def add_dynamic_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``dynamic`` subcommand to the main parser's subparsers."""
    p = subparsers.add_parser(
        "dynamic",
        help="quantize weights offline, activations at run time (no calibration data)",
        description="Dynamic quantization: weights are stored as 8-bit integers and activation "
                    "scales are computed at run time. QOperator form: MatMulInteger, "
                    "ConvInteger, QAttention, DynamicQuantizeLSTM, ...; QDQ form: "
                    "QuantizeLinear/DequantizeLinear fed by a ComputeQuantizationParameters "
                    "function.",
    )
    p.add_argument("model", metavar="MODEL", type=Path, help="float .onnx model (never modified)")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="OUT",
                   help="where to write the quantized model (must differ from MODEL)")
    add_eval(p, "4 random feeds when every model input is a float tensor, else nothing")
    num = p.add_argument_group("numerics")
    num.add_argument("--format", choices=[f.value for f in QuantFormat], default="qoperator",
                     help="qoperator (default) or qdq")
    num.add_argument("--weight-type", choices=("int8", "uint8"), default="int8",
                     help="element type of quantized weights (default int8)")
    num.add_argument("--per-channel", action="store_true",
                     help="one scale per output channel")
    num.add_argument("--reduce-range", action="store_true",
                     help="7-bit weights (for CPUs without VNNI)")
    num.add_argument("--asymmetric-weights", action="store_true",
                     help="asymmetric weights (default: symmetric for int8)")
    sel = add_node_selection(p)
    sel.add_argument("--all-matmuls", action="store_true",
                     help="also quantize MatMuls whose B is not a constant")
    sel.add_argument("--subgraphs", action="store_true",
                     help="also quantize inside If/Loop/Scan bodies (off by default)")
    add_model_handling(p)
    add_speed_check(p)
    add_objective(p)
    add_verbosity(p)
    p.set_defaults(run=run_dynamic)
    return p


def dynamic_config_from_args(args: argparse.Namespace) -> DynamicQuantConfig:
    """Translate parsed ``dynamic`` arguments into a :class:`DynamicQuantConfig`."""
    return DynamicQuantConfig(
        weight_type=quant_type_from_name(args.weight_type),
        per_channel=args.per_channel,
        reduce_range=args.reduce_range,
        weight_symmetric=False if args.asymmetric_weights else None,
        format=QuantFormat(args.format),
        **selection_fields(args),
        **objective_fields(args),
        matmul_const_b_only=not args.all_matmuls,
        subgraphs=args.subgraphs,
        fold_batchnorm=not args.no_fold_bn,
        upgrade_opset=args.upgrade_opset,
        external_data=True if args.external_data else None,
        evaluate=not args.no_eval,
        progress=not args.quiet,
    )


def run_dynamic(args: argparse.Namespace) -> int:
    """Run ``onnxquant dynamic``; returns 0 (errors are raised as QuantizationError)."""
    config = dynamic_config_from_args(args)
    check_data(args.eval)  # a bad path fails before the model loads
    result = quantize_dynamic(args.model, args.output, config, eval_data=args.eval)
    print_warnings(result.warnings(), args.quiet)
    if not args.quiet:
        advice = format_advice(count_ops(args.output), weight_signed=config.weight_type.signed,
                               qoperator=config.format is QuantFormat.QOPERATOR,
                               reduce_range=config.reduce_range)
        measured, failure = latency(args, [("--eval", args.eval)])
        print(format_dynamic_summary(result, [*advice, *filter(None, [failure])], measured))
    return 0
