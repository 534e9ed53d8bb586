"""onnxruntime's own quantization test suite, run against onnxruntime and against onnxquant.ort.

    python benchmarks/bench_ort_suite.py SNAPSHOT [--commit C] [--files a,b] [--timeout 300]
                                         [--runs ort,onnxquant] [--json PATH] [--keep]

SNAPSHOT is a snapshot of the onnxruntime repository: either a git directory (bare or not; the
folder is read at --commit, default the commit named in issue 13) or a checked-out work tree
(read as it is when --commit is not given). Its `onnxruntime/test/python/quantization/` folder is
copied into a temporary folder -- never into this repository: it stays onnxruntime's code -- once
per run, and every `test_*.py` file in it is run by pytest in its own process, with a per-file
timeout:

  ort        as onnxruntime ships it: `onnxruntime.quantization` is onnxruntime's package;
  onnxquant  the same files, with `onnxruntime.quantization` and every module under it
             (`onnxruntime.quantization.calibrate`, `...quant_utils`, ...) aliased to
             `onnxquant.ort` and the module of the same path under it
             (`onnxquant.ort.calibrate`, ...).

Import substitution is done by a `conftest.py` written into the temporary copy, which puts a
meta-path finder first on `sys.meta_path` before any test module is imported. That covers every
form at once -- `from onnxruntime.quantization import X`, `from onnxruntime.quantization.sub
import X`, `import onnxruntime.quantization as q`, `from onnxruntime import quantization`,
`onnxruntime.quantization.X` attribute uses after `import onnxruntime.quantization`, imports done
inside functions and `mock.patch("onnxruntime.quantization....")` strings -- without editing
onnxruntime's sources. A module that onnxquant.ort lacks is a ModuleNotFoundError (never a
fall-back to onnxruntime's module), so a file that needs it fails at import. The same conftest
(in both runs) records every test report to a JSON-lines file, so that a file that runs past its
timeout or crashes still counts what it finished, and writes which file `onnxruntime.quantization`
was loaded from, which the script checks (the run is refused if the substitution did not happen).

Counting, per file and run: passed / failed / errors / skipped. A test is an error when its setup
or teardown fails; xfail counts as skipped, xpass as passed. A file that fails at import (a
collection error) counts as many errors as the tests the other run collected from it (at least
1). Tests not reached before a timeout or crash count as errors. "both" is the number of tests
that pass in both runs. GPU-only and network tests are skipped by their own markers/conditions
(CUDA_VISIBLE_DEVICES is emptied for the runs).

Output: a markdown table (one row per file, totals last) and the most common failure reasons of
each run (first line of the error, grouped); --json PATH writes everything, per test included.
Needs `pytest` and `onnx-array-api` (the `bench` extra).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_COMMIT = "cd2d4a3fd24145f44e159fef3f81590d0665bbf3"
SUITE_DIR = "onnxruntime/test/python/quantization"
RUNS = ("ort", "onnxquant")

# Written into the temporary copy. BENCH_ORT_SUITE_MODE selects the run; BENCH_ORT_SUITE_LOG is
# the JSON-lines file the reports go to.
CONFTEST = r'''
"""Written by onnxquant's benchmarks/bench_ort_suite.py (not part of onnxruntime)."""
import importlib
import importlib.abc
import importlib.util
import json
import os
import re
import sys

_MODE = os.environ.get("BENCH_ORT_SUITE_MODE", "ort")
_LOG = os.environ.get("BENCH_ORT_SUITE_LOG")
_SRC = "onnxruntime.quantization"
_DST = "onnxquant.ort"


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target):
        self.target = target

    def create_module(self, spec):
        return importlib.import_module(self.target)

    def exec_module(self, module):
        pass


