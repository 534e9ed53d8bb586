#!/usr/bin/env python
"""Calibration methods, onnxquant side by side with onnxruntime.quantization.

Two parts (--part scaling|fidelity|all):

scaling   Peak memory and wall time of calibration only, as the number of calibration samples
          grows (--samples, default 32,128,256: the 32 corpus calib feeds, cycled), on minilm_l6
          and rapidocr_det_v4. Each (model, method, tool, N) runs in a fresh worker process:

    ort:  cal = create_calibrator(model, [], augmented_model_path=<scratch>/aug.onnx,
                                  calibrate_method=CalibrationMethod.X, extra_options=...)
          cal.collect_data(reader); cal.compute_data()
          with create_calibrator's defaults ("ort") and, for Entropy, also with
          extra_options={"num_bins": 2048, "num_quantized_bins": 128} ("ort-entropy-2048"):
          with the defaults (128 / 128) there is a single candidate threshold, so Entropy is
          MinMax in disguise.
    ours: onnxquant.calibrate(model, feeds, StaticQuantConfig(calibration_method=X)).ranges

          Both read the feeds from a generator that loads one feed at a time from its own
          pickle (feed i is calib feed i mod 32), so the feeds themselves never add memory
          that grows with N; whatever grows is what the calibrator keeps.
          Peak memory = the worker's VmHWM (interpreter + numpy + onnxruntime imports + the
          calibrator); time = the calibration calls only (--repeat: median, at --time-at N).

fidelity  Per calibration method, static QDQ S8S8 (per-channel off) with the 32 calib feeds on
          every corpus model, then fidelity on the 64 eval feeds against the float model:

    ort:  quantize_static(..., quant_format=QDQ, activation_type=QInt8, weight_type=QInt8,
                          per_channel=False, calibrate_method=CalibrationMethod.X)
          (MinMax, Entropy, Percentile; quantize_static cannot pass num_bins)
    ours: onnxquant.quantize_static(model, out, feeds,
                                    StaticQuantConfig(calibration_method=X))
          (MINMAX, ENTROPY, PERCENTILE, DISTRIBUTION, MSE)

Workers, peak memory and evaluation are bench_static's (see _bench_util.py). A worker that
fails, crashes, times out or grows past --mem-limit-gb is a failure row, not a crash.

    python benchmarks/bench_calibration.py [--part scaling|fidelity|all] [--models a,b]
        [--methods minmax,entropy,...] [--tools ours,ort] [--samples 32,128,256] [--repeat N]
        [--time-at N] [--json PATH] [--keep DIR] [--timeout S] [--mem-limit-gb G]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _bench_util as bu  # noqa: E402
import _corpus_eval as ce  # noqa: E402

METHODS = ("minmax", "entropy", "percentile", "distribution", "mse")
ORT_METHOD = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile",
              "distribution": "Distribution"}  # create_calibrator; quantize_static: first three
ORT_QUANTIZE_METHODS = ("minmax", "entropy", "percentile")
# tool variant -> (tool, create_calibrator extra_options, method it applies to or None = all)
VARIANTS = {
    "ours": ("ours", None, None),
    "ort": ("ort", {}, None),
    "ort-entropy-2048": ("ort", {"num_bins": 2048, "num_quantized_bins": 128}, "entropy"),
}
TOOLS = ("ours", "ort")
SCALING_MODELS = ("minilm_l6", "rapidocr_det_v4")
SCALING_METHODS = ("minmax", "entropy", "percentile")
TARGET_GROWTH = 1.15  # ours: peak(largest N) / peak(smallest N)
TARGET_TIME = {"entropy": 0.5, "percentile": 0.5}  # ours / ort at --time-at


# =========================================================================== worker side
def _stream(paths: list[str], n: int):
    """n feeds, feed i loaded (a fresh copy) from paths[i % len(paths)] when it is needed."""
    for i in range(n):
        yield bu.load_pickle(paths[i % len(paths)])


def _range(low, high) -> list[float]:
    import numpy as np

    return [float(np.min(np.asarray(low, dtype=np.float64))),
            float(np.max(np.asarray(high, dtype=np.float64)))]


def _calibrate_ort(model: str, feeds, method: str, extra_options: dict) -> dict:
    from onnxruntime.quantization import CalibrationMethod, create_calibrator

    cal = create_calibrator(model, [], augmented_model_path=str(Path.cwd() / "aug.onnx"),
                            calibrate_method=getattr(CalibrationMethod, ORT_METHOD[method]),
                            extra_options=extra_options)
    cal.collect_data(bu.ort_reader(feeds))
    data = cal.compute_data()
    return {name: _range(*td.range_value) for name, td in data.data.items()}


def _calibrate_ours(model: str, feeds, method: str, extra_options) -> dict:
    import onnxquant

    config = onnxquant.StaticQuantConfig(
        calibration_method=getattr(onnxquant.CalibrationMethod, method.upper()))
    result = onnxquant.calibrate(model, feeds, config)
    return {name: _range(low, high) for name, (low, high) in result.ranges.items()}


CALIBRATORS = {"ours": _calibrate_ours, "ort": _calibrate_ort}


def worker_scaling(job: dict) -> dict:
    import numpy  # noqa: F401 - the same fixed imports for both tools, before the clock starts
    import onnxruntime  # noqa: F401

    if job["tool"] == "ours":
        bu.use_working_tree()
    try:
        if job["tool"] == "ours":
            import onnxquant  # noqa: F401
        else:
            import onnxruntime.quantization  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any failure is a result row
        return {"ok": False, "error": bu.error_line(exc)}
    feeds = _stream(job["feed_paths"], job["n"])
    rss_before = bu.current_rss_mb()
    t0 = time.perf_counter()
    try:
        ranges = CALIBRATORS[job["tool"]](job["model"], feeds, job["method"],
                                          job["extra_options"])
    except Exception as exc:  # noqa: BLE001
        return {"ok": False, "error": bu.error_line(exc), **bu.peak_rss_mb()}
    seconds = time.perf_counter() - t0
    left = sum(1 for _ in feeds)  # feeds the calibrator did not read (0 = it read all)
    with open(job["ranges_out"], "w") as f:
        json.dump(ranges, f)
    return {"ok": True, "seconds": seconds, **bu.peak_rss_mb(), "rss_before_mb": rss_before,
            "tensors": len(ranges), "feeds_left": left}


def _quantize_ort(model: str, out: str, feeds, method: str) -> None:
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    quantize_static(model, out, bu.ort_reader(feeds), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    per_channel=False,
                    calibrate_method=getattr(CalibrationMethod, ORT_METHOD[method]))


def _quantize_ours(model: str, out: str, feeds, method: str) -> None:
    bu.use_working_tree()
    import onnxquant

    config = onnxquant.StaticQuantConfig(
        per_channel=False, activation_type=onnxquant.INT8,  # S8S8, as the baseline's default
        calibration_method=getattr(onnxquant.CalibrationMethod, method.upper()))
    onnxquant.quantize_static(model, out, feeds, config=config)


QUANTIZERS = {"ours": _quantize_ours, "ort": _quantize_ort}


def worker_quant(job: dict) -> dict:
    feeds = bu.load_pickle(job["feeds"])
    return bu.timed_call(QUANTIZERS[job["tool"]], job["model"], job["out"], feeds, job["method"])


# =========================================================================== parent side
def _model_copy(name: str, workdir: Path) -> str:
    """The float model copied into workdir: onnxruntime.quantization writes
    `<stem>-inferred.onnx` next to its input, which must not race with other runs."""
    path = workdir / name / "float" / f"{name}.onnx"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ce.model_path(name), path)
    return str(path)


def _variants(method: str, tools: list[str], skip: Sequence[str] = ()) -> list[str]:
    return [v for v, (tool, _, only) in VARIANTS.items()
            if tool in tools and (only is None or only == method) and v not in skip
            and (tool == "ours" or method in ORT_METHOD)]


def _range_diff(ours_path: Path, ort_path: Path) -> dict | None:
    """Tensors both calibrated, and the median over them of |Δlow| + |Δhigh| relative to
    ort's width."""
    if not (ours_path.exists() and ort_path.exists()):
        return None
    ours, ort = (json.loads(p.read_text()) for p in (ours_path, ort_path))
    common = sorted(set(ours) & set(ort))
    rel = []
    for t in common:
        (a, b), (c, d) = ours[t], ort[t]
        width = d - c
        if width > 0:
            rel.append((abs(a - c) + abs(b - d)) / width)
    return {"common": len(common), "median_rel": statistics.median(rel) if rel else None}


