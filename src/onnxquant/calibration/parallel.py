"""Calibration sharded across processes on this machine.

The parent reads and validates the feeds and deals them round-robin to ``workers`` processes
(bounded queues, so at most a few feeds are in flight); each worker runs its own onnxruntime
session over the augmented model and updates its own observers; the parent merges the
observers in worker order. Histograms and min/max merge exactly, so the ranges equal those of a
single process (the MinMax moving average is order-dependent and merges as a weighted mean).

The pieces a shard needs whatever runs it — :func:`shard_session`, :func:`observe` and
:func:`merge_observers` — are shared with the Ray backend
(:mod:`onnxquant.calibration.ray_cluster`).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import onnx_ir as ir
from tqdm.auto import tqdm

from onnxquant.core.errors import CalibrationError

__all__ = ["run_sharded", "shard_session", "observe", "merge_observers"]

logger = logging.getLogger(__name__)

_QUEUE_DEPTH = 2  # feeds waiting per worker
_POLL_SECONDS = 1.0


def shard_session(model: str | bytes, providers: Sequence[str], threads: int) -> Any:
    """An onnxruntime session for a calibration shard, over the augmented model as a path or
    serialized bytes (graph optimizations off: the exposed tensors must stay what they are)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(model, options, providers=list(providers))


def observe(session: Any, outputs: dict[str, str], observers: dict,
            items: Iterable[tuple[int, dict]]) -> int:
    """Run ``(index, feed)`` items through ``session`` into ``observers``; returns how many."""
    from onnxquant.calibration.session import run_batch, update_observers

    keys, names = list(outputs), list(outputs.values())
    count = 0
    for index, feed in items:
        update_observers(observers, keys, run_batch(session, names, feed, index))
        count += 1
    return count


def merge_observers(observers: dict, shards: Iterable[dict]) -> None:
    """Merge the observers of each shard, in the order given, into ``observers`` (exact for
    min/max and histograms; a MinMax moving average merges as a weighted mean)."""
    for shard in shards:
        for name, observer in shard.items():
            observers[name].merge(observer)


def _worker(model_path: str, providers: list[str], outputs: dict[str, str], observers: dict,
            threads: int, tasks: Any, results: Any) -> None:
    """Worker process: run feeds from ``tasks`` until None, then send back the observers."""
    try:
        session = shard_session(model_path, providers, threads)
        count = observe(session, outputs, observers, iter(tasks.get, None))
        results.put(("ok", observers, count))
    except BaseException as err:  # every failure must reach the parent
        results.put(("error", f"{type(err).__name__}: {err}", 0))


def _put(tasks: Any, item: Any, process: Any) -> None:
    while True:
        try:
            tasks.put(item, timeout=_POLL_SECONDS)
            return
        except queue.Full:
            if not process.is_alive():
                raise CalibrationError(
                    f"a calibration worker stopped unexpectedly (exit code {process.exitcode})"
                ) from None


def run_sharded(augmented: ir.Model, outputs: dict[str, str], observers: dict, feeds: Any,
                *, providers: Sequence[str], workers: int, workdir: Path, total: int | None,
                progress: bool) -> int:
    """Run validated ``feeds`` over ``workers`` processes; merges into ``observers``.

    Returns:
        The number of feeds processed.
    """
    path = workdir / "augmented.onnx"
    ir.save(augmented, path, external_data="augmented.onnx.data")
    context = multiprocessing.get_context("spawn")
    tasks = [context.Queue(maxsize=_QUEUE_DEPTH) for _ in range(workers)]
    results = context.Queue()
    threads = max(1, (os.cpu_count() or 1) // workers)
    processes = [
        context.Process(target=_worker, daemon=True,
                        args=(str(path), list(providers), outputs, observers, threads, t, results))
        for t in tasks
    ]
    for process in processes:
        process.start()
    try:
        samples = _deal(feeds, tasks, processes, total, progress)
        for task, process in zip(tasks, processes, strict=True):
            _put(task, None, process)
        _merge(observers, [results.get() for _ in processes])
    finally:
        for process in processes:
            process.join(timeout=5)
            if process.is_alive():
                process.terminate()
    return samples


def _deal(feeds: Any, tasks: list, processes: list, total: int | None, progress: bool) -> int:
    samples = 0
    with tqdm(total=total, desc="calibrating", unit="sample", disable=not progress) as bar:
        for index, feed in enumerate(feeds):
            worker = index % len(tasks)
            _put(tasks[worker], (index, feed), processes[worker])
            samples += 1
            bar.update(1)
    return samples


def _merge(observers: dict, replies: list[tuple[str, Any, int]]) -> None:
    errors = [message for status, message, _ in replies if status != "ok"]
    if errors:
        raise CalibrationError(f"calibration worker failed: {errors[0]}")
    merge_observers(observers, [worker_observers for _, worker_observers, _ in replies])
