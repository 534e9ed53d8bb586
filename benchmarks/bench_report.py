"""What ``onnxquant report`` finds on the public corpus, and what it costs.

For each corpus model: quantize statically with the defaults (QDQ, MinMax), compare the
quantized model with the float one on the first 32 evaluation feeds (``onnxquant.compare``, in
its own worker: time and peak RSS), list the top-3 layers of the sensitivity ranking, then
quantize again with the first of them kept float and measure the task fidelity on all 64
evaluation feeds before and after. Also the report's memory at 32 vs 256 samples
(``--memory MODEL``: the eval feeds repeated), to show it is flat in the number of samples.

    python benchmarks/bench_report.py [MODEL ...] [--samples 32] [--memory minilm_l6]

Needs ../shared/corpus (see its README.md) and its models in /tmp/qcorpus.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import _corpus_eval as ce
from _bench_util import (
    dump_pickle,
    evaluate,
    load_pickle,
    peak_rss_mb,
    prepare_model,
    run_worker,
    scratch_dir,
    use_working_tree,
)

TIMEOUT = 1800
MEM_LIMIT_MB = 12_000


def worker_quantize(job: dict) -> dict:
    """Static QDQ quantization with the defaults (nodes in job["exclude"] kept float)."""
    use_working_tree()
    import onnxquant

    config = onnxquant.StaticQuantConfig(nodes_to_exclude=tuple(job.get("exclude", ())),
                                         op_types_to_exclude=tuple(job.get("exclude_ops", ())))
    start = time.perf_counter()
    onnxquant.quantize_static(job["model"], job["out"], load_pickle(job["calib"]), config)
    return {"ok": True, "seconds": time.perf_counter() - start, **peak_rss_mb()}


def worker_report(job: dict) -> dict:
    """``onnxquant.compare`` on the pickled feeds (repeated job["repeat"] times)."""
    use_working_tree()
    import onnxquant

    feeds = load_pickle(job["feeds"])[: job["samples"]]
    feeds = feeds * job.get("repeat", 1)
    start = time.perf_counter()
    report = onnxquant.compare(job["model"], job["quant"], iter(feeds))
    seconds = time.perf_counter() - start
    report.save_json(job["json"])
    top = [{"node": x.node, "quantized_node": x.quantized_node, "op_type": x.op_type,
            "sensitivity_db": x.sensitivity_db, "isolated_sqnr_db": x.isolated_sqnr_db}
           for x in report.ranked_layers()[:3]]
    outputs = {k: v.to_dict() for k, v in report.outputs.items()}
    groups = sorted(report.op_type_sensitivity.items(), key=lambda kv: -kv[1])
    return {"ok": True, "seconds": seconds, "samples": report.samples, "top": top,
            "best_op_type": list(groups[0]) if groups else None,
            "outputs": outputs, "layers": len(report.layers), **peak_rss_mb()}


def _fidelity(ctx: dict, out: Path, jobdir: Path) -> float | None:
    res = evaluate(ctx["name"], str(out), ctx["eval"], ctx["float_outs"], jobdir, TIMEOUT)
    return res.get("fidelity")


def run_model(name: str, workdir: Path, samples: int) -> dict:
    ctx = prepare_model(name, workdir)
    jobdir = workdir / name
    quant = jobdir / "quant.onnx"
    q = run_worker("bench_report:worker_quantize", {"model": ctx["model"], "out": str(quant),
                   "calib": ctx["calib"]}, jobdir, TIMEOUT, kind="quantize",
                   mem_limit_mb=MEM_LIMIT_MB)
    if not q["ok"]:
        return {"model": name, "error": q["error"]}
    r = run_worker("bench_report:worker_report", {
        "model": ctx["model"], "quant": str(quant), "feeds": ctx["eval"], "samples": samples,
        "json": str(jobdir / "report.json")}, jobdir, TIMEOUT, kind="report",
        mem_limit_mb=MEM_LIMIT_MB)
    if not r["ok"]:
        return {"model": name, "error": r["error"]}
    row = {"model": name, "measure": ce.measure_name(name), "quantize_s": q["seconds"],
           "report_s": r["seconds"], "report_peak_mb": r["peak_mb"], "top": r["top"],
           "outputs": r["outputs"], "before": _fidelity(ctx, quant, jobdir)}
    if r["top"]:
        kept = jobdir / "quant_kept.onnx"
        first = r["top"][0]["quantized_node"]
        k = run_worker("bench_report:worker_quantize", {
            "model": ctx["model"], "out": str(kept), "calib": ctx["calib"], "exclude": [first]},
            jobdir, TIMEOUT, kind="quantize_kept", mem_limit_mb=MEM_LIMIT_MB)
        row["after"] = _fidelity(ctx, kept, jobdir) if k["ok"] else None
    if r.get("best_op_type") and r["best_op_type"][1] > 0:
        group = jobdir / "quant_group.onnx"
        g = run_worker("bench_report:worker_quantize", {
            "model": ctx["model"], "out": str(group), "calib": ctx["calib"],
            "exclude_ops": [r["best_op_type"][0]]}, jobdir, TIMEOUT, kind="quantize_group",
            mem_limit_mb=MEM_LIMIT_MB)
        row["best_op_type"] = r["best_op_type"]
        row["after_group"] = _fidelity(ctx, group, jobdir) if g["ok"] else None
    return row


def memory_rows(name: str, workdir: Path) -> list[dict]:
    """Report peak RSS at 32 and 256 samples (the eval feeds repeated)."""
    ctx = prepare_model(name, workdir)
    jobdir = workdir / name
    quant = jobdir / "quant.onnx"
    run_worker("bench_report:worker_quantize", {"model": ctx["model"], "out": str(quant),
               "calib": ctx["calib"]}, jobdir, TIMEOUT, kind="quantize")
    rows = []
    for count in (32, 256):
        feeds = jobdir / f"feeds_{count}.pkl"
        base = load_pickle(ctx["eval"])
        dump_pickle((base * (count // len(base) + 1))[:count], feeds)
        r = run_worker("bench_report:worker_report", {
            "model": ctx["model"], "quant": str(quant), "feeds": str(feeds), "samples": count,
            "json": str(jobdir / f"report_{count}.json")}, jobdir, TIMEOUT,
            kind=f"report_{count}", mem_limit_mb=MEM_LIMIT_MB)
        rows.append({"model": name, "samples": count, "seconds": r.get("seconds"),
                     "peak_mb": r.get("peak_mb"), "error": r.get("error")})
    return rows


def _print_rows(rows: list[dict]) -> None:
    print("| model | measure | default | top-3 layers (sensitivity dB) | first kept float |"
          " best op type (dB) | that op type kept float | quantize s | report s | ratio |"
          " report peak MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['model']} | error: {row['error']} |")
            continue
        top = ", ".join(f"{t['node']} ({t['op_type']}, "
                        f"{t['sensitivity_db']:+.1f})" if t["sensitivity_db"] is not None
                        else f"{t['node']} ({t['op_type']})" for t in row["top"])
        group = row.get("best_op_type")
        group_cell = f"{group[0]} ({group[1]:+.1f})" if group else "–"
        print(f"| {row['model']} | {row['measure']} | "
              f"{ce.format_fidelity(row['model'], row['before'])} | {top} | "
              f"{ce.format_fidelity(row['model'], row.get('after'))} | {group_cell} | "
              f"{ce.format_fidelity(row['model'], row.get('after_group'))} | "
              f"{row['quantize_s']:.1f} | {row['report_s']:.1f} | "
              f"{row['report_s'] / row['quantize_s']:.2f} | {row['report_peak_mb']:.0f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--memory", metavar="MODEL")
    parser.add_argument("--keep", metavar="DIR")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    models = args.models or [m for m in ce.model_names() if Path(ce.model_path(m)).exists()]
    with scratch_dir(args.keep, "bench_report_") as workdir:
        if args.memory:
            rows = memory_rows(args.memory, workdir)
            print(json.dumps(rows, indent=1))
        else:
            rows = []
            for name in models:
                rows.append(run_model(name, workdir, args.samples))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            _print_rows(rows)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