def run_scaling(args, workdir: Path) -> list[dict]:
    results = []
    for name in args.models:
        if name not in SCALING_MODELS and args.models_given is None:
            continue
        model = _model_copy(name, workdir)
        feeds_dir = workdir / name / "calib_feeds"
        feeds_dir.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, feed in enumerate(ce.samples(name, "calib")):
            paths.append(str(feeds_dir / f"{i:03d}.pkl"))
            bu.dump_pickle(feed, paths[-1])
        for method in args.methods_scaling:
            for variant in _variants(method, args.tools, args.skip_variants):
                tool, extra, _ = VARIANTS[variant]
                failed = None
                for n in args.samples:
                    rec = {"part": "scaling", "model": name, "method": method,
                           "variant": variant, "tool": tool, "n": n, "extra_options": extra}
                    if failed is not None:
                        rec.update(ok=False, skipped=True,
                                   error=f"skipped: out of memory or time at N={failed}")
                        results.append(rec)
                        continue
                    jobdir = workdir / name / "scaling" / method / variant / str(n)
                    jobdir.mkdir(parents=True, exist_ok=True)
                    job = {"tool": tool, "method": method, "model": model, "n": n,
                           "feed_paths": paths, "extra_options": extra,
                           "ranges_out": str(jobdir / "ranges.json")}
                    repeat = args.repeat if n == args.time_at else 1
                    rec.update(bu.run_repeated("bench_calibration:worker_scaling", job, jobdir,
                                               repeat, args.timeout, kind="calib",
                                               mem_limit_mb=args.mem_limit_mb))
                    rec["ranges_path"] = job["ranges_out"]
                    if not rec["ok"] and (rec.get("over_limit_mb") or "timed out" in rec["error"]):
                        failed = n  # a larger N would only fail the same way, later
                    results.append(rec)
                    print(f"scaling {name} {method} {variant} N={n}: {_describe_calib(rec)}",
                          flush=True)
        shutil.rmtree(feeds_dir, ignore_errors=True)
    for rec in results:  # ours vs ort ranges, same model / method / N
        if rec["tool"] == "ort" and rec.get("ok"):
            ours = _find(results, rec["model"], rec["method"], "ours", rec["n"])
            if ours and ours.get("ok"):
                rec["vs_ours"] = _range_diff(Path(ours["ranges_path"]),
                                             Path(rec["ranges_path"]))
    return results