class _AliasFinder(importlib.abc.MetaPathFinder):
    """onnxruntime.quantization[.x.y] -> onnxquant.ort[.x.y] (the same module object)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _SRC and not fullname.startswith(_SRC + "."):
            return None
        dst = _DST + fullname[len(_SRC):]
        if importlib.util.find_spec(dst) is None:  # no fall-back to onnxruntime's module
            raise ModuleNotFoundError(f"No module named {dst!r} (for {fullname!r})", name=fullname)
        real = importlib.import_module(dst)
        is_pkg = hasattr(real, "__path__")
        return importlib.util.spec_from_loader(fullname, _AliasLoader(dst), is_package=is_pkg)


if _MODE == "onnxquant":
    for _name in [m for m in sys.modules if m == _SRC or m.startswith(_SRC + ".")]:
        del sys.modules[_name]
    if "onnxruntime" in sys.modules and hasattr(sys.modules["onnxruntime"], "quantization"):
        delattr(sys.modules["onnxruntime"], "quantization")
    sys.meta_path.insert(0, _AliasFinder())


def _log(rec):
    if _LOG:
        with open(_LOG, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")


def _reason(report):
    lr = report.longrepr
    if lr is None:
        return ""
    if isinstance(lr, tuple) and len(lr) == 3:  # skip: (path, lineno, message)
        return str(lr[2])
    crash = getattr(lr, "reprcrash", None)
    if crash is not None and getattr(crash, "message", None):
        return crash.message.strip()[:600]
    text = str(lr)
    elines = [ln[1:].strip() for ln in text.splitlines() if ln.startswith("E ")]
    if elines:
        for ln in reversed(elines):
            if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b", ln):
                return ln
        return elines[-1]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def pytest_sessionstart(session):
    _log({"event": "start", "mode": _MODE})


def pytest_collection_finish(session):
    _log({"event": "collected", "nodeids": [item.nodeid for item in session.items]})
    mod = sys.modules.get(_SRC)
    _log({"event": "backend", "module": getattr(mod, "__name__", None),
          "file": getattr(mod, "__file__", None)})


def pytest_collectreport(report):
    if report.failed:
        _log({"event": "collecterror", "nodeid": report.nodeid, "reason": _reason(report)})


def pytest_runtest_logreport(report):
    rec = {"event": "report", "nodeid": report.nodeid, "when": report.when,
           "outcome": report.outcome, "xfail": hasattr(report, "wasxfail")}
    if report.outcome != "passed":
        rec["reason"] = _reason(report)
    _log(rec)


def pytest_sessionfinish(session, exitstatus):
    mod = sys.modules.get(_SRC)
    _log({"event": "finish", "exitstatus": int(exitstatus),
          "module": getattr(mod, "__name__", None), "file": getattr(mod, "__file__", None)})
'''

PYTEST_INI = """[pytest]
addopts = -p no:cacheprovider
"""


# ------------------------------------------------------------------------------ snapshot copy
def _git(gitdir: Path, *args: str) -> bytes:
    return subprocess.run(["git", "--git-dir", str(gitdir), *args], check=True,
                          capture_output=True).stdout


def _git_dir(snapshot: Path) -> Path | None:
    if (snapshot / ".git").exists():
        return snapshot / ".git"
    if (snapshot / "HEAD").is_file() and (snapshot / "objects").is_dir():
        return snapshot
    return None


def copy_suite(snapshot: Path, commit: str | None, dest: Path) -> str:
    """Copy SUITE_DIR of the snapshot into dest (flat). Returns a description of the source."""
    dest.mkdir(parents=True, exist_ok=True)
    worktree = snapshot / SUITE_DIR
    gitdir = _git_dir(snapshot)
    if commit is None and worktree.is_dir():
        shutil.copytree(worktree, dest, dirs_exist_ok=True)
        return f"{worktree} (work tree)"
    if gitdir is None:
        raise SystemExit(f"{snapshot}: neither a git directory nor a tree with {SUITE_DIR}/")
    commit = commit or DEFAULT_COMMIT
    full = _git(gitdir, "rev-parse", "--verify", f"{commit}^{{commit}}").decode().strip()
    listing = _git(gitdir, "ls-tree", "-r", "-z", full, "--", SUITE_DIR + "/").split(b"\0")
    n = 0
    for entry in listing:
        if not entry:
            continue
        meta, path = entry.decode().split("\t", 1)
        _mode, kind, sha = meta.split()
        if kind != "blob":
            continue
        rel = Path(path).relative_to(SUITE_DIR)
        out = dest / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(_git(gitdir, "cat-file", "blob", sha))
        n += 1
    if n == 0:
        raise SystemExit(f"{snapshot}@{full}: no files under {SUITE_DIR}/")
    return f"{gitdir}@{full}"


def prepare(src: Path, dest: Path) -> None:
    shutil.copytree(src, dest)
    if (dest / "conftest.py").exists():  # keep onnxruntime's own conftest if it ever has one
        (dest / "conftest_ort.py").write_bytes((dest / "conftest.py").read_bytes())
        extra = "\nfrom conftest_ort import *  # noqa: F401,F403\n"
    else:
        extra = ""
    (dest / "conftest.py").write_text(CONFTEST + extra, encoding="utf-8")
    (dest / "pytest.ini").write_text(PYTEST_INI, encoding="utf-8")


# ------------------------------------------------------------------------------ one file
def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_file(workdir: Path, test_file: str, mode: str, timeout: float) -> dict:
    log = workdir / f".bench_{mode}_{test_file}.jsonl"
    log.unlink(missing_ok=True)
    env = dict(os.environ)
    env.update({"BENCH_ORT_SUITE_MODE": mode, "BENCH_ORT_SUITE_LOG": str(log),
                "CUDA_VISIBLE_DEVICES": "", "PYTHONDONTWRITEBYTECODE": "1"})
    env.pop("PYTHONPATH", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir",
           str(workdir), test_file]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    timed_out = False
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(proc)
        out, _ = proc.communicate()
    seconds = time.perf_counter() - t0
    events = []
    if log.exists():
        for line in log.read_text(encoding="utf-8").splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a line cut by the kill
    return {"events": events, "rc": proc.returncode, "timed_out": timed_out,
            "seconds": round(seconds, 2),
            "output_tail": out.decode("utf-8", "replace")[-3000:]}


def summarize(raw: dict) -> dict:
    """Per-test outcomes of one file's run (collection errors kept apart)."""
    collected: list[str] = []
    tests: dict[str, dict] = {}
    collect_errors = []
    backend = None
    finished = False
    for ev in raw["events"]:
        kind = ev["event"]
        if kind == "collected":
            collected = ev["nodeids"]
        elif kind == "collecterror":
            collect_errors.append(ev.get("reason", ""))
        elif kind == "backend":
            backend = ev.get("file")
        elif kind == "finish":
            finished = True
            backend = ev.get("file") or backend
        elif kind == "report":
            t = tests.setdefault(ev["nodeid"], {"outcome": None, "reason": ""})
            when, outcome = ev["when"], ev["outcome"]
            if outcome == "passed":
                if when == "call" and t["outcome"] is None:
                    t["outcome"] = "passed"
                continue
            if outcome == "skipped":  # a skip, or an xfail
                if t["outcome"] in (None, "passed"):
                    t["outcome"] = "skipped"
                    t["reason"] = ev.get("reason", "")
                continue
            if when == "call":  # failed
                t["outcome"], t["reason"] = "failed", ev.get("reason", "")
            elif t["outcome"] != "failed":  # setup / teardown failed
                t["outcome"], t["reason"] = "error", ev.get("reason", "")
    for t in tests.values():
        if t["outcome"] is None:  # only a setup that passed: the call never reported
            t["outcome"] = "error"
            t["reason"] = t["reason"] or "no result (interrupted)"
    if not raw["timed_out"] and raw["rc"] not in (0, 1, 2, 5) and not finished:
        cut = f"crashed (exit status {raw['rc']})"
    elif raw["timed_out"]:
        cut = f"timeout after {raw['seconds']:.0f} s"
    else:
        cut = None
    if cut:
        for nid in collected:
            if nid not in tests or tests[nid]["outcome"] is None:
                tests[nid] = {"outcome": "error", "reason": cut}
    if not collected and not tests and not collect_errors and not finished:
        collect_errors.append(cut or f"pytest exit status {raw['rc']} with no reports")
    return {"tests": tests, "collected": collected, "collect_errors": collect_errors,
            "backend": backend, "seconds": raw["seconds"], "timed_out": raw["timed_out"],
            "rc": raw["rc"], "cut": cut}


