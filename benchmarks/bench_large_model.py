"""Quantize a ~3 GB LLM-shaped float model (external data) in every mode, under a memory bound.

    .venv/bin/python benchmarks/bench_large_model.py [--workdir /tmp/oq_large] [--layers 12]
        [--modes weight_only,dynamic,static_qdq,static_qop] [--mem-limit-gb 20] [--json PATH]

The model is generated once (cached in ``--workdir``) by streaming one initializer at a time to
its ``.data`` file, never the whole model in memory: an embedding Gather, ``--layers`` decoder
blocks (RMSNorm written with ops, Q/K/V/O MatMuls, multi-head attention with Softmax, a SiLU
gated MLP), a final RMSNorm and an LM-head MatMul; ``input_ids`` int64 ``[1, seq]``. With
hidden 2048, MLP 5632, vocab 32000 and 12 layers it is 2.99 GB.

Every measured step runs in a fresh worker process (``_bench_util.run_worker``) under
``RLIMIT_AS`` (``--mem-limit-gb``) and an RSS watchdog: one plain onnxruntime session of the
float model running one feed (the baseline: what one session of the model needs), then per mode
the quantization (wall time, peak RSS = the worker's VmHWM, which counts the pages of memory
mapped data files it touched), then one onnxruntime session of the output running the same
feed (finite logits, cosine against the float logits, its own peak RSS).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import _bench_util as bu  # noqa: E402

MODES = ("weight_only", "dynamic", "static_qdq", "static_qop")
ALIGN = 1 << 16  # data offsets aligned so that onnxruntime can memory-map every tensor


# =========================================================================== the model
def _shape_spec(args: argparse.Namespace) -> dict:
    return {"layers": args.layers, "hidden": args.hidden, "ffn": args.ffn, "vocab": args.vocab,
            "heads": args.heads, "seed": 0, "version": 1}


class _DataWriter:
    """Appends initializers to one external-data file and makes their (data-less) protos."""

    def __init__(self, path: Path, rng: np.random.Generator) -> None:
        self.path = path
        self.file = open(path, "wb")  # noqa: SIM115 - closed by close()
        self.rng = rng
        self.initializers: list = []

    def add(self, name: str, array: np.ndarray) -> str:
        from onnx import TensorProto

        offset = self.file.tell()
        pad = -offset % ALIGN
        if pad:
            self.file.write(b"\0" * pad)
            offset += pad
        data = np.ascontiguousarray(array, dtype="<f4")
        self.file.write(data.tobytes())
        tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(array.shape),
                             data_location=TensorProto.EXTERNAL)
        for key, value in (("location", self.path.name), ("offset", str(offset)),
                           ("length", str(data.nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self.initializers.append(tensor)
        return name

    def normal(self, name: str, shape: tuple[int, ...], std: float) -> str:
        array = self.rng.standard_normal(shape, dtype=np.float32)
        array *= np.float32(std)
        return self.add(name, array)

    def close(self) -> None:
        self.file.close()


def build_model(folder: Path, spec: dict) -> Path:
    """Write ``folder/model.onnx`` + ``model.onnx.data`` for ``spec`` (one weight in memory at
    a time); returns the model path."""
    import onnx
    from onnx import TensorProto, helper

    h, f, v, heads, layers = (spec[k] for k in ("hidden", "ffn", "vocab", "heads", "layers"))
    hd = h // heads
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    writer = _DataWriter(folder / "model.onnx.data", np.random.default_rng(spec["seed"]))
    nodes: list = []
    small = [
        helper.make_tensor("eps", TensorProto.FLOAT, [], [1e-6]),
        helper.make_tensor("attn_scale", TensorProto.FLOAT, [], [1.0 / math.sqrt(hd)]),
        helper.make_tensor("heads_shape", TensorProto.INT64, [4], [0, 0, heads, hd]),
        helper.make_tensor("hidden_shape", TensorProto.INT64, [3], [0, 0, h]),
    ]

    def node(op: str, inputs: list[str], out: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [out], name=f"{out}_{op}", **attrs))
        return out

    def rms_norm(x: str, prefix: str) -> str:
        gamma = writer.add(f"{prefix}.weight",
                           1.0 + 0.1 * writer.rng.standard_normal(h, dtype=np.float32))
        sq = node("Mul", [x, x], f"{prefix}/sq")
        mean = node("ReduceMean", [sq], f"{prefix}/mean", axes=[-1], keepdims=1)
        rms = node("Sqrt", [node("Add", [mean, "eps"], f"{prefix}/mean_eps")], f"{prefix}/rms")
        return node("Mul", [node("Div", [x, rms], f"{prefix}/normed"), gamma], f"{prefix}/out")

    def linear(x: str, name: str, k: int, n: int) -> str:
        w = writer.normal(f"{name}.weight", (k, n), 1.0 / math.sqrt(k))
        return node("MatMul", [x, w], f"{name}/out")

    x = node("Gather", [writer.normal("embed.weight", (v, h), 1.0), "input_ids"], "embed/out")
    for i in range(layers):
        p = f"layers.{i}"
        n1 = rms_norm(x, f"{p}.input_norm")
        q, k, val = (linear(n1, f"{p}.attn.{w}_proj", h, h) for w in "qkv")
        qh = node("Transpose", [node("Reshape", [q, "heads_shape"], f"{p}.attn/q_heads")],
                  f"{p}.attn/q_t", perm=[0, 2, 1, 3])
        kh = node("Transpose", [node("Reshape", [k, "heads_shape"], f"{p}.attn/k_heads")],
                  f"{p}.attn/k_t", perm=[0, 2, 3, 1])
        vh = node("Transpose", [node("Reshape", [val, "heads_shape"], f"{p}.attn/v_heads")],
                  f"{p}.attn/v_t", perm=[0, 2, 1, 3])
        scores = node("Mul", [node("MatMul", [qh, kh], f"{p}.attn/qk"), "attn_scale"],
                      f"{p}.attn/scores")
        probs = node("Softmax", [scores], f"{p}.attn/probs", axis=-1)
        ctx = node("MatMul", [probs, vh], f"{p}.attn/ctx")
        ctx = node("Reshape", [node("Transpose", [ctx], f"{p}.attn/ctx_t", perm=[0, 2, 1, 3]),
                               "hidden_shape"], f"{p}.attn/ctx_flat")
        x = node("Add", [x, linear(ctx, f"{p}.attn.o_proj", h, h)], f"{p}/attn_residual")
        n2 = rms_norm(x, f"{p}.post_attn_norm")
        gate = linear(n2, f"{p}.mlp.gate_proj", h, f)
        up = linear(n2, f"{p}.mlp.up_proj", h, f)
        silu = node("Mul", [gate, node("Sigmoid", [gate], f"{p}.mlp/gate_sigmoid")],
                    f"{p}.mlp/silu")
        act = node("Mul", [silu, up], f"{p}.mlp/act")
        x = node("Add", [x, linear(act, f"{p}.mlp.down_proj", f, h)], f"{p}/mlp_residual")
    logits = linear(rms_norm(x, "final_norm"), "lm_head", h, v)
    nodes[-1].output[0] = "logits"
    writer.close()
    graph = helper.make_graph(
        nodes, "llm_like",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "seq", v])],
        small + writer.initializers)
    del logits
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="onnxquant-bench")
    model.ir_version = 8
    onnx.save(model, path)  # external data already written; only the structure goes here
    return path


def ensure_model(workdir: Path, spec: dict) -> Path:
    """The cached model for ``spec`` (generated when missing or made for another spec)."""
    folder = workdir / "float"
    meta = folder / "spec.json"
    path = folder / "model.onnx"
    if path.exists() and meta.exists() and json.loads(meta.read_text()) == spec:
        return path
    for old in (meta, path, folder / "model.onnx.data"):
        old.unlink(missing_ok=True)
    t0 = time.perf_counter()
    build_model(folder, spec)
    meta.write_text(json.dumps(spec))
    print(f"generated {path} ({bu.model_bytes(str(path)) / 1e9:.2f} GB) in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    return path


def make_feeds(vocab: int, count: int, seq: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(0, vocab, size=(1, seq), dtype=np.int64)}
            for _ in range(count)]


# =========================================================================== workers
def _limit_memory(job: dict) -> None:
    limit = int(job["mem_limit_gb"] * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def worker_quant(job: dict) -> dict:
    """Quantize job["model"] to job["out"] in mode job["mode"]."""
    _limit_memory(job)
    bu.use_working_tree()
    import onnxquant
    from onnxquant import (
        DynamicQuantConfig,
        QuantFormat,
        StaticQuantConfig,
        WeightOnlyConfig,
    )

    mode = job["mode"]
    if mode == "weight_only":
        return bu.timed_call(onnxquant.quantize_weights, job["model"], job["out"],
                             WeightOnlyConfig(bits=4, block_size=32, algorithm="rtn",
                                              evaluate=False))
    if mode == "dynamic":
        return bu.timed_call(onnxquant.quantize_dynamic, job["model"], job["out"],
                             DynamicQuantConfig(evaluate=False))
    feeds = bu.load_pickle(job["calib"])
    fmt = QuantFormat.QDQ if mode == "static_qdq" else QuantFormat.QOPERATOR
    return bu.timed_call(onnxquant.quantize_static, job["model"], job["out"], feeds,
                         StaticQuantConfig(format=fmt, evaluate=False))


def worker_run(job: dict) -> dict:
    """One onnxruntime session (default optimizations, 2 threads) of job["model"] on the first
    feed of job["feeds"]; its logits are pickled to job["outputs"]."""
    _limit_memory(job)
    import onnxruntime as ort

    feed = bu.load_pickle(job["feeds"])[0]
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 2
    try:
        t0 = time.perf_counter()
        sess = ort.InferenceSession(job["model"], options, providers=["CPUExecutionProvider"])
        t1 = time.perf_counter()
        (logits,) = sess.run(["logits"], feed)
        t2 = time.perf_counter()
    except Exception as exc:  # noqa: BLE001 - any failure is a result row
        return {"ok": False, "error": bu.error_line(exc)}
    bu.dump_pickle(logits, job["outputs"])
    return {"ok": True, "load_s": t1 - t0, "run_s": t2 - t1, **bu.peak_rss_mb()}


# =========================================================================== parent
def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def run_model(path: Path, ctx: dict, kind: str) -> tuple[dict, np.ndarray | None]:
    outputs = ctx["jobdir"] / f"{kind}_logits.pkl"
    job = {"model": str(path), "feeds": ctx["eval"], "outputs": str(outputs),
           "mem_limit_gb": ctx["mem_limit_gb"]}
    res = bu.run_worker("bench_large_model:worker_run", job, ctx["jobdir"], ctx["timeout"],
                        kind=kind, mem_limit_mb=ctx["mem_limit_gb"] * 1024)
    if not res["ok"]:
        return res, None
    logits = bu.load_pickle(outputs)
    outputs.unlink()
    return res, logits


def run_mode(mode: str, ctx: dict) -> dict:
    out = ctx["workdir"] / mode / "model.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    for old in out.parent.iterdir():
        old.unlink()
    job = {"mode": mode, "model": str(ctx["model"]), "out": str(out), "calib": ctx["calib"],
           "mem_limit_gb": ctx["mem_limit_gb"]}
    rec = {"mode": mode, **bu.run_worker("bench_large_model:worker_quant", job, ctx["jobdir"],
                                         ctx["timeout"], kind=f"quant_{mode}",
                                         mem_limit_mb=ctx["mem_limit_gb"] * 1024)}
    if rec["ok"] and not out.exists():
        rec.update(ok=False, error="no output model written")
    if not rec["ok"]:
        return rec
    rec["bytes"] = bu.model_bytes(str(out))
    run, logits = run_model(out, ctx, f"run_{mode}")
    rec["run"] = run
    if logits is not None:
        rec["finite"] = bool(np.isfinite(logits).all())
        rec["cosine"] = cosine(ctx["float_logits"], logits)
        rec["argmax_agree"] = float(np.mean(ctx["float_logits"].argmax(-1) == logits.argmax(-1)))
    if not ctx["keep_outputs"]:
        for old in out.parent.iterdir():
            old.unlink()
    return rec


def table(ctx: dict, records: list[dict]) -> str:
    size_mb = ctx["float_bytes"] / 2**20
    base = ctx["baseline"]
    rows = [["float: one ORT session, one feed", f"{base['load_s'] + base['run_s']:.0f}",
             f"{base['peak_mb']:.0f}", f"{base['peak_mb'] / size_mb:.2f}", "1.00",
             f"{size_mb:.0f}", "1.0000", "–", "–"]]
    for rec in records:
        if not rec["ok"]:
            rows.append([rec["mode"], "–", "–", "–", "–", "–", "–", "–",
                         bu.cell(f"✗ {bu.short_error(rec['error'])}")])
            continue
        run = rec["run"]
        ran = run.get("ok")
        rows.append([
            rec["mode"], f"{rec['seconds']:.0f}", f"{rec['peak_mb']:.0f}",
            f"{rec['peak_mb'] / size_mb:.2f}", f"{rec['peak_mb'] / base['peak_mb']:.2f}",
            f"{rec['bytes'] / 2**20:.0f}",
            f"{rec['cosine']:.4f}" if ran else "–",
            f"{run['peak_mb']:.0f}" if ran else "–",
            ("ok" if rec["finite"] else "✗ non-finite") if ran
            else bu.cell(f"✗ ORT: {bu.short_error(run['error'])}")])
    header = ["mode", "quantize s", "peak RSS MB", "RSS / model size",
              "RSS / float session", "output MB", "cosine vs float", "ORT session peak MB",
              "runs"]
    return bu.markdown(header, rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/oq_large")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--ffn", type=int, default=5632)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64, help="tokens per feed")
    parser.add_argument("--calib-feeds", type=int, default=4)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--mem-limit-gb", type=float, default=20.0)
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--keep-outputs", action="store_true",
                        help="keep the quantized models in WORKDIR/<mode>/")
    parser.add_argument("--json", help="write every number to this file")
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - set(MODES)
    if unknown:
        parser.error(f"unknown modes {sorted(unknown)}; choose from {MODES}")
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    model = ensure_model(workdir, _shape_spec(args))
    jobdir = workdir / "jobs"
    jobdir.mkdir(exist_ok=True)
    ctx = {"workdir": workdir, "jobdir": jobdir, "model": model, "timeout": args.timeout,
           "mem_limit_gb": args.mem_limit_gb, "keep_outputs": args.keep_outputs,
           "float_bytes": bu.model_bytes(str(model)),
           "calib": str(jobdir / "calib.pkl"), "eval": str(jobdir / "eval.pkl")}
    bu.dump_pickle(make_feeds(args.vocab, args.calib_feeds, args.seq, 1), ctx["calib"])
    bu.dump_pickle(make_feeds(args.vocab, 1, args.seq, 2), ctx["eval"])
    print(f"model {model}: {ctx['float_bytes'] / 2**20:.0f} MB", flush=True)
    base, logits = run_model(model, ctx, "run_float")
    if logits is None:
        print(f"the float model does not run: {base['error']}")
        return 1
    ctx["baseline"], ctx["float_logits"] = base, logits
    print(f"float session: {base['peak_mb']:.0f} MB peak, load {base['load_s']:.1f} s, "
          f"run {base['run_s']:.1f} s", flush=True)
    records = []
    for mode in modes:
        rec = run_mode(mode, ctx)
        records.append(rec)
        text = (f"{rec['seconds']:.0f} s, {rec['peak_mb']:.0f} MB peak, "
                f"cosine {rec.get('cosine', float('nan')):.4f}") if rec["ok"] \
            else f"FAILED {rec['error']}"
        print(f"{mode}: {text}", flush=True)
    print(table(ctx, records))
    if args.json:
        data = {"env": bu.environment(), "float_bytes": ctx["float_bytes"],
                "baseline": base, "records": records}
        Path(args.json).write_text(json.dumps(data, indent=1, default=str))
    return 0 if all(r["ok"] and r.get("finite") for r in records) else 1


if __name__ == "__main__":
    raise SystemExit(main())
