#!/usr/bin/env python
"""Pre-processing, onnxquant side by side with onnxruntime's quant_pre_process.

Three parts, on the corpus models (../shared/corpus, models in /tmp/qcorpus):

    pre     does pre-processing succeed, and is the result the same function as the float model?
            ours: onnxquant.preprocess(model, out, PreprocessConfig())
            ort:  onnxruntime.quantization.shape_inference.quant_pre_process(model, out)
            Each runs in a fresh worker process whose working directory is an empty temporary
            folder (a sub-folder of the worker's TMPDIR, listed apart): wall time, the
            exception's first line on failure, the files it left behind in its working
            directory (and in TMPDIR, less onnxruntime's session-id file ".ses", which any
            InferenceSession writes there). The written model
            then runs on the first 8 eval feeds against the float model: the largest absolute
            difference, the largest relative difference (where |float| > 1e-4), and whether all
            outputs agree within rtol 1e-3 / atol 1e-4.
    quant   task fidelity on all eval feeds (against the ORIGINAL float model's outputs) of
            onnxquant's defaults, without and with onnxquant's pre-processing first:
            static:  onnxquant.quantize_static(m, out, calib, StaticQuantConfig(evaluate=False))
            dynamic: onnxquant.quantize_dynamic(m, out)
            where m is the float model, or the output of "pre" (ours), next to the file sizes.
    minilm  transformer fusion on minilm_l6, then dynamic quantization, by route:
            ours fused:   onnxquant.preprocess(m, pre, PreprocessConfig(model_type="bert")),
                          onnxquant.quantize_dynamic(pre, out)
            ours unfused: onnxquant.quantize_dynamic(m, out)
            ort fused:    onnxruntime.transformers.optimizer.optimize_model(m, model_type="bert",
                          num_heads=12, hidden_size=384, opt_level=0), saved, then
                          onnxruntime.quantization.quantize_dynamic(fused, out, weight_type=QInt8)
            ort fused, DefaultTensorType: the same with extra_options={"DefaultTensorType":
                          FLOAT}, the workaround onnxruntime's error message suggests when the
                          plain call fails on the fused graph
            counted: QAttention nodes, float MatMul nodes (op MatMul, ONNX domain) left, the
            embedding cosine (the corpus fidelity), the file size, and the single-thread
            latency next to float: one worker times all models on the first eval feed with ONE
            intra-op thread, interleaving 5 rounds of --runs/5 runs each (default 300 in all),
            and reports the median of the round medians.

Every tool call runs in a fresh worker (_bench_util.run_worker) with a memory limit
(--mem-limit-mb, the worker is killed past it) and a time limit (--timeout).

    python benchmarks/bench_preprocess.py [--models a,b] [--parts pre,quant,minilm] [--runs 300]
                                          [--json PATH] [--keep DIR]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _bench_util as bu  # noqa: E402
import _corpus_eval as ce  # noqa: E402
from _preprocess_report import EQUAL_FEEDS, ROUNDS, describe_pre, report  # noqa: E402

PARTS = ("pre", "quant", "minilm")
TOOLS = ("ours", "ort")
MODES = ("static", "dynamic")
MINILM = "minilm_l6"
RTOL, ATOL = 1e-3, 1e-4


# =========================================================================== worker side
ORT_SESSION_FILES = (".ses",)
"""What onnxruntime's native library writes to TMPDIR for any InferenceSession (a session id);
not counted as left behind by a pre-processing call."""


def _where(exc: BaseException) -> str:
    """The innermost frame of a traceback: "file.py:123 function"."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return "?"
    code = tb.tb_frame.f_code
    return f"{Path(code.co_filename).name}:{tb.tb_lineno} {code.co_name}"


def _listing(folder: Path, skip: tuple[str, ...] = ()) -> list[str]:
    """Names in `folder` with their sizes ("a.onnx 1.2 MB"; folders "d/ 3 files")."""
    names = []
    for p in sorted(folder.iterdir()):
        if p.name in skip:
            continue
        if p.is_dir():
            names.append(f"{p.name}/ {sum(1 for _ in p.rglob('*'))} entries")
        else:
            names.append(f"{p.name} {p.stat().st_size / 1e6:.2f} MB")
    return names[:10] + ([f"... {len(names) - 10} more"] if len(names) > 10 else [])


