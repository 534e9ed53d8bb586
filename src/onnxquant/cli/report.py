"""``onnxquant report FLOAT QUANT --data DATA -o REPORT.html``: where a quantized model loses
accuracy, layer by layer — a self-contained HTML page (plots need matplotlib:
``pip install "onnxquant[report]"``) and ``REPORT.json`` beside it (the contract documented in
:mod:`onnxquant.debug.report`)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from onnxquant.calibration.readers import load_feed_folder
from onnxquant.cli.args import add_verbosity, positive_int
from onnxquant.core.errors import OutputPathError, QuantizationError
from onnxquant.debug.compare import compare

__all__ = ["add_report_parser"]

EXIT_OK = 0
EXIT_NO_HTML = 2


def add_report_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report",
        help="compare a quantized model with its float model, layer by layer (HTML + JSON)",
        description="Run the float and the quantized model on the same data and report, per "
                    "output, per layer and per weight, where accuracy is lost — and which "
                    "layers are worth keeping float.",
    )
    p.add_argument("float_model", metavar="FLOAT", type=Path, help="the float .onnx model")
    p.add_argument("quantized_model", metavar="QUANT", type=Path,
                   help="its quantized form (QDQ or QOperator, made by any tool)")
    p.add_argument("--data", required=True, type=Path, metavar="DATA",
                   help="inputs: a folder of .npz files (keys = input names), a single .npz "
                        "file, or a folder of ONNX test_data_set_* folders (as --calib)")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="REPORT.html",
                   help="the HTML report; REPORT.json is written beside it")
    p.add_argument("--max-samples", type=positive_int, metavar="N",
                   help="compare on at most N samples")
    p.add_argument("--layer-samples", type=positive_int, default=8, metavar="N",
                   help="compare layers, weights and activations on the first N samples "
                        "(default 8; the outputs are compared on all)")
    p.add_argument("--sensitivity-layers", type=int, default=8, metavar="K",
                   help="measure the output gain of keeping each of the K most suspicious "
                        "layers float (default 8; 0 skips)")
    p.add_argument("--sensitivity-samples", type=positive_int, metavar="N",
                   help="samples each sensitivity measurement runs (default: enough for "
                        "65536 output values, 1 to 32)")
    add_verbosity(p)
    p.set_defaults(run=_run_report)


def _outputs(html: Path, inputs: list[Path]) -> Path:
    """The JSON path beside ``html``; refuses destinations that are inputs or unwritable."""
    if html.suffix.lower() == ".json":
        raise OutputPathError(f"'{html}': give the HTML path (REPORT.html); the JSON is "
                              "written beside it")
    json_path = html.with_suffix(".json")
    folder = html.parent if str(html.parent) else Path(".")
    if not folder.is_dir():
        raise OutputPathError(f"the folder of '{html}' does not exist")
    if not os.access(folder, os.W_OK):
        raise OutputPathError(f"cannot write into the folder of '{html}'")
    for target in (html, json_path):
        for source in inputs:
            if target.resolve() == source.resolve():
                raise OutputPathError(f"'{target}' is an input file; choose another -o path")
    return json_path


def _run_report(args: argparse.Namespace) -> int:
    json_path = _outputs(args.output, [args.float_model, args.quantized_model])
    load_feed_folder(args.data)  # a bad data path fails before the models load
    report = compare(args.float_model, args.quantized_model, args.data,
                     max_samples=args.max_samples, layer_samples=args.layer_samples,
                     sensitivity_layers=args.sensitivity_layers,
                     sensitivity_samples=args.sensitivity_samples, progress=not args.quiet)
    report.save_json(json_path)
    try:
        report.save_html(args.output)
    except ImportError as err:
        print(f"error: {err}. The JSON report was written to '{json_path}'.", file=sys.stderr)
        return EXIT_NO_HTML
    except QuantizationError:
        raise
    if not args.quiet:
        print(report.summary())
        print(f"report: {args.output} (JSON: {json_path}), {report.seconds:.1f} s")
    return EXIT_OK
