"""The ``onnxquant weights`` subcommand: block-wise weight-only quantization.

``onnxquant weights MODEL -o OUT --bits 4 --block-size 32 --algorithm rtn`` quantizes MatMul
(and, with ``--op-types MatMul,Gather``, Gather) weights and prints a short summary, with the
accuracy (on ``--eval DIR``; else GPTQ holds back calibration feeds, or random feeds are used
when every input is float) and a warning when nothing was quantized; ``--ray [ADDRESS]`` and
``--workers N`` accumulate GPTQ's Hessians on a Ray cluster. Arguments
become a :class:`~onnxquant.weight_only.config.WeightOnlyConfig` in one place,
:func:`weights_config_from_args`. The main ``onnxquant`` parser adds the subcommand with
:func:`add_weights_parser`; the command returns its exit code from :func:`run_weights`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from onnxquant.cli.args import (
    add_calibration_workers,
    add_verbosity,
    calibration_worker_fields,
    name_list,
)
from onnxquant.cli.common import add_eval, check_data, print_warnings
from onnxquant.core.errors import QuantizationError
from onnxquant.core.qtypes import QuantFormat
from onnxquant.weight_only.api import quantize_weights
from onnxquant.weight_only.config import (
    OVERRIDE_KEYS,
    GPTQSettings,
    WeightOnlyAlgorithm,
    WeightOnlyConfig,
)
from onnxquant.weight_only.result import format_weights_summary

__all__ = [
    "add_weights_parser",
    "run_weights",
    "weights_config_from_args",
    "format_weights_summary",
]


def _block_size(text: str) -> int | None:
    if text.lower() in ("channel", "0"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a power of two >= 16 or 'channel', got {text!r}") from None


def _override(text: str) -> tuple[str, dict[str, Any]]:
    """``NODE:bits=8,block_size=32,symmetric=true`` -> (NODE, {...})."""
    node, sep, spec = text.rpartition(":")
    if not sep or not node or not spec:
        raise argparse.ArgumentTypeError(
            f"expected NODE:key=value[,key=value], e.g. lm_head:bits=8, got {text!r}")
    values: dict[str, Any] = {}
    for item in spec.split(","):
        key, eq, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or key not in OVERRIDE_KEYS:
            raise argparse.ArgumentTypeError(
                f"bad override item {item!r} for node {node!r}; keys: {', '.join(OVERRIDE_KEYS)}")
        raw = raw.strip()
        if key == "symmetric":
            values[key] = raw.lower() in ("1", "true", "yes", "sym")
        elif key == "algorithm":
            values[key] = raw.lower()
        elif key == "block_size":
            values[key] = _block_size(raw)
        else:
            try:
                values[key] = int(raw)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{key} must be an integer, got {raw!r}") from None
    return node, values


def add_weights_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``weights`` subcommand to the main parser's subparsers."""
    p = subparsers.add_parser(
        "weights",
        help="quantize MatMul/Gather weights block-wise to 2/4/8 bits (weight-only)",
        description="Weight-only quantization: MatMul weights become MatMulNBits (or blocked "
                    "DequantizeLinear with --format qdq) and Gather tables GatherBlockQuantized; "
                    "activations stay float. Large models are processed one weight at a time.",
    )
    p.add_argument("model", metavar="MODEL", type=Path, help="float .onnx model (never modified)")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="OUT",
                   help="where to write the quantized model (must differ from MODEL)")
    num = p.add_argument_group("numerics")
    num.add_argument("--bits", type=int, choices=(2, 4, 8), default=4,
                     help="bits per weight (default 4; qdq format: 4 or 8)")
    num.add_argument("--block-size", type=_block_size, default=128, metavar="N",
                     help="weights per block along K: a power of two >= 16, or 'channel' for "
                          "one block per output column (default 128)")
    num.add_argument("--algorithm", choices=[a.value for a in WeightOnlyAlgorithm],
                     default="rtn", help="rtn (default), hqq (no data) or gptq (needs --calib)")
    sym = num.add_mutually_exclusive_group()
    sym.add_argument("--symmetric", dest="symmetric", action="store_true", default=False,
                     help="symmetric blocks, no stored zero points")
    sym.add_argument("--asymmetric", dest="symmetric", action="store_false",
                     help="a zero point per block (default)")
    num.add_argument("--format", choices=("qoperator", "qdq"), default="qoperator",
                     help="qoperator: MatMulNBits (default); qdq: DequantizeLinear -> MatMul "
                          "(opset 21)")
    num.add_argument("--accuracy-level", type=int, choices=range(5), metavar="N",
                     help="MatMulNBits accuracy_level 0-4 (4: int8 compute on CPU)")
    sel = p.add_argument_group("what to quantize (comma-separated lists, may be repeated)")
    sel.add_argument("--op-types", type=name_list, action="extend", metavar="OPS",
                     help="MatMul (default) and/or Gather")
    sel.add_argument("--gather-axis", type=int, default=1, metavar="AXIS",
                     help="axis along which Gather tables are blocked (default 1)")
    sel.add_argument("--nodes", type=name_list, action="extend", metavar="NAMES",
                     help="quantize only these nodes")
    sel.add_argument("--exclude", type=name_list, action="extend", metavar="NAMES",
                     help="keep these nodes float")
    sel.add_argument("--override", type=_override, action="append", metavar="NODE:K=V,...",
                     help="per-node settings, e.g. lm_head:bits=8 (keys: "
                          f"{', '.join(OVERRIDE_KEYS)})")
    gptq = p.add_argument_group("GPTQ")
    gptq.add_argument("--calib", type=Path, metavar="DATA",
                      help="calibration data: a folder of .npz files, one .npz, or ONNX "
                           "test_data_set_* folders")
    gptq.add_argument("--max-samples", type=int, metavar="N", help="use at most N feeds")
    gptq.add_argument("--percdamp", type=float, default=0.01,
                      help="Hessian dampening, fraction of its mean diagonal (default 0.01)")
    gptq.add_argument("--act-order", action="store_true",
                      help="quantize columns by decreasing Hessian diagonal")
    add_calibration_workers(gptq, "with --ray: Ray workers (one CPU each) sharing GPTQ's "
                                  "calibration inference (default 1)")
    add_eval(p, "every 10th --calib feed (at most 16) with --algorithm gptq, held back from "
                "calibration; else 4 random feeds when every model input is a float tensor")
    model = p.add_argument_group("model handling")
    model.add_argument("--upgrade-opset", action="store_true",
                       help="convert models older than opset 10 instead of refusing them")
    model.add_argument("--external-data", action="store_true",
                       help="store tensors in OUT.data (default: only above 2 GB)")
    add_verbosity(p)
    p.set_defaults(run=run_weights)
    return p