def worker_preprocess(job: dict) -> dict:
    """Pre-process job["model"] into job["out"] with job["tool"]; in an empty working folder.

    run_worker's scratch folder is this worker's cwd and TMPDIR; the call runs with its cwd in
    a fresh sub-folder of it, so that what is left behind can be told apart: in "cwd" (the
    working directory) and in "tmp" (TMPDIR).
    """
    scratch = Path.cwd()
    cwd = scratch / "cwd"
    cwd.mkdir()
    os.chdir(cwd)
    if job["tool"] == "ours":
        bu.use_working_tree()
        import onnxquant

        config = onnxquant.PreprocessConfig(**job.get("config", {}))

        def call():
            return onnxquant.preprocess(job["model"], job["out"], config)
    else:
        from onnxruntime.quantization.shape_inference import quant_pre_process

        def call():
            return quant_pre_process(job["model"], job["out"])
    t0 = time.perf_counter()
    try:
        result = call()
        rec = {"ok": True, "seconds": time.perf_counter() - t0}
    except Exception as exc:  # noqa: BLE001 - any failure is a result row
        result = None
        rec = {"ok": False, "seconds": time.perf_counter() - t0,
               "error": f"{bu.error_line(exc)} (at {_where(exc)})"}
    rec.update(bu.peak_rss_mb())
    rec["left_in_cwd"] = _listing(cwd)
    rec["left_in_tmp"] = _listing(scratch, skip=("cwd", *ORT_SESSION_FILES))
    if result is not None and job["tool"] == "ours":
        rec["warnings"] = [w.strip().splitlines()[0] for w in result.warnings() if w.strip()]
        rec["steps"] = [s.step for s in result.steps]
        rec["unknown_shapes_after"] = result.shapes_after.unknown
    if rec["ok"] and not os.path.exists(job["out"]):
        rec.update(ok=False, error="no output model written")
    return rec


def worker_quant(job: dict) -> dict:
    """onnxquant's default static or dynamic quantization of job["model"] into job["out"]."""
    bu.use_working_tree()
    import onnxquant

    if job["mode"] == "static":
        feeds = bu.load_pickle(job["feeds"])
        config = onnxquant.StaticQuantConfig(evaluate=False)
        return bu.timed_call(onnxquant.quantize_static, job["model"], job["out"], feeds, config)
    return bu.timed_call(onnxquant.quantize_dynamic, job["model"], job["out"])


