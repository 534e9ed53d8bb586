"""What the side-by-side benchmarks share: worker processes, peak memory, evaluation, table cells.

Every measured call runs in a fresh worker process so that its time and memory are its own:

    run_worker("module:function", job, jobdir, timeout)
        starts `python _bench_util.py --worker module:function JOB.json` with its working
        directory and TMPDIR in a scratch folder under jobdir; `function(job)` (module imported
        from benchmarks/) returns a JSON-able dict, which run_worker returns. A worker that
        crashes, runs past `timeout` or (with mem_limit_mb) grows past that RSS is a failure dict
        {"ok": False, "error": ...}, never an exception.
    run_repeated(...)       the same `repeat` times: median "seconds", the largest "peak_mb"
    peak_rss_mb()           in a worker: its peak memory (VmHWM, or its children's if more)
    prepare_model(...)      calib / eval feeds pickled for the workers + the float outputs
    evaluate(...)           run a quantized model on the eval feeds (in a worker) -> fidelity
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
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
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import _corpus_eval as ce  # noqa: E402


# =========================================================================== worker side
def own_peak_rss_mb() -> float:
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


def children_peak_rss_mb() -> float:
    """Largest ru_maxrss among processes this one waited for (0 if none)."""
    unit = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * unit / 2**20


def peak_rss_mb() -> dict:
    """{"peak_mb", "own_peak_mb", "children_peak_mb"} of this worker so far."""
    own, kids = own_peak_rss_mb(), children_peak_rss_mb()
    return {"peak_mb": max(own, kids), "own_peak_mb": own, "children_peak_mb": kids}


def current_rss_mb() -> float | None:
    try:
        import psutil
    except ImportError:
        return None
    return psutil.Process().memory_info().rss / 2**20


def error_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()


def load_pickle(path: str):
    with open(path, "rb") as f:
        return pickle.load(f)


def dump_pickle(obj, path) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL)


def use_working_tree() -> None:
    """Make `import onnxquant` benchmark the working tree (src/), not an installed copy."""
    src = str(REPO / "src")
    if src not in sys.path:
        sys.path.insert(0, src)


@contextlib.contextmanager
def scratch_dir(keep: str | None, prefix: str):
    """The benchmark's working folder: ``keep`` (created, kept) or a temporary folder that is
    removed afterwards, also when the benchmark fails."""
    workdir = Path(keep).resolve() if keep else Path(tempfile.mkdtemp(prefix=prefix))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        yield workdir
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


def ort_reader(feeds):
    """An onnxruntime.quantization CalibrationDataReader over a list of feeds (rewindable)."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter(feeds)

        def get_next(self):
            return next(self._it, None)

        def rewind(self):
            self._it = iter(feeds)

    return Reader()


def timed_call(fn, *args, **kwargs) -> dict:
    """Run ``fn`` once in this worker: its wall time and the worker's peak RSS, or the error."""
    rss_before = current_rss_mb()
    t0 = time.perf_counter()
    try:
        fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any failure is a result row
        return {"ok": False, "error": error_line(exc)}
    seconds = time.perf_counter() - t0
    return {"ok": True, "seconds": seconds, **peak_rss_mb(), "rss_before_mb": rss_before}


def worker_eval(job: dict) -> dict:
    """Run job["model"] on the pickled job["feeds"]; pickle the outputs to job["outputs"]."""
    feeds = load_pickle(job["feeds"])
    try:
        sess = ce.session(job["model"])
        names = [o.name for o in sess.get_outputs()]
        outs, times = [], []
        for feed in feeds:
            t0 = time.perf_counter()
            outs.append(dict(zip(names, sess.run(None, feed), strict=True)))
            times.append(time.perf_counter() - t0)
    except Exception as exc:  # noqa: BLE001 - any failure is a result row
        return {"ok": False, "error": error_line(exc)}
    dump_pickle(outs, job["outputs"])
    return {"ok": True, "infer_ms": 1000 * statistics.median(times)}


def worker_main(target: str, job_path: str) -> int:
    module, _, function = target.partition(":")
    with open(job_path) as f:
        job = json.load(f)
    result = getattr(importlib.import_module(module), function)(job)
    with open(job["result"], "w") as f:
        json.dump(result, f)
    return 0


