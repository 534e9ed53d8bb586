#!/usr/bin/env python
"""Static int8 QDQ quantization, onnxquant side by side with onnxruntime.quantization.

For each corpus model (../shared/corpus) and setting (QDQ, MinMax, S8S8; per-channel off = pc0,
on = pc1) both tools quantize the float model with the 32 calibration feeds:

    ort:  onnxruntime.quantization.quantize_static(..., QuantFormat.QDQ, QInt8, QInt8,
          per_channel=pc, calibrate_method=CalibrationMethod.MinMax)
    ours: onnxquant.quantize_static(model, out, feeds, config=StaticQuantConfig(per_channel=pc))

Each quantize call runs in a fresh worker process (this script with --worker), which reports the
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
import os
import pickle
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import _corpus_eval as ce  # noqa: E402

SETTINGS = {"pc0": {"per_channel": False}, "pc1": {"per_channel": True}}
TOOLS = ("ours", "ort")
TOOL_LABEL = {"ours": "onnxquant", "ort": "onnxruntime.quantization"}


# =========================================================================== worker side
def _quantize_ort(model: str, out: str, feeds, per_channel: bool) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter(feeds)

        def get_next(self):
            return next(self._it, None)

    quantize_static(model, out, Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    per_channel=per_channel, calibrate_method=CalibrationMethod.MinMax)


def _quantize_ours(model: str, out: str, feeds, per_channel: bool) -> None:
    sys.path.insert(0, str(REPO / "src"))  # benchmark the working tree
    import onnxquant

    config = onnxquant.StaticQuantConfig(per_channel=per_channel)
    onnxquant.quantize_static(model, out, feeds, config=config)


QUANTIZERS = {"ours": _quantize_ours, "ort": _quantize_ort}


def _own_peak_rss_mb() -> float:
    """Peak RSS of this process since its exec, in MB.

    Linux: VmHWM of /proc/self/status. Not ru_maxrss: on exec the kernel carries the high-water
    mark of the replaced address space over, which for a child started with vfork / posix_spawn
    is the parent's, so ru_maxrss reports max(parent's peak, child's peak).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit / 2**20


def _children_peak_rss_mb() -> float:
    """Largest ru_maxrss among processes this one waited for (0 if none)."""
    unit = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * unit / 2**20


def _current_rss_mb() -> float | None:
    try:
        import psutil
    except ImportError:
        return None
    return psutil.Process().memory_info().rss / 2**20


def _error_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()


def worker_quant(job: dict) -> dict:
    with open(job["feeds"], "rb") as f:
        feeds = pickle.load(f)
    rss_before = _current_rss_mb()
    t0 = time.perf_counter()
    try:
        QUANTIZERS[job["tool"]](job["model"], job["out"], feeds, **SETTINGS[job["setting"]])
    except Exception as exc:  # noqa: BLE001 - any failure is a result row
        return {"ok": False, "error": _error_line(exc)}
    seconds = time.perf_counter() - t0
    own, kids = _own_peak_rss_mb(), _children_peak_rss_mb()
    return {"ok": True, "seconds": seconds, "peak_mb": max(own, kids), "own_peak_mb": own,
            "children_peak_mb": kids, "rss_before_mb": rss_before}


def worker_eval(job: dict) -> dict:
    with open(job["feeds"], "rb") as f:
        feeds = pickle.load(f)
    try:
        sess = ce.session(job["model"])
        names = [o.name for o in sess.get_outputs()]
        outs, times = [], []
        for feed in feeds:
            t0 = time.perf_counter()
            outs.append(dict(zip(names, sess.run(None, feed), strict=True)))
            times.append(time.perf_counter() - t0)
    except Exception as exc:  # noqa: BLE001
        return {"ok": False, "error": _error_line(exc)}
    with open(job["outputs"], "wb") as f:
        pickle.dump(outs, f, protocol=pickle.HIGHEST_PROTOCOL)
    return {"ok": True, "infer_ms": 1000 * statistics.median(times)}


WORKERS = {"quant": worker_quant, "eval": worker_eval}


def worker_main(kind: str, job_path: str) -> int:
    with open(job_path) as f:
        job = json.load(f)
    result = WORKERS[kind](job)
    with open(job["result"], "w") as f:
        json.dump(result, f)
    return 0


