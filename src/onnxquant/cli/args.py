"""Argument pieces shared by the ``onnxquant`` subcommands (static, dynamic, weights)."""

from __future__ import annotations

import argparse
from typing import Any

from onnxquant.calibration.ray_cluster import valid_ray_address
from onnxquant.core.objective import Objective

__all__ = ["name_list", "unique", "add_node_selection", "selection_fields",
           "add_model_handling", "add_speed_check", "add_objective", "objective_fields",
           "add_verbosity", "positive_int",
           "add_calibration_workers", "calibration_worker_fields"]


def name_list(text: str) -> list[str]:
    """``"Conv, MatMul"`` -> ``["Conv", "MatMul"]`` (argparse type for comma-separated lists)."""
    names = [part.strip() for part in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"empty name in {text!r}; use a list like Conv,MatMul")
    return names


def unique(names: list[str] | None) -> tuple[str, ...]:
    """The names in order, each once."""
    return tuple(dict.fromkeys(names or ()))


def add_node_selection(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """``--op-types``, ``--exclude-op-types``, ``--nodes`` and ``--exclude-nodes``."""
    select = parser.add_argument_group(
        "what to quantize (comma-separated lists, may be repeated)")
    select.add_argument("--op-types", type=name_list, action="extend", metavar="OPS",
                        help="quantize only these op types, e.g. Conv,MatMul")
    select.add_argument("--exclude-op-types", type=name_list, action="extend", metavar="OPS",
                        help="never quantize these op types")
    select.add_argument("--nodes", type=name_list, action="extend", metavar="NAMES",
                        help="quantize only the nodes with these names")
    select.add_argument("--exclude-nodes", type=name_list, action="extend", metavar="NAMES",
                        help="never quantize the nodes with these names")
    return select


def selection_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields of :func:`add_node_selection`'s arguments."""
    return {
        "op_types": unique(args.op_types) if args.op_types else None,
        "op_types_to_exclude": unique(args.exclude_op_types),
        "nodes_to_quantize": unique(args.nodes) if args.nodes else None,
        "nodes_to_exclude": unique(args.exclude_nodes),
    }


def add_model_handling(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """``--no-fold-bn``, ``--upgrade-opset`` and ``--external-data``."""
    model = parser.add_argument_group("model handling")
    model.add_argument("--no-fold-bn", action="store_true",
                       help="do not fold BatchNormalization into the preceding Conv")
    model.add_argument("--upgrade-opset", action="store_true",
                       help="convert models older than opset 10 instead of refusing them")
    model.add_argument("--external-data", action="store_true",
                       help="store tensors in OUT.data next to the model "
                            "(default: only when the model exceeds 2 GB)")
    return model


def add_speed_check(parser: argparse.ArgumentParser) -> None:
    """``--check-speed [RUNS]``: time the float and the quantized model."""
    parser.add_argument("--check-speed", nargs="?", const=30, type=positive_int, metavar="RUNS",
                        help="time the float and the quantized model (1 thread, median of RUNS "
                             "runs, default 30) on the first --eval (or --calib) feed, else on a "
                             "random feed with symbolic dims = 1, and report the speed-up")


def add_objective(parser: argparse.ArgumentParser) -> None:
    """``--objective speed|balanced|size`` and ``--no-measure-costs``."""
    parser.add_argument("--objective", choices=[o.value for o in Objective],
                        default=Objective.BALANCED.value,
                        help="speed: no Conv/MatMul/Gemm whose integer form is measured slower "
                             "than float is quantized; balanced (default): the same, but a "
                             "small slowdown is accepted for a large weight saving; size: "
                             "quantize every weight and report the latency cost")
    parser.add_argument("--no-measure-costs", action="store_true",
                        help="do not time onnxruntime's kernels on this machine (cached in "
                             "~/.cache/onnxquant/costs.json); fixed rules decide instead")


def objective_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields of :func:`add_objective`'s options."""
    return {"objective": Objective(args.objective),
            "measure_costs": False if args.no_measure_costs else None}


def add_calibration_workers(group: argparse._ArgumentGroup,
                            workers_help: str | None = None) -> None:
    """``--workers N`` and ``--ray [ADDRESS]``: where the calibration inference runs."""
    group.add_argument("--workers", type=positive_int, default=1, metavar="N",
                       help=workers_help or "processes (with --ray: Ray workers, one CPU each) "
                            "sharing the calibration inference (same ranges as one)")
    group.add_argument("--ray", nargs="?", const="", type=_ray_address, metavar="ADDRESS",
                       help="calibrate on a Ray cluster (pip install 'onnxquant[ray]'): "
                            "ADDRESS is host:port of a cluster started with `ray start --head`; "
                            "without it a local cluster bound to 127.0.0.1 is started")


def calibration_worker_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields of :func:`add_calibration_workers`' options."""
    return {"calibration_workers": args.workers,
            "calibration_backend": "local" if args.ray is None else "ray",
            "ray_address": args.ray or None}


def _ray_address(text: str) -> str:
    """argparse type of ``--ray``: ``host:port``, ``ray://host:port`` or ``auto``."""
    if text and not valid_ray_address(text):  # "" is --ray without an address
        raise argparse.ArgumentTypeError(
            f"expected a Ray cluster address host:port (e.g. 10.0.0.5:6379), got {text!r}; "
            "without an address, put --ray after the model path")
    return text


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_verbosity(parser: argparse.ArgumentParser) -> None:
    """``-q/--quiet`` and ``-v/--verbose`` (repeatable)."""
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress bar and no summary (errors and warnings still shown)")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log progress (-vv: debug detail) and show tracebacks on errors")