# =========================================================================== parent side
def _tree_rss_mb(pid: int) -> float:
    """Current RSS of a process and its descendants, in MB (0 if it is gone)."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            proc = psutil.Process(pid)
            procs = [proc, *proc.children(recursive=True)]
        except psutil.Error:
            return 0.0
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total / 2**20
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run_worker(target: str, job: dict, jobdir: Path, timeout: float, *, kind: str | None = None,
               mem_limit_mb: float | None = None) -> dict:
    """Run `target(job)` ("module:function") in a fresh process; return its result dict.

    The worker's cwd and TMPDIR are `jobdir/<kind>_scratch`; its stdout and stderr go to
    `jobdir/<kind>.log`. With `mem_limit_mb`, the worker is killed (a failure row with
    "over_limit_mb") as soon as its RSS exceeds that, so that a quantizer that holds every
    activation cannot take the machine down.
    """
    kind = kind or target.partition(":")[2]
    scratch = jobdir / f"{kind}_scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    job = {**job, "result": str(jobdir / f"{kind}_result.json")}
    job_path = jobdir / f"{kind}_job.json"
    job_path.write_text(json.dumps(job))
    Path(job["result"]).unlink(missing_ok=True)
    env = {**os.environ, "TMPDIR": str(scratch)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", target, str(job_path)]
    log_path = jobdir / f"{kind}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=scratch, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        poll = 0.1 if mem_limit_mb else 1.0
        while True:
            try:
                returncode = proc.wait(timeout=poll)
                break
            except subprocess.TimeoutExpired:
                pass
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                return {"ok": False, "error": f"timed out after {timeout:g} s"}
            if mem_limit_mb:
                rss = _tree_rss_mb(proc.pid)
                if rss > mem_limit_mb:
                    proc.kill()
                    proc.wait()
                    return {"ok": False, "over_limit_mb": mem_limit_mb,
                            "error": f"stopped at {rss:.0f} MB RSS (memory limit "
                                     f"{mem_limit_mb:.0f} MB)"}
    if Path(job["result"]).exists():
        return json.loads(Path(job["result"]).read_text())
    return {"ok": False, "error": crash_message(returncode, log_path)}


def crash_message(returncode: int, log: Path) -> str:
    how = f"signal {-returncode}" if returncode < 0 else f"exit code {returncode}"
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return f"worker died ({how})" + (f": {lines[-1].strip()}" if lines else "")


def run_repeated(target: str, job: dict, jobdir: Path, repeat: int, timeout: float, *,
                 kind: str | None = None, mem_limit_mb: float | None = None) -> dict:
    """run_worker `repeat` times (fresh process each); median "seconds", largest "peak_mb"."""
    runs = []
    for _ in range(repeat):
        runs.append(run_worker(target, job, jobdir, timeout, kind=kind,
                               mem_limit_mb=mem_limit_mb))
        if not runs[-1]["ok"]:
            return runs[-1]
    times = [r["seconds"] for r in runs]
    worst = max(runs, key=lambda r: r["peak_mb"])
    return {**worst, "seconds": statistics.median(times), "seconds_all": times}


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


def prepare_model(name: str, workdir: Path, **extra) -> dict:
    """Pickle the calib / eval feeds for the workers; run the float model on the eval feeds.

    Returns a context dict: name, workdir, model (path), calib / eval (pickle paths),
    float_outs, float_bytes, plus `extra`. Remove `workdir/name/feeds` when done.
    """
    feeds_dir = workdir / name / "feeds"
    feeds_dir.mkdir(parents=True, exist_ok=True)
    ctx = {"name": name, "workdir": workdir, "model": ce.model_path(name), **extra}
    feeds = {split: ce.samples(name, split) for split in ("calib", "eval")}
    for split, split_feeds in feeds.items():
        ctx[split] = str(feeds_dir / f"{split}.pkl")
        dump_pickle(split_feeds, ctx[split])
    ctx["float_outs"] = ce.float_outputs(name, feeds["eval"])
    ctx["float_bytes"] = model_bytes(ctx["model"])
    return ctx


def evaluate(name: str, out: str, eval_feeds_path: str, float_outs, jobdir: Path,
             timeout: float) -> dict:
    """Run the model `out` on the eval feeds (in a worker); its fidelity against float_outs."""
    outputs = jobdir / "eval_outputs.pkl"
    job = {"model": out, "feeds": eval_feeds_path, "outputs": str(outputs)}
    res = run_worker("_bench_util:worker_eval", job, jobdir, timeout, kind="eval")
    if not res["ok"]:
        return {"runs": False, "eval_error": res["error"]}
    quant_outs = load_pickle(outputs)
    outputs.unlink()
    try:
        value = ce.fidelity(name, float_outs, quant_outs)
    except Exception as exc:  # noqa: BLE001 - e.g. an output of the wrong shape
        return {"runs": True, "eval_error": error_line(exc), "infer_ms": res["infer_ms"]}
    return {"runs": True, "fidelity": value, "infer_ms": res["infer_ms"]}


def quantize_and_evaluate(ctx: dict, target: str, job: dict, jobdir: Path, **rec) -> dict:
    """Quantize with `target` (job["out"] = output path; run_repeated, ctx["repeat"] times,
    ctx.get("mem_limit_mb")), then evaluate the output on the eval feeds. Returns `rec` updated
    with the worker's result, "bytes", and evaluate()'s "runs" / "fidelity" / "eval_error"."""
    out = job["out"]
    os.makedirs(os.path.dirname(out), exist_ok=True)
    rec.update(run_repeated(target, job, jobdir, ctx["repeat"], ctx["timeout"], kind="quant",
                            mem_limit_mb=ctx.get("mem_limit_mb")))
    if rec["ok"] and not os.path.exists(out):
        rec.update(ok=False, error="no output model written")
    if rec["ok"]:
        rec["bytes"] = model_bytes(out)
        rec.update(evaluate(ctx["name"], out, ctx["eval"], ctx["float_outs"], jobdir,
                            ctx["timeout"]))
    rec["float_bytes"] = ctx["float_bytes"]
    return rec


# =========================================================================== report
def describe(rec: dict) -> str:
    """One line for the log: how a quantize_and_evaluate() record went."""
    if not rec["ok"]:
        return f"FAILED {rec['error']}"
    text = f"ok {rec['seconds']:.1f} s, {rec['peak_mb']:.0f} MB, {rec['bytes'] / 1e6:.2f} MB file"
    if not rec["runs"]:
        return f"{text}; does not run: {rec['eval_error']}"
    if "fidelity" not in rec:
        return f"{text}; runs; fidelity failed: {rec['eval_error']}"
    name = rec["model"]
    return f"{text}; runs; {ce.measure_name(name)} {ce.format_fidelity(name, rec['fidelity'])}"


def status(rec: dict | None) -> str:
    """Table cell: "ok", or what failed (quantizing, running in onnxruntime, measuring)."""
    if rec is None:
        return "–"
    if not rec["ok"]:
        return cell(f"✗ {short_error(rec['error'])}")
    if not rec["runs"]:
        return cell(f"✗ ORT run: {short_error(rec['eval_error'])}")
    return "ok" if "fidelity" in rec else cell(f"✗ eval: {short_error(rec['eval_error'])}")


def cell(text: str, width: int = 90) -> str:
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


def get(rec: dict | None, key: str):
    return None if rec is None else rec.get(key)


def fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def ratio(a, b) -> str:
    return "–" if a is None or b is None or b == 0 else f"{a / b:.2f}"


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def environment() -> dict:
    import onnx
    import onnxruntime

    return {"python": platform.python_version(), "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "cpus": os.cpu_count(),
            "machine": platform.machine(), "platform": platform.platform()}


def list_arg(choices):
    """argparse type: a comma-separated subset of `choices`."""

    def parse(text: str) -> list[str]:
        items = [s.strip() for s in text.split(",") if s.strip()]
        bad = [s for s in items if s not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {','.join(choices)}")
        return items

    return parse


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        sys.exit(worker_main(sys.argv[2], sys.argv[3]))
    sys.exit("usage: _bench_util.py --worker module:function JOB.json (started by the benchmarks)")


def median_ms(session, feed, runs: int) -> float:
    """Median wall time of ``runs`` runs of ``session`` on ``feed``, in milliseconds."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)
