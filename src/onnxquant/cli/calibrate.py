"""``onnxquant calibrate MODEL --calib DATA --trt-table DIR``: calibrate only and write the
activation ranges as a TensorRT calibration table (``calibration.flatbuffers``,
``calibration.json``, ``calibration.cache``) — thin over
:func:`onnxquant.calibration.runner.calibrate_ranges` and
:func:`onnxquant.ort.quant_utils.write_calibration_table`.

Every float tensor of the main graph (inputs and node outputs) is calibrated, under its name in
the model as given: TensorRT looks the ranges up by those names, so the model is not
pre-processed (``onnxquant.calibrate`` would calibrate only what it would quantize, after
folding)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import onnx
import onnx_ir as ir

from onnxquant.calibration.ray_cluster import backend_problem
from onnxquant.calibration.runner import calibrate_ranges
from onnxquant.calibration.settings import CalibrationMethod, CalibrationSettings
from onnxquant.cli.args import (
    add_calibration_workers,
    add_verbosity,
    calibration_worker_fields,
    positive_int,
)
from onnxquant.cli.common import check_data
from onnxquant.core import front_door
from onnxquant.core.errors import CalibrationError, OutputPathError
from onnxquant.ort.quant_utils import write_calibration_table

__all__ = ["add_calibrate_parser"]

logger = logging.getLogger(__name__)

EXIT_OK = 0


def add_calibrate_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "calibrate",
        help="calibrate activation ranges and write a TensorRT calibration table",
        description="Run calibration data through a float ONNX model and write each "
                    "activation's dynamic range max(|low|, |high|) as a TensorRT calibration "
                    "table (for onnxruntime's TensorRT execution provider).",
    )
    p.add_argument("model", metavar="MODEL", type=Path, help="float .onnx model (never modified)")
    p.add_argument("--calib", required=True, type=Path, metavar="DATA",
                   help="calibration data: a folder of .npz files (keys = input names), a single "
                        ".npz file, or a folder of ONNX test_data_set_* folders")
    p.add_argument("--trt-table", required=True, type=Path, metavar="DIR",
                   help="existing folder that receives calibration.flatbuffers, "
                        "calibration.json and calibration.cache")
    p.add_argument("--method", choices=[m.value for m in CalibrationMethod], default="minmax",
                   help="how activation ranges are found (default minmax)")
    p.add_argument("--percentile", type=float, default=99.999,
                   help="percentile method: %% of values kept in range (default 99.999)")
    p.add_argument("--max-samples", type=positive_int, metavar="N",
                   help="use at most N calibration feeds")
    p.add_argument("--op-types", nargs="+", metavar="OP",
                   help="calibrate only the inputs and outputs of these op types")
    add_calibration_workers(p.add_argument_group("workers"))
    add_verbosity(p)
    p.set_defaults(run=_run_calibrate)


def _run_calibrate(args: argparse.Namespace) -> int:
    if not args.trt_table.is_dir():
        raise OutputPathError(f"--trt-table folder '{args.trt_table}' does not exist; "
                              "create it first")
    check_data(args.calib)  # a bad path fails before the model loads
    model, _ = front_door.open_model(args.model)
    model = _with_types(model)
    settings = CalibrationSettings(method=CalibrationMethod(args.method),
                                   percentile=args.percentile)
    result = calibrate_ranges(model, _float_tensors(model, args.op_types), args.calib,
                              settings=settings, max_samples=args.max_samples,
                              progress=not args.quiet, **_workers(args))
    write_calibration_table(result.ranges, args.trt_table)
    if not args.quiet:
        print(f"wrote the ranges of {len(result.ranges)} tensors ({result.samples} samples, "
              f"{args.method}) to {args.trt_table}/calibration.{{flatbuffers,json,cache}}")
    return EXIT_OK


def _workers(args: argparse.Namespace) -> dict:
    """``--workers``/``--ray`` as :func:`calibrate_ranges` arguments (checked like the
    config's)."""
    fields = calibration_worker_fields(args)
    problem = backend_problem(fields["calibration_backend"], fields["ray_address"],
                              fields["calibration_workers"])
    if problem:
        raise CalibrationError(problem)
    return {"workers": fields["calibration_workers"], "backend": fields["calibration_backend"],
            "ray_address": fields["ray_address"]}


_FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


def _with_types(model: ir.Model) -> ir.Model:
    """The model with ONNX shape inference's element types (tensors without any are skipped)."""
    try:
        return ir.from_proto(onnx.shape_inference.infer_shapes(ir.to_proto(model)))
    except (onnx.shape_inference.InferenceError, ValueError) as err:
        logger.warning("shape inference failed (%s); only tensors with declared types are "
                       "calibrated", err)
        return model


def _float_tensors(model: ir.Model, op_types: list[str] | None) -> list[str]:
    """Float graph inputs and node inputs/outputs (not initializers) of the main graph."""
    graph = model.graph
    values = [] if op_types else list(graph.inputs)
    for node in graph:
        if not op_types or node.op_type in op_types:
            values.extend(v for v in (*node.inputs, *node.outputs) if v is not None)
    names = {v.name for v in values
             if v.name and v.dtype in _FLOATS and v.name not in graph.initializers}
    return sorted(names)
