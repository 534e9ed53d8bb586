#!/usr/bin/env python
"""Static int8 QDQ quantization, onnxquant side by side with onnxruntime.quantization.

For each corpus model (../shared/corpus) and setting (QDQ, MinMax, S8S8; per-channel off = pc0,
on = pc1; u8pc0 / u8pc1 = the same with uint8 activations, U8S8, in both tools) both tools
quantize the float model with the 32 calibration feeds:

    ort:  onnxruntime.quantization.quantize_static(..., QuantFormat.QDQ, QInt8, QInt8,
          per_channel=pc, calibrate_method=CalibrationMethod.MinMax)
    ours: onnxquant.quantize_static(model, out, feeds,
                                    config=StaticQuantConfig(per_channel=pc, activation_type=INT8))

Each quantize call runs in a fresh worker process (_bench_util.run_worker), which reports the
wall time of the call and its own peak RSS (VmHWM: the whole worker process, i.e. interpreter +
imports + calibration feeds + quantizer; or, if the quantizer ran subprocesses, the largest of
their ru_maxrss where that is more). The quantized model is then run by
onnxruntime (CPU, 1 intra-op thread) on the 64 eval feeds in another worker, and its outputs are
compared with the float model's (measure per model: see _corpus_eval.MEASURES).

    python benchmarks/bench_static.py [--models a,b] [--settings pc0,pc1] [--tools ours,ort]
                                      [--repeat N] [--json PATH] [--keep DIR] [--timeout S]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _bench_util as bu  # noqa: E402
import _corpus_eval as ce  # noqa: E402

SETTINGS = {"pc0": {"per_channel": False}, "pc1": {"per_channel": True},
            "u8pc0": {"per_channel": False, "uint8": True},
            "u8pc1": {"per_channel": True, "uint8": True}}
DEFAULT_SETTINGS = ["pc0", "pc1"]
TOOLS = ("ours", "ort")
TOOL_LABEL = {"ours": "onnxquant", "ort": "onnxruntime.quantization"}


# =========================================================================== worker side
def _quantize_ort(model: str, out: str, feeds, per_channel: bool, uint8: bool = False) -> None:
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    quantize_static(model, out, bu.ort_reader(feeds), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8 if uint8 else QuantType.QInt8,
                    weight_type=QuantType.QInt8,
                    per_channel=per_channel, calibrate_method=CalibrationMethod.MinMax)


def _quantize_ours(model: str, out: str, feeds, per_channel: bool, uint8: bool = False) -> None:
    bu.use_working_tree()
    import onnxquant

    config = onnxquant.StaticQuantConfig(
        per_channel=per_channel, activation_type=onnxquant.UINT8 if uint8 else onnxquant.INT8)
    onnxquant.quantize_static(model, out, feeds, config=config)


QUANTIZERS = {"ours": _quantize_ours, "ort": _quantize_ort}


def worker_quant(job: dict) -> dict:
    feeds = bu.load_pickle(job["feeds"])
    return bu.timed_call(QUANTIZERS[job["tool"]], job["model"], job["out"], feeds,
                         **SETTINGS[job["setting"]])


# =========================================================================== parent side
def bench_one(ctx: dict, setting: str, tool: str) -> dict:
    jobdir = ctx["workdir"] / ctx["name"] / setting / tool
    jobdir.mkdir(parents=True, exist_ok=True)
    job = {"tool": tool, "setting": setting, "model": ctx["model"],
           "out": str(jobdir / "model" / "model.onnx"), "feeds": ctx["calib"]}
    return bu.quantize_and_evaluate(ctx, "bench_static:worker_quant", job, jobdir,
                                    model=ctx["name"], setting=setting, tool=tool)


def run_all(args, workdir: Path) -> list[dict]:
    results = []
    for name in args.models:
        ctx = bu.prepare_model(name, workdir, repeat=args.repeat, timeout=args.timeout)
        for setting in args.settings:
            for tool in args.tools:
                rec = bench_one(ctx, setting, tool)
                results.append(rec)
                print(f"{name} {setting} {tool}: {bu.describe(rec)}", flush=True)
        shutil.rmtree(workdir / name / "feeds", ignore_errors=True)
    return results


# =========================================================================== report
def _size(rec: dict | None) -> str:
    b = bu.get(rec, "bytes")
    return "–" if b is None else f"{b / 1e6:.2f} ({100 * b / rec['float_bytes']:.0f} %)"


def table_row(name: str, setting: str, by_tool: dict) -> str:
    ours, ort = by_tool.get("ours"), by_tool.get("ort")
    any_rec = ours or ort
    cells = [name, setting, ce.measure_name(name), f"{any_rec['float_bytes'] / 1e6:.2f}",
             bu.status(ours), bu.status(ort), _size(ours), _size(ort),
             ce.format_fidelity(name, bu.get(ours, "fidelity")),
             ce.format_fidelity(name, bu.get(ort, "fidelity")),
             bu.fmt(bu.get(ours, "seconds"), ".1f"), bu.fmt(bu.get(ort, "seconds"), ".1f"),
             bu.ratio(bu.get(ours, "seconds"), bu.get(ort, "seconds")),
             bu.fmt(bu.get(ours, "peak_mb"), ".0f"), bu.fmt(bu.get(ort, "peak_mb"), ".0f"),
             bu.ratio(bu.get(ours, "peak_mb"), bu.get(ort, "peak_mb"))]
    return "| " + " | ".join(cells) + " |"


HEADER = ["model", "setting", "fidelity measure", "float MB", "ours", "ort",
          "ours MB (% float)", "ort MB (% float)", "ours fidelity", "ort fidelity",
          "ours s", "ort s", "time ours/ort", "ours peak MB", "ort peak MB", "mem ours/ort"]


def markdown_table(results: list[dict]) -> str:
    rows: dict[tuple[str, str], dict] = {}
    for rec in results:
        rows.setdefault((rec["model"], rec["setting"]), {})[rec["tool"]] = rec
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += [table_row(name, setting, by_tool) for (name, setting), by_tool in rows.items()]
    return "\n".join(lines)


# =========================================================================== CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=bu.list_arg(ce.model_names()), default=ce.model_names(),
                   help="comma-separated corpus models (default: all 7)")
    p.add_argument("--settings", type=bu.list_arg(list(SETTINGS)), default=DEFAULT_SETTINGS,
                   help="pc0 = per-channel off, pc1 = on (default: both); u8pc0/u8pc1: U8S8")
    p.add_argument("--tools", type=bu.list_arg(list(TOOLS)), default=list(TOOLS),
                   help="ours = onnxquant, ort = onnxruntime.quantization (default: both)")
    p.add_argument("--repeat", type=int, default=1,
                   help="quantize N times, report the median time (default 1)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--keep", metavar="DIR", help="keep quantized models and logs in DIR")
    p.add_argument("--timeout", type=float, default=3600,
                   help="seconds allowed per worker process (default 3600)")
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error("--repeat must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    with bu.scratch_dir(args.keep, "onnxquant-bench-static-") as workdir:
        results = run_all(args, workdir)
    print()
    print(markdown_table(results))
    if args.json:
        doc = {"benchmark": "static int8 QDQ, MinMax, S8S8", "environment": bu.environment(),
               "settings": SETTINGS, "repeat": args.repeat, "results": results}
        Path(args.json).write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
