"""The markdown tables of ``bench_preprocess.py``."""

from __future__ import annotations

import _bench_util as bu
import _corpus_eval as ce

EQUAL_FEEDS = 8
ROUNDS = 5  # latency: interleaved rounds of --runs / ROUNDS runs per model
MINILM_ROUTES = {
    "float": "float model",
    "ours_fused": 'ours: preprocess(model_type="bert") + quantize_dynamic',
    "ours_unfused": "ours: quantize_dynamic (unfused model)",
    "ort_fused": 'ort: optimize_model("bert", opt_level=0) + quantize_dynamic(QInt8)',
    "ort_fused_float": "ort: the same, quantize_dynamic with extra_options "
                       "DefaultTensorType=FLOAT",
}


def _status(rec: dict) -> str:
    if rec["ok"]:
        warnings = rec.get("warnings") or []
        return "ok" if not warnings else bu.cell(f"ok ⚠ {'; '.join(warnings)}", 110)
    return bu.cell(f"✗ {bu.short_error(rec['error'])}", 110)


def _equal(rec: dict | None) -> str:
    if rec is None or not rec["ok"] or "equal" not in rec:
        return "–"
    if "compare_error" in rec:
        return bu.cell(f"✗ {rec['compare_error']}", 60)
    mark = "✓" if rec["equal"] else "✗"
    return f"{mark} {rec['max_abs']:.1e} / {rec['max_rel']:.1e}"


def _left(rec: dict | None) -> str:
    if rec is None:
        return "–"
    parts = []
    if rec.get("left_in_cwd"):
        parts.append("cwd: " + ", ".join(rec["left_in_cwd"]))
    if rec.get("left_in_tmp"):
        parts.append("TMPDIR: " + ", ".join(rec["left_in_tmp"]))
    return bu.cell("; ".join(parts), 160) if parts else "nothing"


def _graph(rec: dict | None) -> str:
    if rec is None or "graph" not in rec:
        return "–"
    return f"{rec['graph']['nodes']} / {rec['graph']['shapeless']}"


def _mb(rec: dict | None) -> str:
    b = bu.get(rec, "bytes")
    return "–" if b is None else f"{b / 1e6:.2f}"


def pre_table(recs: list[dict], float_graphs: dict) -> str:
    by_model: dict[str, dict] = {}
    for rec in recs:
        by_model.setdefault(rec["model"], {})[rec["tool"]] = rec
    header = ["model", "float MB", "float nodes / outputs w/o shape", "ours", "ort", "ours s",
              "ort s", "ours MB", "ort MB", "ours nodes / outputs w/o shape",
              "ort nodes / outputs w/o shape",
              f"ours = float (max abs / max rel, {EQUAL_FEEDS} feeds)",
              f"ort = float (max abs / max rel, {EQUAL_FEEDS} feeds)", "ort left behind",
              "ours left behind"]
    rows = []
    for name, by_tool in by_model.items():
        ours, ort = by_tool.get("ours"), by_tool.get("ort")
        any_rec = ours or ort
        fg = float_graphs.get(name)
        rows.append([name, f"{any_rec['float_bytes'] / 1e6:.2f}",
                     "–" if fg is None else f"{fg['nodes']} / {fg['shapeless']}",
                     _status(ours) if ours else "–", _status(ort) if ort else "–",
                     bu.fmt(bu.get(ours, "seconds"), ".1f"), bu.fmt(bu.get(ort, "seconds"), ".1f"),
                     _mb(ours), _mb(ort), _graph(ours), _graph(ort), _equal(ours), _equal(ort),
                     _left(ort), _left(ours)])
    return bu.markdown(header, rows)


def _fid(rec: dict | None) -> str:
    if rec is None:
        return "–"
    status = bu.status(rec)
    if status != "ok":
        return status
    return ce.format_fidelity(rec["model"], rec["fidelity"])