def _describe_calib(rec: dict) -> str:
    if not rec["ok"]:
        return f"FAILED {rec['error']}"
    return (f"ok {rec['seconds']:.2f} s, peak {rec['peak_mb']:.0f} MB "
            f"(before {bu.fmt(rec.get('rss_before_mb'), '.0f')} MB), {rec['tensors']} tensors")


def _find(results, model, method, variant, n=None):
    for rec in results:
        key = (rec["model"], rec["method"], rec.get("variant", rec["tool"]))
        if key == (model, method, variant) and (n is None or rec.get("n") == n):
            return rec
    return None


def run_fidelity(args, workdir: Path) -> list[dict]:
    results = []
    for name in args.models:
        ctx = bu.prepare_model(name, workdir, repeat=args.repeat, timeout=args.timeout,
                               mem_limit_mb=args.mem_limit_mb)
        ctx["model"] = _model_copy(name, workdir)
        for method in args.methods_fidelity:
            for tool in args.tools:
                if tool == "ort" and method not in ORT_QUANTIZE_METHODS:
                    continue
                jobdir = workdir / name / "fidelity" / method / tool
                jobdir.mkdir(parents=True, exist_ok=True)
                job = {"tool": tool, "method": method, "model": ctx["model"],
                       "out": str(jobdir / "model" / "model.onnx"), "feeds": ctx["calib"]}
                rec = bu.quantize_and_evaluate(ctx, "bench_calibration:worker_quant", job,
                                               jobdir, part="fidelity", model=name,
                                               method=method, tool=tool, variant=tool)
                results.append(rec)
                print(f"fidelity {name} {method} {tool}: {bu.describe(rec)}", flush=True)
        shutil.rmtree(workdir / name / "feeds", ignore_errors=True)
    return results