def _ort_fuse_quant(model: str, fused: str, out: str, seconds: dict, extra_options: dict) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model

    t0 = time.perf_counter()
    optimized = optimize_model(model, model_type="bert", num_heads=12, hidden_size=384,
                               opt_level=0)
    optimized.save_model_to_file(fused)
    seconds["fuse"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    quantize_dynamic(fused, out, weight_type=QuantType.QInt8, extra_options=extra_options)
    seconds["quant"] = time.perf_counter() - t0


def worker_ort_fused(job: dict) -> dict:
    """onnxruntime's own route for BERT: its transformer optimizer, then its quantize_dynamic."""
    import onnx

    extra_options = {"DefaultTensorType": onnx.TensorProto.FLOAT} if job["default_float"] else {}
    seconds: dict = {}
    rec = bu.timed_call(_ort_fuse_quant, job["model"], job["fused"], job["out"], seconds,
                        extra_options)
    if rec["ok"]:
        rec.update(fuse_seconds=seconds["fuse"], quant_seconds=seconds["quant"])
    return rec


def worker_latency(job: dict) -> dict:
    """Every model in job["models"] on one feed, 1 intra-op thread, interleaved rounds; the
    median of the round medians, in ms."""
    import onnxruntime as ort

    feed = bu.load_pickle(job["feeds"])[0]
    sessions = {}
    for key, path in job["models"].items():
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        sessions[key] = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    for session in sessions.values():
        session.run(None, feed)
        session.run(None, feed)
    rounds, per_round = ROUNDS, max(1, job["runs"] // ROUNDS)
    samples: dict[str, list[float]] = {key: [] for key in sessions}
    for _ in range(rounds):
        for key, session in sessions.items():
            samples[key].append(bu.median_ms(session, feed, per_round))
    return {"ok": True, "ms": {k: statistics.median(v) for k, v in samples.items()},
            "runs": rounds * per_round,
            "feed_shapes": {k: list(v.shape) for k, v in feed.items()}}


# =========================================================================== parent side
def compare(reference: list[dict], outputs: list[dict]) -> dict:
    """The outputs of a pre-processed model against the float model's, output by output."""
    import numpy as np

    max_abs = max_rel = 0.0
    close = True
    for ref, out in zip(reference, outputs, strict=True):
        if list(ref) != list(out):
            return {"equal": False, "compare_error": f"outputs {list(out)} vs float {list(ref)}"}
        for key, want in ref.items():
            want, got = np.asarray(want), np.asarray(out[key])
            if want.shape != got.shape:
                return {"equal": False,
                        "compare_error": f"{key}: shape {got.shape} vs float {want.shape}"}
            if want.size == 0:
                continue
            a, b = got.astype(np.float64), want.astype(np.float64)
            diff = np.abs(a - b)
            diff[np.isnan(a) & np.isnan(b)] = 0.0
            if np.isnan(diff).any():
                close = False
                max_abs = float("nan")
                continue
            max_abs = max(max_abs, float(diff.max()))
            big = np.abs(b) > ATOL
            if big.any():
                max_rel = max(max_rel, float((diff[big] / np.abs(b[big])).max()))
            close = close and bool(np.allclose(a, b, rtol=RTOL, atol=ATOL, equal_nan=True))
    return {"equal": close, "max_abs": max_abs, "max_rel": max_rel}


def graph_stats(path: str) -> dict:
    """Node counts by (domain-qualified) op type, over subgraphs too; node outputs of the main
    graph with no shape information."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    ops: collections.Counter = collections.Counter()

    def walk(graph):
        for node in graph.node:
            domain = "" if node.domain in ("", "ai.onnx") else f"{node.domain}."
            ops[domain + node.op_type] += 1
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)
                for sub in attr.graphs:
                    walk(sub)

    walk(model.graph)
    typed = {v.name for v in (*model.graph.value_info, *model.graph.output)
             if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape")}
    produced = [o for n in model.graph.node for o in n.output if o]
    return {"nodes": sum(ops.values()), "ops": dict(ops),
            "shapeless": sum(1 for o in produced if o not in typed)}


def check_equal(ctx: dict, path: str, jobdir: Path) -> dict:
    """Run the model `path` on the first EQUAL_FEEDS eval feeds (in a worker) against float."""
    outputs = jobdir / "equal_outputs.pkl"
    job = {"model": path, "feeds": ctx["eval8"], "outputs": str(outputs)}
    res = bu.run_worker("_bench_util:worker_eval", job, jobdir, ctx["timeout"], kind="equal",
                        mem_limit_mb=ctx["mem_limit_mb"])
    if not res["ok"]:
        return {"equal": False, "compare_error": f"does not run: {res['error']}"}
    outs = bu.load_pickle(outputs)
    outputs.unlink()
    return compare(ctx["float_outs"][:EQUAL_FEEDS], outs)


def bench_preprocess(ctx: dict, tool: str, equal: bool) -> dict:
    jobdir = ctx["workdir"] / ctx["name"] / "pre" / tool
    jobdir.mkdir(parents=True, exist_ok=True)
    out = jobdir / "model" / "model.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    job = {"tool": tool, "model": ctx["model"], "out": str(out)}
    rec = {"model": ctx["name"], "part": "pre", "tool": tool, "out": str(out),
           "float_bytes": ctx["float_bytes"],
           **bu.run_worker("bench_preprocess:worker_preprocess", job, jobdir, ctx["timeout"],
                           kind=f"pre_{tool}", mem_limit_mb=ctx["mem_limit_mb"])}
    if rec["ok"]:
        rec["bytes"] = bu.model_bytes(str(out))
        rec["graph"] = graph_stats(str(out))
        if equal:
            rec.update(check_equal(ctx, str(out), jobdir))
    return rec


def bench_quant(ctx: dict, mode: str, pre: str, source: str) -> dict:
    jobdir = ctx["workdir"] / ctx["name"] / "quant" / f"{mode}_{pre}"
    jobdir.mkdir(parents=True, exist_ok=True)
    job = {"mode": mode, "model": source, "out": str(jobdir / "model" / "model.onnx"),
           "feeds": ctx["calib"]}
    rec = bu.quantize_and_evaluate(ctx, "bench_preprocess:worker_quant", job, jobdir,
                                   model=ctx["name"], part="quant", mode=mode, pre=pre)
    rec["out"] = job["out"]
    return rec


def bench_minilm(ctx: dict, runs: int) -> dict:
    """The three MiniLM routes, evaluated; then one latency worker for all of them."""
    base = ctx["workdir"] / ctx["name"] / "minilm"
    routes: dict[str, dict] = {}
    fused = bench_preprocess_bert({**ctx, "workdir": base / "pre_bert"})
    print(f"{ctx['name']} preprocess ours bert: {describe_pre(fused)}", flush=True)
    if fused["ok"]:
        rec = bench_quant({**ctx, "workdir": base}, "dynamic", "fused", fused["out"])
        rec["preprocess"] = fused
    else:
        rec = {"ok": False, "error": f"preprocess: {fused['error']}", "preprocess": fused,
               "float_bytes": ctx["float_bytes"]}
    routes["ours_fused"] = rec
    routes["ours_unfused"] = bench_quant({**ctx, "workdir": base}, "dynamic", "unfused",
                                         ctx["model"])
    for key, default_float in (("ort_fused", False), ("ort_fused_float", True)):
        jobdir = base / key
        (jobdir / "model").mkdir(parents=True, exist_ok=True)
        job = {"model": ctx["model"], "fused": str(jobdir / "model" / "fused.onnx"),
               "out": str(jobdir / "model" / "model.onnx"), "default_float": default_float}
        rec = bu.quantize_and_evaluate(ctx, "bench_preprocess:worker_ort_fused", job, jobdir,
                                       model=ctx["name"], part="minilm", route=key)
        rec["out"] = job["out"]
        routes[key] = rec
    for key, rec in routes.items():
        rec.update(part="minilm", route=key, model=ctx["name"])
        if rec["ok"]:
            rec["graph"] = graph_stats(rec["out"])
        print(f"  minilm {key}: {bu.describe(rec)}", flush=True)
    float_rec = {"ok": True, "runs": True, "part": "minilm", "route": "float",
                 "model": ctx["name"], "out": ctx["model"], "bytes": ctx["float_bytes"],
                 "fidelity": 1.0, "graph": graph_stats(ctx["model"]),
                 "float_bytes": ctx["float_bytes"]}
    models = {"float": ctx["model"]}
    models.update({k: r["out"] for k, r in routes.items() if r["ok"] and r.get("runs")})
    lat = bu.run_worker("bench_preprocess:worker_latency",
                        {"models": models, "feeds": ctx["eval8"], "runs": runs},
                        base, ctx["timeout"], kind="latency", mem_limit_mb=ctx["mem_limit_mb"])
    all_routes = {"float": float_rec, **routes}
    for key, rec in all_routes.items():
        if lat["ok"] and key in lat["ms"]:
            rec["latency_ms"] = lat["ms"][key]
            rec["latency_ratio"] = lat["ms"][key] / lat["ms"]["float"]
            rec["latency_runs"] = lat["runs"]
            rec["latency_feed_shapes"] = lat["feed_shapes"]
        elif not lat["ok"]:
            rec["latency_error"] = lat["error"]
    return all_routes


def run_all(args, workdir: Path) -> dict:
    results: dict = {"pre": [], "quant": [], "minilm": {}}
    for name in args.models:
        t_model = time.perf_counter()
        ctx = bu.prepare_model(name, workdir, repeat=1, timeout=args.timeout,
                               mem_limit_mb=args.mem_limit_mb)
        ctx["eval8"] = str(workdir / name / "feeds" / "eval8.pkl")
        bu.dump_pickle(bu.load_pickle(ctx["eval"])[:EQUAL_FEEDS], ctx["eval8"])
        ours_pre = None
        if "pre" in args.parts or "quant" in args.parts:
            for tool in TOOLS if "pre" in args.parts else ("ours",):
                rec = bench_preprocess(ctx, tool, equal="pre" in args.parts)
                if "pre" in args.parts:
                    results["pre"].append(rec)
                if tool == "ours":
                    ours_pre = rec
                print(f"{name} preprocess {tool}: {describe_pre(rec)}", flush=True)
        if "quant" in args.parts:
            for pre in ("none", "ours"):
                for mode in MODES:
                    if pre == "ours" and not ours_pre["ok"]:
                        rec = {"ok": False, "model": name, "part": "quant", "mode": mode,
                               "pre": pre, "float_bytes": ctx["float_bytes"],
                               "error": f"preprocess: {ours_pre['error']}"}
                    else:
                        source = ctx["model"] if pre == "none" else ours_pre["out"]
                        rec = bench_quant(ctx, mode, pre, source)
                    results["quant"].append(rec)
                    print(f"{name} {mode} pre={pre}: {bu.describe(rec)}", flush=True)
        if "minilm" in args.parts and name == MINILM:
            results["minilm"] = bench_minilm(ctx, args.runs)
        shutil.rmtree(workdir / name / "feeds", ignore_errors=True)
        print(f"{name}: {time.perf_counter() - t_model:.0f} s", flush=True)
    return results


def bench_preprocess_bert(ctx: dict) -> dict:
    """onnxquant.preprocess(m, out, PreprocessConfig(model_type="bert")) in a worker."""
    jobdir = ctx["workdir"]
    jobdir.mkdir(parents=True, exist_ok=True)
    out = jobdir / "model" / "model.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    job = {"tool": "ours", "model": ctx["model"], "out": str(out),
           "config": {"model_type": "bert"}}
    rec = {"model": ctx["name"], "part": "minilm", "tool": "ours", "out": str(out),
           "config": job["config"],
           **bu.run_worker("bench_preprocess:worker_preprocess", job, jobdir, ctx["timeout"],
                           kind="pre_bert", mem_limit_mb=ctx["mem_limit_mb"])}
    if rec["ok"]:
        rec["bytes"] = bu.model_bytes(str(out))
        rec["graph"] = graph_stats(str(out))
        rec.update(check_equal(ctx, str(out), jobdir))
    return rec


# =========================================================================== CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=bu.list_arg(ce.model_names()), default=ce.model_names(),
                   help="comma-separated corpus models (default: all 7)")
    p.add_argument("--parts", type=bu.list_arg(list(PARTS)), default=list(PARTS),
                   help="pre, quant, minilm (default: all; minilm needs minilm_l6 in --models)")
    p.add_argument("--runs", type=int, default=300,
                   help="timed runs per MiniLM model for the latency (default 300)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--keep", metavar="DIR", help="keep models and worker logs in DIR")
    p.add_argument("--timeout", type=float, default=900,
                   help="seconds allowed per worker process (default 900)")
    p.add_argument("--mem-limit-mb", type=float, default=6000,
                   help="a worker past this RSS is stopped and is a failure (default 6000)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    with bu.scratch_dir(args.keep, "onnxquant-bench-preprocess-") as workdir:
        results = run_all(args, workdir)
    float_graphs = {name: graph_stats(ce.model_path(name)) for name in args.models}
    print()
    print(report(results, float_graphs))
    print(f"\n(total {time.perf_counter() - t0:.0f} s)")
    if args.json:
        doc = {"benchmark": "pre-processing", "runs": args.runs, "rtol": RTOL, "atol": ATOL,
               "equal_feeds": EQUAL_FEEDS, "environment": bu.environment(),
               "float_graphs": float_graphs, "results": results}
        Path(args.json).write_text(json.dumps(doc, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
