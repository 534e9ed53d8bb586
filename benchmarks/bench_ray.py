#!/usr/bin/env python
"""Calibration on Ray against one process: are the ranges identical, and what does it cost?

For each corpus model (default minilm_l6 and rapidocr_det_v4, their 32 "calib" feeds) and each
method (MinMax, Entropy, Percentile), the model is prepared once as ``quantize_static`` would
(``prepare_model``, ``select_nodes``, ``tensors_to_calibrate``) and its activations calibrated:

    one process:  calibrate_ranges(model, names, feeds, settings=...)
    ray:          calibrate_ranges(..., backend="ray", workers=2)

against one local Ray cluster (started once by ``ray_cluster.ray_session``: 127.0.0.1 only,
``--cpus`` CPUs, no dashboard; its start-up time is printed separately). The Ray time
includes what every call pays: serializing the model, shipping it, starting the workers and
building their sessions.
"identical" compares every range as exact floats. One onnxruntime thread per Ray worker; the
single process uses onnxruntime's default threads.

Memory is capped: a watchdog ends the run (exit 3) when this process and its children (Ray's
processes included) together exceed ``--mem-limit-gb`` of RSS.

    python benchmarks/bench_ray.py [--models a,b] [--methods minmax,entropy,percentile]
        [--workers 2] [--cpus 2] [--mem-limit-gb 8]
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _corpus_eval as ce  # noqa: E402

from onnxquant import CalibrationMethod, StaticQuantConfig  # noqa: E402
from onnxquant.calibration import ray_cluster  # noqa: E402
from onnxquant.calibration.runner import calibrate_ranges  # noqa: E402
from onnxquant.static.api import prepare_model  # noqa: E402
from onnxquant.static.planner import forced_nodes, select_nodes, tensors_to_calibrate  # noqa: E402


def _watchdog(limit_gb: float) -> None:
    """End the process when it and its children use more than ``limit_gb`` of RSS."""
    import psutil

    me = psutil.Process()

    def rss() -> int:
        total = 0
        for proc in [me, *me.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                pass
        return total

    def watch() -> None:
        while True:
            used = rss()
            if used > limit_gb * 2**30:
                print(f"\nmemory limit: {used / 2**30:.1f} GB RSS > {limit_gb} GB; stopping",
                      file=sys.stderr, flush=True)
                for child in me.children(recursive=True):
                    try:
                        child.kill()
                    except psutil.Error:
                        pass
                os._exit(3)
            time.sleep(0.5)

    threading.Thread(target=watch, daemon=True).start()


def _calibrate(model, names, feeds, config: StaticQuantConfig, **kwargs) -> tuple[dict, float]:
    start = time.perf_counter()
    result = calibrate_ranges(model, names, feeds, settings=config.calibration_settings(),
                              **kwargs)
    return result.ranges, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--models", default="minilm_l6,rapidocr_det_v4")
    parser.add_argument("--methods", default="minmax,entropy,percentile")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--mem-limit-gb", type=float, default=8.0)
    args = parser.parse_args()
    _watchdog(args.mem_limit_gb)

    start = time.perf_counter()
    with ray_cluster.ray_session(None, args.cpus) as ray:  # 127.0.0.1 only, shut down after
        rows = _run(args, ray, start)
    _table(args, rows)
    return 0 if all(row[4] == "yes" for row in rows) else 1


def _run(args: argparse.Namespace, ray, start: float) -> list[tuple]:
    print(f"local Ray cluster ({args.cpus} CPUs, 127.0.0.1) started in "
          f"{time.perf_counter() - start:.1f} s; ray {ray.__version__}, "
          f"{os.cpu_count()} cores on this machine\n")
    rows = []
    for name in args.models.split(","):
        feeds = ce.samples(name, "calib")
        for method in args.methods.split(","):
            config = StaticQuantConfig(calibration_method=CalibrationMethod(method))
            model = prepare_model(ce.model_path(name), config)
            nodes = select_nodes(model, config)
            names = tensors_to_calibrate(nodes, config.format, forced_nodes(nodes, config))
            one, t_one = _calibrate(model, names, feeds, config)
            on_ray, t_ray = _calibrate(model, names, feeds, config, backend="ray",
                                       workers=args.workers)
            same = one == on_ray
            rows.append((name, method, len(feeds), len(one), "yes" if same else "NO",
                         t_one, t_ray))
            print(f"{name} {method}: {len(one)} ranges, identical={same}, "
                  f"1 process {t_one:.2f} s, ray x{args.workers} {t_ray:.2f} s", flush=True)
    return rows


def _table(args: argparse.Namespace, rows: list[tuple]) -> None:
    print(f"\n| model | method | feeds | ranges | identical | 1 process (s) | "
          f"Ray, {args.workers} workers (s) | Ray / 1 process |")
    print("|---|---|---:|---:|---|---:|---:|---:|")
    for name, method, n, count, same, t_one, t_ray in rows:
        print(f"| {name} | {method} | {n} | {count} | {same} | {t_one:.2f} | {t_ray:.2f} | "
              f"{t_ray / t_one:.2f}x |")


if __name__ == "__main__":
    sys.exit(main())
