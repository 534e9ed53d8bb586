"""Objective and cost model (issue 14): latency of onnxquant's quantized models per objective,
against the float model and onnxruntime.quantization's quantized model, and their sizes.

For every public corpus model and mode (static QDQ U8S8, static QOperator U8S8, dynamic
QOperator int8) it writes onnxquant's model for each objective (speed, balanced, size) and
onnxruntime.quantization's model with the same types, then times all of them and the float
model on the first eval feed, interleaved: ``--rounds`` rounds, each running every model
``--runs`` times (1 intra-op thread); a model's latency is the median of its round medians,
so load on the machine hits every model alike. Static modes calibrate once per model and
mode (onnxquant's calibration cache; onnxruntime's on the same feeds).

    python benchmarks/bench_objective.py [--models a,b] [--modes qdq,qoperator,dynamic]
        [--calib N] [--rounds R] [--runs K] [--workdir DIR] [--json OUT]

Kernel costs are measured into ``--workdir``/costs.json (``ONNXQUANT_COST_CACHE``), so the
first objective run of each model includes the measuring time in its quantize time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import _bench_util as bu
import _corpus_eval as ce

MODES = ("qdq", "qoperator", "dynamic")
OBJECTIVES = ("speed", "balanced", "size")


def _ours(name: str, mode: str, objective: str, out: Path, feeds, cache: Path) -> dict:
    import onnxquant

    t0 = time.perf_counter()
    if mode == "dynamic":
        config = onnxquant.DynamicQuantConfig(objective=objective, evaluate=False)
        result = onnxquant.quantize_dynamic(ce.model_path(name), out, config)
        info = result.cost_model
    else:
        fmt = onnxquant.QuantFormat.QDQ if mode == "qdq" else onnxquant.QuantFormat.QOPERATOR
        config = onnxquant.StaticQuantConfig(format=fmt, objective=objective, evaluate=False,
                                             calibration_cache=cache)
        result = onnxquant.quantize_static(ce.model_path(name), out, feeds, config)
        info = result.plan.settings.get("cost_model", {})
    return {"seconds": time.perf_counter() - t0, "kept": info.get("kept_float", 0),
            "accepted": info.get("accepted_slower", 0), "nodes": info.get("nodes", 0)}


def _ort(name: str, mode: str, out: Path, feeds) -> dict:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    t0 = time.perf_counter()
    if mode == "dynamic":
        quantize_dynamic(ce.model_path(name), out, weight_type=QuantType.QInt8)
    else:
        fmt = QuantFormat.QDQ if mode == "qdq" else QuantFormat.QOperator
        quantize_static(ce.model_path(name), out, bu.ort_reader(feeds), quant_format=fmt,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return {"seconds": time.perf_counter() - t0}


def _time_interleaved(paths: dict[str, str], feed, rounds: int, runs: int) -> dict[str, float]:
    sessions = {}
    for key, path in paths.items():
        try:
            sessions[key] = ce.session(path)
            sessions[key].run(None, feed)  # warm-up
        except Exception as exc:  # noqa: BLE001 - a model onnxruntime cannot run: no time
            print(f"  {key}: cannot run ({bu.error_line(exc)})", file=sys.stderr)
    per_round: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):
        for key, sess in sessions.items():
            per_round[key].append(bu.median_ms(sess, feed, runs))
    return {k: statistics.median(v) for k, v in per_round.items()}


def bench_model(name: str, modes: list[str], args, workdir: Path) -> list[dict]:
    feeds = ce.samples(name, "calib")[: args.calib]
    feed = ce.samples(name, "eval")[0]
    folder = workdir / name
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"float": ce.model_path(name)}
    info: dict[str, dict] = {}
    for mode in modes:
        for objective in OBJECTIVES:
            out = folder / f"{mode}_{objective}.onnx"
            try:
                info[f"{mode}/{objective}"] = _ours(name, mode, objective, out, feeds,
                                                    folder / f"{mode}_calib.json")
                paths[f"{mode}/{objective}"] = str(out)
            except Exception as exc:  # noqa: BLE001 - a failure is a table cell
                print(f"  {name} {mode} {objective}: {bu.error_line(exc)}", file=sys.stderr)
        out = folder / f"{mode}_ort.onnx"
        try:
            info[f"{mode}/ort"] = _ort(name, mode, out, feeds)
            paths[f"{mode}/ort"] = str(out)
        except Exception as exc:  # noqa: BLE001
            print(f"  {name} {mode} ort: {bu.error_line(exc)}", file=sys.stderr)
    latency = _time_interleaved(paths, feed, args.rounds, args.runs)
    rows = []
    for mode in modes:
        for objective in OBJECTIVES:
            key = f"{mode}/{objective}"
            rec = info.get(key, {})
            rows.append({"model": name, "mode": mode, "objective": objective,
                         "float_ms": latency.get("float"), "ms": latency.get(key),
                         "ort_ms": latency.get(f"{mode}/ort"),
                         "float_mb": bu.model_bytes(paths["float"]) / 1e6,
                         "mb": bu.model_bytes(paths[key]) / 1e6 if key in paths else None,
                         "ort_mb": (bu.model_bytes(paths[f"{mode}/ort"]) / 1e6
                                    if f"{mode}/ort" in paths else None),
                         **rec})
    return rows


def table(rows: list[dict]) -> str:
    header = ["model", "mode", "objective", "float ms", "ours ms", "ours/float", "ort ms",
              "ort/float", "ours/ort", "MB float → ours (ort)", "kept float / measured"]
    body = []
    for r in rows:
        body.append([r["model"], r["mode"], r["objective"], bu.fmt(r["float_ms"], ".2f"),
                     bu.fmt(r["ms"], ".2f"), bu.ratio(r["ms"], r["float_ms"]),
                     bu.fmt(r["ort_ms"], ".2f"), bu.ratio(r["ort_ms"], r["float_ms"]),
                     bu.ratio(r["ms"], r["ort_ms"]),
                     f"{r['float_mb']:.2f} → {bu.fmt(r['mb'], '.2f')} "
                     f"({bu.fmt(r['ort_mb'], '.2f')})",
                     f"{r.get('kept', '–')} / {r.get('nodes', '–')}"
                     + (f" (+{r['accepted']} accepted)" if r.get("accepted") else "")])
    return bu.markdown(header, body)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=bu.list_arg(ce.model_names()), default=None)
    parser.add_argument("--modes", type=bu.list_arg(MODES), default=list(MODES))
    parser.add_argument("--calib", type=int, default=16, help="calibration feeds (static)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    bu.use_working_tree()
    with bu.scratch_dir(args.workdir, "bench_objective_") as workdir:
        os.environ.setdefault("ONNXQUANT_COST_CACHE", str(workdir / "costs.json"))
        os.environ["ONNXQUANT_MEASURE_COSTS"] = "1"
        load = os.getloadavg()
        rows: list[dict] = []
        for name in args.models or ce.model_names():
            print(f"{name} ...", file=sys.stderr, flush=True)
            rows += bench_model(name, args.modes, args, workdir)
        load_after = os.getloadavg()
        print(table(rows))
        print(f"\nload average before {load[0]:.2f}, after {load_after[0]:.2f} "
              f"({os.cpu_count()} CPUs); {bu.environment()}")
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