# =========================================================================== report
def _peak_cell(rec: dict | None) -> str:
    if rec is None:
        return "–"
    if rec.get("ok"):
        return f"{rec['peak_mb']:.0f}"
    if rec.get("skipped"):
        return "skip"
    if rec.get("over_limit_mb"):
        return f">{rec['over_limit_mb']:.0f}"
    if rec.get("peak_mb"):  # failed after reaching this much
        return f"✗ ({rec['peak_mb']:.0f})"
    return "✗"


def _first_error(recs: list[dict]) -> str | None:
    for rec in recs:
        if rec is not None and not rec.get("ok") and not rec.get("skipped"):
            return f"N={rec['n']}: {bu.short_error(rec['error'])}"
    return None


def _mark(value: float | None, target: float) -> str:
    if value is None:
        return "–"
    return f"{value:.2f} {'✓' if value <= target else '✗'}"


def scaling_table(results: list[dict], samples: list[int], time_at: int) -> str:
    lo, hi = min(samples), max(samples)
    ns = "/".join(str(n) for n in samples)
    header = ["model", "method", "ort variant", f"ours peak MB {ns}", f"ort peak MB {ns}",
              f"ours peak {hi}/{lo}", f"ort peak {hi}/{lo}", f"ours s @{time_at}",
              f"ort s @{time_at}", "time ours/ort", "tensors ours / ort (common)",
              "ranges Δ (median, rel. ort width)", "failures"]
    rows = []
    keys = []
    for rec in results:
        key = (rec["model"], rec["method"])
        if key not in keys:
            keys.append(key)
    for model, method in keys:
        ours = {n: _find(results, model, method, "ours", n) for n in samples}
        ort_variants = [v for v in VARIANTS if v != "ours"
                        and _find(results, model, method, v) is not None] or [None]
        for variant in ort_variants:
            ort = {n: (_find(results, model, method, variant, n) if variant else None)
                   for n in samples}

            def growth(recs):
                a, b = recs[lo], recs[hi]
                if a and b and a.get("ok") and b.get("ok"):
                    return b["peak_mb"] / a["peak_mb"]
                return None

            t_ours, t_ort = bu.get(ours[time_at], "seconds"), bu.get(ort[time_at], "seconds")
            g_ours, g_ort = growth(ours), growth(ort)
            time_ratio = t_ours / t_ort if t_ours is not None and t_ort else None
            diff = bu.get(ort[time_at], "vs_ours")
            fails = []
            for tool, recs in (("ours", ours), (variant or "ort", ort)):
                err = _first_error([recs[n] for n in samples])
                if err:
                    fails.append(f"{tool} {err}")
            rows.append([
                model, method,
                "–" if variant is None else ("default" if variant == "ort" else
                                             _variant_text(variant)),
                " / ".join(_peak_cell(ours[n]) for n in samples),
                " / ".join(_peak_cell(ort[n]) for n in samples),
                _mark(g_ours, TARGET_GROWTH), bu.fmt(g_ort, ".2f"),
                bu.fmt(t_ours, ".2f"), bu.fmt(t_ort, ".2f"),
                _mark(time_ratio, TARGET_TIME[method]) if method in TARGET_TIME
                else bu.fmt(time_ratio, ".2f"),
                f"{bu.get(ours[time_at], 'tensors') or '–'} / "
                f"{bu.get(ort[time_at], 'tensors') or '–'}"
                + (f" ({diff['common']})" if diff else ""),
                bu.fmt(diff and diff["median_rel"], ".3f"),
                bu.cell("; ".join(fails), 160) if fails else ""])
    return bu.markdown(header, rows)