def weights_config_from_args(args: argparse.Namespace) -> WeightOnlyConfig:
    """Translate parsed ``weights`` arguments into a :class:`WeightOnlyConfig`."""
    return WeightOnlyConfig(
        bits=args.bits,
        block_size=args.block_size,
        symmetric=args.symmetric,
        algorithm=WeightOnlyAlgorithm(args.algorithm),
        format=QuantFormat(args.format),
        accuracy_level=args.accuracy_level,
        op_types=tuple(dict.fromkeys(args.op_types)) if args.op_types else ("MatMul",),
        quant_axes={"Gather": args.gather_axis},
        nodes_to_include=tuple(dict.fromkeys(args.nodes)) if args.nodes else None,
        nodes_to_exclude=tuple(dict.fromkeys(args.exclude or ())),
        overrides=dict(args.override or ()),
        gptq=GPTQSettings(percdamp=args.percdamp, act_order=args.act_order,
                          max_calibration_samples=args.max_samples),
        external_data=True if args.external_data else None,
        upgrade_opset=args.upgrade_opset,
        evaluate=not args.no_eval,
        progress=not args.quiet,
        **calibration_worker_fields(args),
    )


def run_weights(args: argparse.Namespace) -> int:
    """Run ``onnxquant weights``; returns 0 (errors are raised as QuantizationError), also
    when nothing was quantized (the summary — or, under ``--quiet``, stderr — warns)."""
    config = weights_config_from_args(args)
    if config.algorithm is WeightOnlyAlgorithm.GPTQ and args.calib is None:
        raise QuantizationError("--algorithm gptq needs calibration data: --calib DATA")
    check_data(args.calib, args.eval)  # a bad path fails before the model loads
    result = quantize_weights(args.model, args.output, config, args.calib, eval_data=args.eval)
    print_warnings(result.warnings(), args.quiet)
    if not args.quiet:
        print(format_weights_summary(result))
    return 0