# =========================================================================== parent side
def run_worker(kind: str, job: dict, jobdir: Path, timeout: float) -> dict:
    """Run one worker in a fresh process (cwd and TMPDIR inside jobdir); return its result."""
    scratch = jobdir / f"{kind}_scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    job = {**job, "result": str(jobdir / f"{kind}_result.json")}
    job_path = jobdir / f"{kind}_job.json"
    job_path.write_text(json.dumps(job))
    Path(job["result"]).unlink(missing_ok=True)
    env = {**os.environ, "TMPDIR": str(scratch)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, str(job_path)]
    with open(jobdir / f"{kind}.log", "w") as log:
        try:
            proc = subprocess.run(cmd, cwd=scratch, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return {"ok": False, "error": f"timed out after {timeout:g} s"}
    if Path(job["result"]).exists():
        return json.loads(Path(job["result"]).read_text())
    return {"ok": False, "error": _crash_message(proc.returncode, jobdir / f"{kind}.log")}


def _crash_message(returncode: int, log: Path) -> str:
    how = f"signal {-returncode}" if returncode < 0 else f"exit code {returncode}"
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return f"worker died ({how})" + (f": {lines[-1].strip()}" if lines else "")


def model_bytes(path: str) -> int:
    """Size of an ONNX model file plus the external data files it references."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    locations = set()
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        for entry in tensor.external_data:
            if entry.key == "location":
                locations.add(entry.value)
    base = os.path.dirname(path)
    return os.path.getsize(path) + sum(os.path.getsize(os.path.join(base, p)) for p in locations)


def quantize_repeated(job: dict, jobdir: Path, repeat: int, timeout: float) -> dict:
    """Quantize `repeat` times (fresh process each); median time, max peak memory."""
    runs = [run_worker("quant", job, jobdir, timeout) for _ in range(repeat)]
    failed = [r for r in runs if not r["ok"]]
    if failed:
        return failed[0]
    times = [r["seconds"] for r in runs]
    worst = max(runs, key=lambda r: r["peak_mb"])
    return {**worst, "seconds": statistics.median(times), "seconds_all": times}


def evaluate(name: str, out: str, eval_feeds_path: str, float_outs, jobdir: Path,
             timeout: float) -> dict:
    outputs = jobdir / "eval_outputs.pkl"
    job = {"model": out, "feeds": eval_feeds_path, "outputs": str(outputs)}
    res = run_worker("eval", job, jobdir, timeout)
    if not res["ok"]:
        return {"runs": False, "eval_error": res["error"]}
    with open(outputs, "rb") as f:
        quant_outs = pickle.load(f)
    outputs.unlink()
    try:
        value = ce.fidelity(name, float_outs, quant_outs)
    except Exception as exc:  # noqa: BLE001 - e.g. an output of the wrong shape
        return {"runs": True, "eval_error": _error_line(exc), "infer_ms": res["infer_ms"]}
    return {"runs": True, "fidelity": value, "infer_ms": res["infer_ms"]}


def bench_one(ctx: dict, setting: str, tool: str) -> dict:
    name, workdir = ctx["name"], ctx["workdir"]
    jobdir = workdir / name / setting / tool
    jobdir.mkdir(parents=True, exist_ok=True)
    out = str(jobdir / "model" / "model.onnx")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    job = {"tool": tool, "setting": setting, "model": ctx["model"], "out": out,
           "feeds": ctx["calib"]}
    rec = {"model": name, "setting": setting, "tool": tool,
           **quantize_repeated(job, jobdir, ctx["repeat"], ctx["timeout"])}
    if rec["ok"] and not os.path.exists(out):
        rec.update(ok=False, error="no output model written")
    if rec["ok"]:
        rec["bytes"] = model_bytes(out)
        rec.update(evaluate(name, out, ctx["eval"], ctx["float_outs"], jobdir, ctx["timeout"]))
    return rec


def prepare_model(name: str, workdir: Path, args) -> dict:
    """Write the calib / eval feeds for the workers; run the float model on the eval feeds."""
    feeds_dir = workdir / name / "feeds"
    feeds_dir.mkdir(parents=True, exist_ok=True)
    ctx = {"name": name, "workdir": workdir, "model": ce.model_path(name),
           "repeat": args.repeat, "timeout": args.timeout}
    feeds = {split: ce.samples(name, split) for split in ("calib", "eval")}
    for split, split_feeds in feeds.items():
        ctx[split] = str(feeds_dir / f"{split}.pkl")
        with open(ctx[split], "wb") as f:
            pickle.dump(split_feeds, f, protocol=pickle.HIGHEST_PROTOCOL)
    ctx["float_outs"] = ce.float_outputs(name, feeds["eval"])
    ctx["float_bytes"] = model_bytes(ctx["model"])
    return ctx


def describe(rec: dict) -> str:
    if not rec["ok"]:
        return f"FAILED {rec['error']}"
    text = f"ok {rec['seconds']:.1f} s, {rec['peak_mb']:.0f} MB, {rec['bytes'] / 1e6:.2f} MB file"
    if not rec["runs"]:
        return f"{text}; does not run: {rec['eval_error']}"
    if "fidelity" not in rec:
        return f"{text}; runs; fidelity failed: {rec['eval_error']}"
    name = rec["model"]
    return f"{text}; runs; {ce.measure_name(name)} {ce.format_fidelity(name, rec['fidelity'])}"


def run_all(args, workdir: Path) -> list[dict]:
    results = []
    for name in args.models:
        ctx = prepare_model(name, workdir, args)
        for setting in args.settings:
            for tool in args.tools:
                rec = bench_one(ctx, setting, tool)
                rec["float_bytes"] = ctx["float_bytes"]
                results.append(rec)
                print(f"{name} {setting} {tool}: {describe(rec)}", flush=True)
        shutil.rmtree(workdir / name / "feeds", ignore_errors=True)
    return results


# =========================================================================== report
def _cell(text: str, width: int = 90) -> str:
    text = text.replace("|", "\\|")
    return text if len(text) <= width else text[: width - 1] + "…"


def short_error(text: str) -> str:
    """onnxruntime's errors without their boilerplate ("[ONNXRuntimeError] : 10 : ...")."""
    text = re.sub(r"\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    text = re.sub(r"Load model from \S+ failed: ?", "", text)
    head, sep, tail = text.partition(": ")
    if ", Error " in tail:  # onnx checker: "In Node, (...) , Error <what is wrong>"
        tail = tail.rsplit(", Error ", 1)[1]
    return head + sep + tail


def _status(rec: dict | None) -> str:
    if rec is None:
        return "–"
    if not rec["ok"]:
        return _cell(f"✗ {short_error(rec['error'])}")
    if not rec["runs"]:
        return _cell(f"✗ ORT run: {short_error(rec['eval_error'])}")
    return "ok" if "fidelity" in rec else _cell(f"✗ eval: {short_error(rec['eval_error'])}")


def _get(rec: dict | None, key: str):
    return None if rec is None else rec.get(key)


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _ratio(a, b) -> str:
    return "–" if a is None or b is None or b == 0 else f"{a / b:.2f}"


def _size(rec: dict | None) -> str:
    b = _get(rec, "bytes")
    return "–" if b is None else f"{b / 1e6:.2f} ({100 * b / rec['float_bytes']:.0f} %)"


def table_row(name: str, setting: str, by_tool: dict) -> str:
    ours, ort = by_tool.get("ours"), by_tool.get("ort")
    any_rec = ours or ort
    cells = [name, setting, ce.measure_name(name), f"{any_rec['float_bytes'] / 1e6:.2f}",
             _status(ours), _status(ort), _size(ours), _size(ort),
             ce.format_fidelity(name, _get(ours, "fidelity")),
             ce.format_fidelity(name, _get(ort, "fidelity")),
             _fmt(_get(ours, "seconds"), ".1f"), _fmt(_get(ort, "seconds"), ".1f"),
             _ratio(_get(ours, "seconds"), _get(ort, "seconds")),
             _fmt(_get(ours, "peak_mb"), ".0f"), _fmt(_get(ort, "peak_mb"), ".0f"),
             _ratio(_get(ours, "peak_mb"), _get(ort, "peak_mb"))]
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


def environment() -> dict:
    import onnx
    import onnxruntime

    return {"python": platform.python_version(), "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "cpus": os.cpu_count(),
            "machine": platform.machine(), "platform": platform.platform()}


# =========================================================================== CLI
def _list(choices):
    def parse(text: str) -> list[str]:
        items = [s.strip() for s in text.split(",") if s.strip()]
        bad = [s for s in items if s not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {','.join(choices)}")
        return items

    return parse


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=_list(ce.model_names()), default=ce.model_names(),
                   help="comma-separated corpus models (default: all 7)")
    p.add_argument("--settings", type=_list(list(SETTINGS)), default=list(SETTINGS),
                   help="pc0 = per-channel off, pc1 = on (default: both)")
    p.add_argument("--tools", type=_list(list(TOOLS)), default=list(TOOLS),
                   help="ours = onnxquant, ort = onnxruntime.quantization (default: both)")
    p.add_argument("--repeat", type=int, default=1,
                   help="quantize N times, report the median time (default 1)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--keep", metavar="DIR", help="keep quantized models and logs in DIR")
    p.add_argument("--timeout", type=float, default=3600,
                   help="seconds allowed per worker process (default 3600)")
    p.add_argument("--worker", nargs=2, metavar=("KIND", "JOB"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error("--repeat must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(*args.worker)
    if args.keep:
        workdir = Path(args.keep).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        workdir = Path(tempfile.mkdtemp(prefix="onnxquant-bench-static-"))
    try:
        results = run_all(args, workdir)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(markdown_table(results))
    if args.json:
        doc = {"benchmark": "static int8 QDQ, MinMax, S8S8", "environment": environment(),
               "settings": SETTINGS, "repeat": args.repeat, "results": results}
        Path(args.json).write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