def count(summary: dict, other_collected: int) -> dict:
    c = collections.Counter(t["outcome"] for t in summary["tests"].values())
    errors = c["error"]
    if summary["collect_errors"]:
        errors += max(1, other_collected - len(summary["tests"]))
    return {"passed": c["passed"], "failed": c["failed"], "errors": errors,
            "skipped": c["skipped"], "import_error": bool(summary["collect_errors"]),
            "timed_out": summary["timed_out"], "seconds": summary["seconds"]}


# ------------------------------------------------------------------------------ report
def markdown(files: list[str], results: dict, runs: list[str]) -> str:
    head = ["file"]
    for r in runs:
        head += [f"{r} pass", f"{r} fail", f"{r} err", f"{r} skip"]
    if len(runs) == 2:
        head.append("both pass")
    head.append("notes")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 2)
                                                         + ["---"]) + "|"]
    tot = collections.Counter()
    for f in files:
        row = [f]
        notes = []
        for r in runs:
            k = results[f]["counts"][r]
            row += [str(k["passed"]), str(k["failed"]), str(k["errors"]), str(k["skipped"])]
            for key in ("passed", "failed", "errors", "skipped"):
                tot[(r, key)] += k[key]
            if k["import_error"]:
                notes.append(f"{r}: import/collection error")
            if k["timed_out"]:
                notes.append(f"{r}: timeout")
            elif results[f]["cut"].get(r):
                notes.append(f"{r}: {results[f]['cut'][r]}")
        if len(runs) == 2:
            row.append(str(results[f]["both"]))
            tot["both"] += results[f]["both"]
        row.append("; ".join(notes))
        lines.append("| " + " | ".join(row) + " |")
    row = [f"**total ({len(files)} files)**"]
    for r in runs:
        row += [f"**{tot[(r, k)]}**" for k in ("passed", "failed", "errors", "skipped")]
    if len(runs) == 2:
        row.append(f"**{tot['both']}**")
    row.append("")
    lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _norm_reason(reason: str) -> str:
    """First line of the error (with the next one when the first only introduces it)."""
    lines = [ln.strip() for ln in (reason or "").splitlines() if ln.strip()]
    if not lines:
        return "(no message)"
    first = lines[0]
    if first.endswith(":") and len(lines) > 1:
        first += " " + lines[1]
    first = re.sub(r"/tmp/[^\s'\"]+", "<tmp>", first)
    return first[:200]


