#!/usr/bin/env python
"""QOperator format and dynamic quantization, onnxquant side by side with onnxruntime.quantization.

For each corpus model (../shared/corpus) and variant:

    dyn-qop     dynamic quantization, QOperator form (MatMulInteger, ConvInteger, ...), int8
                weights, per tensor.
                ort:  quantize_dynamic(model, out, weight_type=QuantType.QInt8)
                ours: onnxquant.quantize_dynamic(model, out, DynamicQuantConfig())
    dyn-qdq     dynamic quantization in QDQ form (ComputeQuantizationParameters function): ours
                only, onnxruntime has no such mode.
    static-qop  static QOperator, U8S8 (uint8 activations, int8 weights), MinMax, per tensor,
                32 calibration feeds.
                ort:  quantize_static(..., QuantFormat.QOperator, QUInt8, QInt8)
                ours: onnxquant.quantize_static(..., StaticQuantConfig(format=QOPERATOR,
                      activation_type=UINT8))

Each quantize call runs in a fresh worker process (time, peak RSS); the quantized model is run on
the 64 eval feeds (fidelity against the float model, see _corpus_eval.MEASURES); then a latency
worker times the float and the quantized model on the first eval feed with ONE intra-op thread,
interleaving 3 rounds of --runs/3 runs each (default 30 in all), and reports the medians and
quantized/float.

    python benchmarks/bench_formats.py [--models a,b] [--variants dyn-qop,static-qop]
                                       [--tools ours,ort] [--per-channel] [--runs 30]
                                       [--json PATH] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _bench_util as bu  # noqa: E402
import _corpus_eval as ce  # noqa: E402

VARIANTS = ("dyn-qop", "dyn-qdq", "static-qop")
TOOLS = ("ours", "ort")


# =========================================================================== worker side
def _ort(variant: str, model: str, out: str, feeds, per_channel: bool) -> None:
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    if variant == "dyn-qop":
        quantize_dynamic(model, out, weight_type=QuantType.QInt8, per_channel=per_channel)
    elif variant == "static-qop":
        quantize_static(model, out, bu.ort_reader(feeds), quant_format=QuantFormat.QOperator,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        per_channel=per_channel, calibrate_method=CalibrationMethod.MinMax)
    else:
        raise ValueError(f"onnxruntime has no {variant} mode")


def _ours(variant: str, model: str, out: str, feeds, per_channel: bool) -> None:
    bu.use_working_tree()
    import onnxquant
    from onnxquant.dynamic.config import DynamicQuantConfig

    if variant == "static-qop":
        config = onnxquant.StaticQuantConfig(format=onnxquant.QuantFormat.QOPERATOR,
                                             activation_type=onnxquant.UINT8,
                                             per_channel=per_channel)
        onnxquant.quantize_static(model, out, feeds, config=config)
    else:
        fmt = onnxquant.QuantFormat.QOPERATOR if variant == "dyn-qop" else onnxquant.QuantFormat.QDQ
        onnxquant.quantize_dynamic(model, out,
                                   DynamicQuantConfig(format=fmt, per_channel=per_channel))


def worker_quant(job: dict) -> dict:
    feeds = bu.load_pickle(job["feeds"]) if job["variant"] == "static-qop" else None
    fn = _ours if job["tool"] == "ours" else _ort
    return bu.timed_call(fn, job["variant"], job["model"], job["out"], feeds,
                         job.get("per_channel", False))


def _session(path: str):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def worker_latency(job: dict) -> dict:
    """Float and quantized model on one feed, 1 thread, interleaved rounds; medians in ms."""
    feed = bu.load_pickle(job["feeds"])[0]
    sessions = {"float": _session(job["float"]), "quant": _session(job["model"])}
    for session in sessions.values():
        session.run(None, feed)
        session.run(None, feed)
    rounds, per_round = 3, max(1, job["runs"] // 3)
    samples = {key: [] for key in sessions}
    for _ in range(rounds):
        for key, session in sessions.items():
            samples[key].append(bu.median_ms(session, feed, per_round))
    float_ms, quant_ms = (statistics.median(samples[k]) for k in ("float", "quant"))
    return {"ok": True, "float_ms": float_ms, "quant_ms": quant_ms,
            "latency_ratio": quant_ms / float_ms, "latency_runs": rounds * per_round}


# =========================================================================== parent side
def bench_one(ctx: dict, variant: str, tool: str, runs: int) -> dict:
    jobdir = ctx["workdir"] / ctx["name"] / variant / tool
    jobdir.mkdir(parents=True, exist_ok=True)
    job = {"tool": tool, "variant": variant, "model": ctx["model"],
           "out": str(jobdir / "model" / "model.onnx"), "feeds": ctx["calib"],
           "per_channel": ctx["per_channel"]}
    rec = bu.quantize_and_evaluate(ctx, "bench_formats:worker_quant", job, jobdir,
                                   model=ctx["name"], setting=variant, tool=tool)
    if rec["ok"] and rec.get("runs"):
        lat = bu.run_worker("bench_formats:worker_latency",
                            {"float": ctx["model"], "model": job["out"], "feeds": ctx["eval"],
                             "runs": runs}, jobdir, ctx["timeout"], kind="latency")
        if lat["ok"]:
            rec.update({k: lat[k] for k in ("float_ms", "quant_ms", "latency_ratio",
                                            "latency_runs")})
        else:
            rec["latency_error"] = lat["error"]
    return rec


def run_all(args, workdir: Path) -> list[dict]:
    results = []
    for name in args.models:
        ctx = bu.prepare_model(name, workdir, repeat=1, timeout=args.timeout,
                               per_channel=args.per_channel)
        for variant in args.variants:
            for tool in args.tools:
                if tool == "ort" and variant == "dyn-qdq":
                    continue
                rec = bench_one(ctx, variant, tool, args.runs)
                results.append(rec)
                lat = (f"; latency {rec['latency_ratio']:.2f}× float"
                       if "latency_ratio" in rec else "")
                print(f"{name} {variant} {tool}: {bu.describe(rec)}{lat}", flush=True)
        shutil.rmtree(workdir / name / "feeds", ignore_errors=True)
    return results


# =========================================================================== report
def _size(rec: dict | None) -> str:
    b = bu.get(rec, "bytes")
    return "–" if b is None else f"{b / 1e6:.2f} ({100 * b / rec['float_bytes']:.0f} %)"


def _latency(rec: dict | None) -> str:
    if rec is None or "latency_ratio" not in rec:
        return "–"
    return f"{rec['latency_ratio']:.2f} ({rec['quant_ms']:.1f}/{rec['float_ms']:.1f} ms)"


def _ours_over_ort(ours: dict | None, ort: dict | None) -> str:
    a, b = bu.get(ours, "latency_ratio"), bu.get(ort, "latency_ratio")
    return bu.ratio(a, b)


HEADER = ["model", "variant", "fidelity measure", "float MB", "ours", "ort",
          "ours MB (% float)", "ort MB (% float)", "ours fidelity", "ort fidelity",
          "ours latency / float", "ort latency / float", "latency ours/ort", "ours s", "ort s"]


def table_row(name: str, variant: str, by_tool: dict) -> str:
    ours, ort = by_tool.get("ours"), by_tool.get("ort")
    any_rec = ours or ort
    cells = [name, variant, ce.measure_name(name), f"{any_rec['float_bytes'] / 1e6:.2f}",
             bu.status(ours), bu.status(ort) if variant != "dyn-qdq" else "n/a",
             _size(ours), _size(ort),
             ce.format_fidelity(name, bu.get(ours, "fidelity")),
             ce.format_fidelity(name, bu.get(ort, "fidelity")),
             _latency(ours), _latency(ort), _ours_over_ort(ours, ort),
             bu.fmt(bu.get(ours, "seconds"), ".1f"), bu.fmt(bu.get(ort, "seconds"), ".1f")]
    return "| " + " | ".join(cells) + " |"


def markdown_table(results: list[dict]) -> str:
    rows: dict[tuple[str, str], dict] = {}
    for rec in results:
        rows.setdefault((rec["model"], rec["setting"]), {})[rec["tool"]] = rec
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += [table_row(name, variant, by_tool) for (name, variant), by_tool in rows.items()]
    return "\n".join(lines)


# =========================================================================== CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=bu.list_arg(ce.model_names()), default=ce.model_names(),
                   help="comma-separated corpus models (default: all 7)")
    p.add_argument("--variants", type=bu.list_arg(list(VARIANTS)), default=list(VARIANTS),
                   help="dyn-qop, dyn-qdq, static-qop (default: all)")
    p.add_argument("--tools", type=bu.list_arg(list(TOOLS)), default=list(TOOLS),
                   help="ours = onnxquant, ort = onnxruntime.quantization (default: both)")
    p.add_argument("--per-channel", action="store_true",
                   help="per-channel weights in every variant, both tools")
    p.add_argument("--runs", type=int, default=30,
                   help="timed runs per model for the latency (default 30)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--keep", metavar="DIR", help="keep quantized models and logs in DIR")
    p.add_argument("--timeout", type=float, default=3600,
                   help="seconds allowed per worker process (default 3600)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    with bu.scratch_dir(args.keep, "onnxquant-bench-formats-") as workdir:
        results = run_all(args, workdir)
    print()
    print(markdown_table(results))
    if args.json:
        doc = {"benchmark": "QOperator and dynamic quantization", "runs": args.runs,
               "environment": bu.environment(), "results": results}
        Path(args.json).write_text(json.dumps(doc, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