def _variant_text(variant: str) -> str:
    return ", ".join(f"{k}={v}" for k, v in VARIANTS[variant][1].items())


def fidelity_table(results: list[dict], methods: list[str]) -> tuple[str, list[str]]:
    """The table (ours next to ort per method, best of ours) and its numbered failure notes."""
    header = ["model", "fidelity measure"]
    columns = []
    for method in methods:
        columns.append((method, "ours"))
        if method in ORT_QUANTIZE_METHODS:
            columns.append((method, "ort"))
    header += [f"{m} {t}" for m, t in columns] + ["best of ours", "best of ort"]
    notes: list[str] = []

    def note(text: str) -> str:
        if text not in notes:
            notes.append(text)
        return f"✗ [{notes.index(text) + 1}]"

    rows = []
    for name in dict.fromkeys(r["model"] for r in results):
        row = [name, ce.measure_name(name)]
        best: dict[str, list] = {"ours": [], "ort": []}
        for method, tool in columns:
            rec = _find(results, name, method, tool)
            if rec is None:
                row.append("–")
            elif rec.get("fidelity") is not None:
                row.append(ce.format_fidelity(name, rec["fidelity"]))
                best[tool].append((rec["fidelity"], method))
            elif not rec["ok"]:
                row.append(note(bu.short_error(rec["error"])))
            elif not rec["runs"]:
                row.append(note(f"ORT run: {bu.short_error(rec['eval_error'])}"))
            else:
                row.append(note(f"eval: {bu.short_error(rec['eval_error'])}"))
        for tool in ("ours", "ort"):
            if best[tool]:
                top = max(v for v, _ in best[tool])
                winners = [m for v, m in best[tool] if v == top]
                row.append(f"{'/'.join(winners)} ({ce.format_fidelity(name, top)})")
            else:
                row.append("–")
        rows.append(row)
    return bu.markdown(header, rows), [f"[{i + 1}] {t}" for i, t in enumerate(notes)]


def fidelity_time_table(results: list[dict], methods: list[str]) -> str:
    """Quantize time and peak memory per model and method (ours / ort)."""
    header = ["model"] + [f"{m} s ours / ort" for m in methods] + \
             [f"{m} peak MB ours / ort" for m in methods]
    rows = []
    for name in dict.fromkeys(r["model"] for r in results):
        row = [name]
        for key, spec in (("seconds", ".1f"), ("peak_mb", ".0f")):
            for method in methods:
                vals = [bu.fmt(bu.get(_find(results, name, method, tool), key), spec)
                        for tool in TOOLS]
                row.append(" / ".join(vals))
        rows.append(row)
    return bu.markdown(header, rows)


# =========================================================================== CLI
def _int_list(text: str) -> list[int]:
    try:
        values = sorted({int(s) for s in text.split(",") if s.strip()})
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError("sample counts must be >= 1")
    return values