def top_reasons(results: dict, run: str, n: int) -> list[tuple[int, str]]:
    c = collections.Counter()
    for res in results.values():
        s = res["summary"][run]
        for t in s["tests"].values():
            if t["outcome"] in ("failed", "error"):
                c[_norm_reason(t["reason"])] += 1
        if s["collect_errors"]:
            k = res["counts"][run]["errors"] - sum(
                1 for t in s["tests"].values() if t["outcome"] == "error")
            for reason in s["collect_errors"][:1]:
                c["[import] " + _norm_reason(reason)] += k
    return [(k, r) for r, k in c.most_common(n)]


# ------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("snapshot", type=Path, help="onnxruntime repository snapshot (git dir or tree)")
    ap.add_argument("--commit", default=None,
                    help=f"commit to read from a git snapshot (default {DEFAULT_COMMIT}; a work "
                         "tree is read as it is when not given)")
    ap.add_argument("--files", default="", help="comma-separated test files (with or without .py)")
    ap.add_argument("--runs", default=",".join(RUNS), help="ort,onnxquant or one of them")
    ap.add_argument("--timeout", type=float, default=300.0, help="per-file timeout, seconds")
    ap.add_argument("--json", type=Path, default=None, help="write the full results here")
    ap.add_argument("--top", type=int, default=10, help="failure reasons to list per run")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args(argv)

    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    bad = [r for r in runs if r not in RUNS]
    if bad or not runs:
        ap.error(f"--runs: unknown {bad}; choose from {RUNS}")

    import onnxruntime

    import onnxquant

    tmp = Path(tempfile.mkdtemp(prefix="bench_ort_suite_"))
    repo = Path(__file__).resolve().parent.parent
    if tmp.resolve().is_relative_to(repo):
        raise SystemExit("the temporary folder must lie outside this repository")
    t_start = time.perf_counter()
    try:
        pristine = tmp / "pristine"
        source = copy_suite(args.snapshot.resolve(), args.commit, pristine)
        all_files = sorted(p.name for p in pristine.glob("test_*.py"))
        if args.files:
            want = [f.strip() for f in args.files.split(",") if f.strip()]
            want = [f if f.endswith(".py") else f + ".py" for f in want]
            missing = [f for f in want if f not in all_files]
            if missing:
                raise SystemExit(f"--files: not in the suite: {missing}")
            files = want
        else:
            files = all_files
        dirs = {}
        for r in runs:
            dirs[r] = tmp / r
            prepare(pristine, dirs[r])

        print(f"# onnxruntime quantization test suite: {source}", file=sys.stderr)
        print(f"# onnxruntime {onnxruntime.__version__}, onnxquant "
              f"{getattr(onnxquant, '__version__', '?')}, {len(files)} files, runs {runs}, "
              f"timeout {args.timeout:.0f} s/file, in {tmp}", file=sys.stderr)
        results: dict[str, dict] = {}
        for f in files:
            results[f] = {"summary": {}, "counts": {}, "cut": {}}
            for r in runs:
                raw = run_file(dirs[r], f, r, args.timeout)
                s = summarize(raw)
                s["output_tail"] = raw["output_tail"]
                results[f]["summary"][r] = s
                results[f]["cut"][r] = s["cut"]
                # the substitution must have happened (and must not have in the ort run)
                be = s["backend"] or ""
                if r == "onnxquant" and be and "onnxquant" not in be:
                    raise SystemExit(f"{f}: onnxruntime.quantization came from {be}")
                if r == "ort" and be and "onnxquant" in be:
                    raise SystemExit(f"{f}: ort run used {be}")
            for r in runs:
                other = [o for o in runs if o != r]
                n_other = len(results[f]["summary"][other[0]]["collected"]) if other else 0
                results[f]["counts"][r] = count(results[f]["summary"][r], n_other)
            if len(runs) == 2:
                a, b = (results[f]["summary"][r]["tests"] for r in runs)
                results[f]["both"] = sum(1 for nid, t in a.items() if t["outcome"] == "passed"
                                         and b.get(nid, {}).get("outcome") == "passed")
            line = "  ".join(
                f"{r}: {k['passed']}p {k['failed']}f {k['errors']}e {k['skipped']}s "
                f"({k['seconds']:.0f}s)" for r, k in results[f]["counts"].items())
            print(f"{f:48s} {line}", file=sys.stderr, flush=True)
        elapsed = time.perf_counter() - t_start

        print(markdown(files, results, runs))
        for r in runs:
            reasons = top_reasons(results, r, args.top)
            if reasons:
                print(f"\n{r}: most common failure reasons (tests)\n")
                for k, reason in reasons:
                    print(f"- {k} x `{reason}`")
        print(f"\nsource {source}; onnxruntime {onnxruntime.__version__}; "
              f"run time {elapsed:.0f} s")

        if args.json:
            out = {"source": source, "onnxruntime": onnxruntime.__version__,
                   "onnxquant": getattr(onnxquant, "__version__", None), "runs": runs,
                   "timeout_s": args.timeout, "seconds": round(elapsed, 1), "files": {}}
            for f in files:
                res = results[f]
                out["files"][f] = {
                    "counts": res["counts"], "both": res.get("both"),
                    **{r: {"tests": res["summary"][r]["tests"],
                           "collect_errors": res["summary"][r]["collect_errors"],
                           "backend": res["summary"][r]["backend"],
                           "rc": res["summary"][r]["rc"],
                           "output_tail": res["summary"][r]["output_tail"]} for r in runs}}
            out["totals"] = {r: {k: sum(out["files"][f]["counts"][r][k] for f in files)
                                 for k in ("passed", "failed", "errors", "skipped")}
                             for r in runs}
            out["top_reasons"] = {r: top_reasons(results, r, args.top) for r in runs}
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(out, indent=1), encoding="utf-8")
    finally:
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
