"""``onnxquant preprocess MODEL -o OUT``: prepare a float model for quantization (symbolic
shape inference, onnxruntime's basic graph optimization, ONNX shape inference), then print what
changed: nodes per op type, value shapes known before and after, where inference stopped.
Arguments become a :class:`~onnxquant.preprocess.config.PreprocessConfig` in one place,
:func:`preprocess_config_from_args`."""

from __future__ import annotations

import argparse
from pathlib import Path

from onnxquant.cli.args import add_verbosity, positive_int
from onnxquant.cli.common import print_warnings
from onnxquant.preprocess.api import preprocess
from onnxquant.preprocess.config import PreprocessConfig
from onnxquant.preprocess.transformers import MODEL_TYPES

__all__ = ["add_preprocess_parser", "preprocess_config_from_args", "run_preprocess"]

EXIT_OK = 0


def add_preprocess_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``preprocess`` subcommand to the main parser's subparsers."""
    p = subparsers.add_parser(
        "preprocess",
        help="prepare a float model for quantization (shapes, constant folding, fusions)",
        description="Prepare a float model for quantization: symbolic shape inference (keeps "
                    "what it infers when it cannot finish), onnxruntime's basic graph "
                    "optimization (constant folding, Identity/Dropout removal, Conv+BatchNorm "
                    "and Conv+Add folding, common subexpressions) and ONNX shape inference. "
                    "The output computes the same function.",
    )
    p.add_argument("model", metavar="MODEL", type=Path, help="float .onnx model (never modified)")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="OUT",
                   help="where to write the result (must differ from MODEL)")
    steps = p.add_argument_group("steps")
    steps.add_argument("--no-symbolic-shapes", action="store_true",
                       help="skip symbolic shape inference")
    steps.add_argument("--no-optimize", action="store_true",
                       help="skip graph optimization")
    steps.add_argument("--no-onnx-shapes", action="store_true",
                       help="skip ONNX shape inference")
    fusion = p.add_argument_group("transformer fusion")
    fusion.add_argument("--model-type", choices=MODEL_TYPES, metavar="TYPE",
                        help="fuse a transformer with onnxruntime's transformer optimizer "
                             f"({', '.join(MODEL_TYPES)}): Attention, LayerNorm and Gelu "
                             "fusions that dynamic quantization turns into QAttention")
    fusion.add_argument("--num-heads", type=positive_int, default=0, metavar="N",
                        help="attention heads (default: read from the graph)")
    fusion.add_argument("--hidden-size", type=positive_int, default=0, metavar="N",
                        help="hidden size (default: read from the graph)")
    shapes = p.add_argument_group("symbolic shape inference")
    shapes.add_argument("--auto-merge", action="store_true",
                        help="merge symbolic dimensions that conflict (a guess) instead of "
                             "stopping there")
    shapes.add_argument("--guess-output-rank", action="store_true",
                        help="give outputs of unknown ops the rank of their first input")
    shapes.add_argument("--int-max", type=positive_int, default=2**31 - 1, metavar="N",
                        help="the integer treated as unbounded in Slice ends (default 2^31-1)")
    model = p.add_argument_group("model handling")
    model.add_argument("--upgrade-opset", action="store_true",
                       help="convert models older than opset 10 instead of refusing them")
    model.add_argument("--external-data", action="store_true",
                       help="store tensors in OUT.data next to the model "
                            "(default: only when the model exceeds 2 GB)")
    add_verbosity(p)
    p.set_defaults(run=run_preprocess)
    return p


def preprocess_config_from_args(args: argparse.Namespace) -> PreprocessConfig:
    """Translate parsed ``preprocess`` arguments into a :class:`PreprocessConfig`."""
    return PreprocessConfig(
        symbolic_shapes=not args.no_symbolic_shapes,
        optimize=not args.no_optimize,
        onnx_shapes=not args.no_onnx_shapes,
        auto_merge=args.auto_merge,
        guess_output_rank=args.guess_output_rank,
        int_max=args.int_max,
        external_data=True if args.external_data else None,
        upgrade_opset=args.upgrade_opset,
        model_type=args.model_type,
        num_heads=args.num_heads,
        hidden_size=args.hidden_size,
    )


def run_preprocess(args: argparse.Namespace) -> int:
    """Run ``onnxquant preprocess`` with parsed arguments; returns the exit code."""
    result = preprocess(args.model, args.output, preprocess_config_from_args(args))
    print_warnings(result.warnings(), args.quiet)
    if not args.quiet:
        print(result.summary())
    return EXIT_OK
