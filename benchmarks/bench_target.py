"""The accuracy-target search on the public corpus: each model's own task measure as the metric
(a callable ``AccuracyTarget`` metric), ``min_score`` 0.99, the first half of the evaluation
split as ``eval_data``; the task fidelity is then measured on the other half, which the search
never saw — next to the defaults.

    python benchmarks/bench_target.py [MODEL ...] [--min-score 0.99]

Needs ../shared/corpus (see its README.md) and its models in /tmp/qcorpus.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import _corpus_eval as ce
from _bench_util import use_working_tree


def _task_metric(name: str):
    def metric(reference, candidate) -> float:
        return ce.fidelity(name, reference, candidate)
    metric.__name__ = ce.measure_name(name)
    return metric


def run_model(name: str, min_score: float, work: Path) -> dict:
    import onnxquant
    from onnxquant.core.speed import measure_latency

    calib, evals = ce.samples(name, "calib"), ce.samples(name, "eval")
    seen, unseen = evals[: len(evals) // 2], evals[len(evals) // 2:]
    reference = ce.float_outputs(name, unseen)
    row: dict = {"model": name, "measure": ce.measure_name(name)}
    default = work / f"{name}.default.onnx"
    result = onnxquant.quantize_static(ce.model_path(name), default, calib, eval_data=seen)
    row["default"] = ce.fidelity(name, reference, ce.run_model(str(default), unseen))
    row["default_size"] = result.quantized_bytes / result.float_bytes
    target = onnxquant.AccuracyTarget(_task_metric(name), min_score, eval_data=seen)
    out = work / f"{name}.target.onnx"
    start = time.perf_counter()
    result = onnxquant.quantize_static(ce.model_path(name), out, calib, target=target)
    row["minutes"] = (time.perf_counter() - start) / 60
    row["evaluations"] = len(result.target.steps)
    row["met_on_seen"] = result.target.met
    row["target"] = ce.fidelity(name, reference, ce.run_model(str(out), unseen))
    row["target_size"] = result.quantized_bytes / result.float_bytes
    row["kept_float"] = len(result.target.kept_float)
    row["wide"] = len(result.target.wide_tensors)
    row["seconds_per_evaluation"] = row["minutes"] * 60 / max(row["evaluations"], 1)
    row["moves"] = [s.move for s in result.target.steps if s.kept][1:]
    feed = unseen[0]
    row["default_latency"] = measure_latency(ce.model_path(name), default, feed, runs=12).ratio
    row["target_latency"] = measure_latency(ce.model_path(name), out, feed, runs=12).ratio
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*")
    parser.add_argument("--min-score", type=float, default=0.99)
    args = parser.parse_args()
    use_working_tree()
    models = args.models or [m for m in ce.model_names() if Path(ce.model_path(m)).exists()]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_target_") as tmp:
        for name in models:
            try:
                rows.append(run_model(name, args.min_score, Path(tmp)))
            except Exception as err:  # noqa: BLE001 - a failure is a result row
                rows.append({"model": name, "error": f"{type(err).__name__}: {err}"[:160]})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print("| model | measure | default (unseen) | target search (unseen) | met on eval_data |"
          " size vs float: default / search | latency vs float: default / search |"
          " evaluations (s each) | minutes | float nodes / 16-bit tensors | moves kept |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | error: {r['error']} |")
            continue
        print(f"| {r['model']} | {r['measure']} | {ce.format_fidelity(r['model'], r['default'])}"
              f" | {ce.format_fidelity(r['model'], r['target'])} | {r['met_on_seen']} | "
              f"{r['default_size']:.2f} / {r['target_size']:.2f} | "
              f"{r['default_latency']:.2f} / {r['target_latency']:.2f} | {r['evaluations']} "
              f"({r['seconds_per_evaluation']:.0f}) | {r['minutes']:.1f} | "
              f"{r['kept_float']} / {r['wide']} | {'; '.join(r['moves']) or '–'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