def _mem_available_mb() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=("scaling", "fidelity", "all"), default="all")
    p.add_argument("--models", type=bu.list_arg(ce.model_names()), default=None,
                   help="comma-separated corpus models (default: scaling minilm_l6 and "
                        "rapidocr_det_v4, fidelity all 7)")
    p.add_argument("--methods", type=bu.list_arg(list(METHODS)), default=None,
                   help="comma-separated of " + ",".join(METHODS) + " (default: scaling "
                        "minmax,entropy,percentile; fidelity all)")
    p.add_argument("--tools", type=bu.list_arg(list(TOOLS)), default=list(TOOLS),
                   help="ours = onnxquant, ort = onnxruntime.quantization (default: both)")
    p.add_argument("--skip-variants", type=bu.list_arg(list(VARIANTS)), default=[],
                   help="scaling: tool variants to leave out (e.g. ort-entropy-2048)")
    p.add_argument("--samples", type=_int_list, default=[32, 128, 256],
                   help="scaling: calibration sample counts (default 32,128,256)")
    p.add_argument("--time-at", type=int, default=None,
                   help="scaling: sample count whose time is reported (default 128 if in "
                        "--samples, else the largest)")
    p.add_argument("--repeat", type=int, default=1,
                   help="run the timed calls N times, report the median time (default 1)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--keep", metavar="DIR", help="keep models, ranges and worker logs in DIR")
    p.add_argument("--timeout", type=float, default=3600,
                   help="seconds allowed per worker process (default 3600)")
    p.add_argument("--mem-limit-gb", type=float, default=None,
                   help="kill a worker whose RSS exceeds this (default: half the memory "
                        "available at start; 0 = no limit)")
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error("--repeat must be >= 1")
    if args.time_at is None:
        args.time_at = 128 if 128 in args.samples else max(args.samples)
    elif args.time_at not in args.samples:
        p.error("--time-at must be one of --samples")
    args.models_given = args.models
    if args.models is None:
        args.models = ce.model_names()
    args.methods_scaling = args.methods or list(SCALING_METHODS)
    args.methods_fidelity = args.methods or list(METHODS)
    if args.mem_limit_gb is None:
        avail = _mem_available_mb()
        args.mem_limit_mb = avail / 2 if avail else None
    else:
        args.mem_limit_mb = args.mem_limit_gb * 1024 or None
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    scaling: list[dict] = []
    fidelity: list[dict] = []
    with bu.scratch_dir(args.keep, "onnxquant-bench-calib-") as workdir:
        if args.mem_limit_mb:
            print(f"memory limit per worker: {args.mem_limit_mb:.0f} MB", flush=True)
        if args.part in ("scaling", "all"):
            scaling = run_scaling(args, workdir)
        if args.part in ("fidelity", "all"):
            fidelity = run_fidelity(args, workdir)
    if scaling:
        print("\n## Calibration only: peak memory and time vs number of samples\n")
        print(scaling_table(scaling, args.samples, args.time_at))
        print(f"\ntargets (ours): peak {max(args.samples)}/{min(args.samples)} <= "
              f"{TARGET_GROWTH}; time ours/ort <= 0.5 for entropy and percentile")
    if fidelity:
        table, notes = fidelity_table(fidelity, args.methods_fidelity)
        print("\n## Fidelity per calibration method (QDQ S8S8, per-tensor, 32 calib feeds)\n")
        print(table)
        if notes:
            print()
            print("\n".join(notes))
        print("\n## Quantize time and peak memory per method\n")
        print(fidelity_time_table(fidelity, args.methods_fidelity))
    if args.json:
        for rec in scaling:
            rec.pop("ranges_path", None)
        doc = {"benchmark": "calibration methods", "environment": bu.environment(),
               "samples": args.samples, "time_at": args.time_at, "repeat": args.repeat,
               "mem_limit_mb": args.mem_limit_mb, "variants": VARIANTS,
               "scaling": scaling, "fidelity": fidelity}
        Path(args.json).write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
