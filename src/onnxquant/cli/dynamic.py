"""The ``onnxquant dynamic`` subcommand: dynamic quantization, no calibration data.

``onnxquant dynamic MODEL -o OUT [--format qoperator|qdq] [--per-channel] ...`` quantizes
MatMul/Gemm/Conv/Gather/LSTM/Attention/EmbedLayerNormalization weights and prints a summary:
nodes per op type, float nodes by reason, the forms chosen for this runtime and why, warnings
about choices known to be slow on this CPU, sizes and time. Arguments become a
:class:`~onnxquant.dynamic.config.DynamicQuantConfig` in one place,
:func:`dynamic_config_from_args`.
"""

from __future__ import annotations

import argparse
import collections
import re
from collections.abc import Sequence
from pathlib import Path

from onnxquant.cli.args import (
    add_model_handling,
    add_node_selection,
    add_speed_check,
    add_verbosity,
    selection_fields,
)
from onnxquant.cli.summary import files_lines, size_line, speed_lines
from onnxquant.core.qtypes import QuantFormat, quant_type_from_name
from onnxquant.core.speed import Latency, count_ops, format_advice, measure_latency
from onnxquant.dynamic.api import DynamicQuantizationResult, quantize_dynamic
from onnxquant.dynamic.config import DynamicQuantConfig

__all__ = ["add_dynamic_parser", "run_dynamic", "dynamic_config_from_args",
           "format_dynamic_summary"]

_MAX_EXAMPLES = 3
_MAX_REASONS = 6
_QUOTED = re.compile(r"'[^']*'")


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
        matmul_const_b_only=not args.all_matmuls,
        subgraphs=args.subgraphs,
        fold_batchnorm=not args.no_fold_bn,
        upgrade_opset=args.upgrade_opset,
        external_data=True if args.external_data else None,
    )


def _table(result: DynamicQuantizationResult) -> list[str]:
    counts = result.counts()
    if not counts:
        return []
    width = max(len("op type"), *(len(op) for op in counts))
    lines = [f"  {'op type':<{width}}  quantized  float"]
    for op, (done, total) in sorted(counts.items(), key=lambda kv: (-kv[1][1], kv[0])):
        lines.append(f"  {op:<{width}}  {done:>9}  {total - done:>5}")
    return lines


def _float_reasons(result: DynamicQuantizationResult) -> list[str]:
    groups: dict[str, list[str]] = collections.defaultdict(list)
    for d in result.decisions:
        if d.action != "quantized":
            reason = _QUOTED.sub("'...'", d.reason) if d.reason else "(no reason given)"
            groups[reason].append(d.name or "<unnamed>")
    lines = []
    for reason, names in sorted(groups.items(), key=lambda kv: -len(kv[1]))[:_MAX_REASONS]:
        more = ", ..." if len(names) > _MAX_EXAMPLES else ""
        lines.append(f"  {len(names):>3}  {reason} [{', '.join(names[:_MAX_EXAMPLES])}{more}]")
    return lines


def format_dynamic_summary(result: DynamicQuantizationResult, advice: Sequence[str] = (),
                           latency: Latency | None = None) -> str:
    """Describe a dynamic quantization run in plain text (no trailing newline)."""
    done = len(result.quantized)
    lines = [f"quantized {done} of {len(result.decisions)} candidate nodes dynamically "
             f"({result.format.value})", *_table(result), ""]
    reasons = _float_reasons(result)
    if reasons:
        lines += [f"float nodes:  {len(result.decisions) - done}, by reason:", *reasons]
    if result.runtime_notes:
        lines.append("forms chosen for this onnxruntime:")
        lines += [f"  - {note}" for note in result.runtime_notes]
    lines.append(size_line(result.float_bytes, result.quantized_bytes))
    lines.append(f"time:         {result.seconds:.2f} s")
    lines += speed_lines(advice, latency)
    lines += files_lines(result.output_files)
    return "\n".join(lines)


def run_dynamic(args: argparse.Namespace) -> int:
    """Run ``onnxquant dynamic``; returns 0 (errors are raised as QuantizationError)."""
    config = dynamic_config_from_args(args)
    result = quantize_dynamic(args.model, args.output, config)
    if not args.quiet:
        advice = format_advice(count_ops(args.output), weight_signed=config.weight_type.signed,
                               qoperator=config.format is QuantFormat.QOPERATOR,
                               reduce_range=config.reduce_range)
        latency = None
        if args.check_speed:
            try:
                latency = measure_latency(args.model, args.output, runs=args.check_speed)
            except Exception as err:  # noqa: BLE001 - a failed measurement must not fail the run
                advice = [*advice, f"could not measure the latency: {err}"]
        print(format_dynamic_summary(result, advice, latency))
    return 0