def quant_table(recs: list[dict]) -> str:
    by_model: dict[str, dict] = {}
    for rec in recs:
        by_model.setdefault(rec["model"], {})[(rec["mode"], rec["pre"])] = rec
    header = ["model", "measure", "float MB", "static", "static after pre", "dynamic",
              "dynamic after pre", "static MB (– / pre)", "dynamic MB (– / pre)",
              "static s (– / pre)", "dynamic s (– / pre)"]
    rows = []
    for name, recs_ in by_model.items():
        g = recs_.get
        float_bytes = next(iter(recs_.values()))["float_bytes"]
        rows.append([name, ce.measure_name(name), f"{float_bytes / 1e6:.2f}",
                     _fid(g(("static", "none"))), _fid(g(("static", "ours"))),
                     _fid(g(("dynamic", "none"))), _fid(g(("dynamic", "ours"))),
                     f"{_mb(g(('static', 'none')))} / {_mb(g(('static', 'ours')))}",
                     f"{_mb(g(('dynamic', 'none')))} / {_mb(g(('dynamic', 'ours')))}",
                     f"{bu.fmt(bu.get(g(('static', 'none')), 'seconds'), '.1f')} / "
                     f"{bu.fmt(bu.get(g(('static', 'ours')), 'seconds'), '.1f')}",
                     f"{bu.fmt(bu.get(g(('dynamic', 'none')), 'seconds'), '.1f')} / "
                     f"{bu.fmt(bu.get(g(('dynamic', 'ours')), 'seconds'), '.1f')}"])
    return bu.markdown(header, rows)


def _count(rec: dict, *ops: str) -> str:
    if "graph" not in rec:
        return "–"
    return str(sum(rec["graph"]["ops"].get(op, 0) for op in ops))


def minilm_table(routes: dict) -> str:
    header = ["route", "status", "QAttention", "float MatMul", "Attention (float)",
              "MatMulInteger / DynamicQuantizeMatMul", "embedding cosine", "MB",
              "latency ms (1 thread)", "latency / float", "time s"]
    rows = []
    for key, rec in routes.items():
        seconds = rec.get("seconds")
        if seconds is not None and key == "ours_fused":
            seconds += rec["preprocess"]["seconds"]
        integer = (f"{_count(rec, 'MatMulInteger')} / "
                   f"{_count(rec, 'com.microsoft.DynamicQuantizeMatMul')}")
        rows.append([MINILM_ROUTES[key], "ok" if key == "float" else bu.status(rec),
                     _count(rec, "com.microsoft.QAttention"), _count(rec, "MatMul"),
                     _count(rec, "com.microsoft.Attention"), integer,
                     _fid(rec) if bu.status(rec) == "ok" else "–", _mb(rec),
                     bu.fmt(rec.get("latency_ms"), ".2f"), bu.fmt(rec.get("latency_ratio"), ".2f"),
                     bu.fmt(seconds, ".1f")])
    return bu.markdown(header, rows)


def report(results: dict, float_graphs: dict) -> str:
    parts = []
    if results["pre"]:
        parts.append("### Pre-processing: ours = onnxquant.preprocess(PreprocessConfig()), "
                     "ort = quant_pre_process (defaults)\n\n"
                     + pre_table(results["pre"], float_graphs))
    if results["quant"]:
        parts.append("### Task fidelity of onnxquant's defaults, without / after onnxquant "
                     "pre-processing (all eval feeds, reference = float model)\n\n"
                     + quant_table(results["quant"]))
    if results["minilm"]:
        pre = results["minilm"]["ours_fused"].get("preprocess")
        note = f"\n\nours preprocess(model_type=\"bert\"): {describe_pre(pre)}" if pre else ""
        shapes = results["minilm"]["float"].get("latency_feed_shapes")
        if shapes:
            note += (f"\n\nlatency: first eval feed {shapes}, "
                     f"{results['minilm']['float']['latency_runs']} runs per model in "
                     f"{ROUNDS} interleaved rounds, 1 intra-op thread")
        parts.append("### MiniLM (minilm_l6): fusion + dynamic quantization\n\n"
                     + minilm_table(results["minilm"]) + note)
    return "\n\n".join(parts)


def describe_pre(rec: dict) -> str:
    if not rec["ok"]:
        text = f"FAILED {rec['error']}"
    else:
        text = f"ok {rec['seconds']:.1f} s, {rec['bytes'] / 1e6:.2f} MB"
        if "equal" in rec:
            text += ("; equal" if rec["equal"] else "; NOT equal") + (
                f" ({rec['compare_error']})" if "compare_error" in rec else
                f" (max abs {rec['max_abs']:.2g}, max rel {rec['max_rel']:.2g})")
    if rec.get("warnings"):
        text += f"; warnings: {rec['warnings']}"
    if rec.get("left_in_cwd"):
        text += f"; left in cwd: {rec['left_in_cwd']}"
    if rec.get("left_in_tmp"):
        text += f"; left in TMPDIR: {rec['left_in_tmp']}"
    return text
