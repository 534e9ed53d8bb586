"""Steps shared by the quantizing subcommands (static, dynamic, weights): the ``--eval``
argument, the latency check on a real feed, and the warnings ``--quiet`` still shows."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from onnxquant.calibration.readers import iter_feeds, load_feed_folder
from onnxquant.core.speed import Latency, first_feed, measure_latency

__all__ = ["add_eval", "check_data", "latency", "print_warnings"]

logger = logging.getLogger(__name__)


def add_eval(parser: argparse.ArgumentParser | argparse._ArgumentGroup,
             implicit: str) -> None:
    """``--eval DIR`` (data the accuracy, float vs quantized outputs, is measured on) and
    ``--no-eval``; ``implicit`` says what is measured without ``--eval``."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--eval", type=Path, metavar="DIR",
                       help="measure the accuracy (float vs quantized outputs) on this data: a "
                            "folder of .npz files, a single .npz, or ONNX test_data_set_* "
                            f"folders (as --calib). Without it: {implicit}")
    group.add_argument("--no-eval", action="store_true",
                       help="do not measure the accuracy (nothing is held back from "
                            "calibration)")


def check_data(*paths: Path | None) -> None:
    """List each data folder now, so that a bad path fails before the model loads."""
    for path in paths:
        if path is not None:
            load_feed_folder(path)


def latency(args: argparse.Namespace, sources: Sequence[tuple[str, Path | None]]
            ) -> tuple[Latency | None, str | None]:
    """The float vs quantized latency when ``--check-speed`` was given, timed on the first
    feed of the first given source (``(option, path)`` pairs, e.g. ``("--eval", path)``), else
    on a random feed; returns (latency, why it could not be measured)."""
    if not args.check_speed:
        return None, None
    try:
        feed, label = None, None
        for option, path in sources:
            if path is not None:
                feed, label = first_feed(iter_feeds(path)), f"on the first {option} feed"
                break
        return measure_latency(args.model, args.output, feed, runs=args.check_speed,
                               feed_label=label), None
    except Exception as err:  # noqa: BLE001 - a failed measurement must not fail the run
        logger.debug("latency measurement failed", exc_info=True)
        return None, f"could not measure the latency: {err}"


def print_warnings(warnings: Sequence[str], quiet: bool) -> None:
    """Under ``--quiet`` (no summary), the result's warnings on stderr."""
    if quiet:
        for text in warnings:
            print(f"warning: {text}", file=sys.stderr)
