#!/usr/bin/env python
"""Block-wise 4-bit weight-only quantization, onnxquant side by side with onnxruntime's
``matmul_nbits_quantizer``.

Run it in an environment with torch (the baseline's HQQ and GPTQ need it; onnxquant does not):

    python3.11 -m venv /tmp/benchenv && /tmp/benchenv/bin/pip install -e ".[dev]" psutil \
        torch==2.13.0
    /tmp/benchenv/bin/python benchmarks/bench_weight_only.py [--part llm|minilm|both] ...

Part ``llm``: a synthetic LLM-shaped model built here: 8 chained MatMuls with 4096×4096 float32
weights (512 MB, external data), input [1, T, 4096] whose channels have log-normal scales (as LLM
activations do). Block size 32, 4 bits; QOperator (MatMulNBits):

    ort default   MatMulNBitsQuantizer(..., algo_config=DefaultWeightOnlyQuantConfig(32, sym))
    ort rtn       RTNWeightOnlyQuantConfig (numpy, INC), group 32 sym
    ort hqq       HQQWeightOnlyQuantConfig(block_size=32, bits=4) (torch, asymmetric)
    ort gptq      GPTQWeightOnlyQuantConfig(reader) with group 32 sym (torch)
    ours rtn|hqq|gptq   onnxquant.quantize_weights(model, out, WeightOnlyConfig(...))

Each quantize call runs in a fresh worker (wall time, peak RSS = VmHWM). Then an evaluation worker
reads the quantized weights back with this file's own unpacking code (not either tool's) and
reports the weight error against the float weights (mean |W−Ŵ| and relative MSE, over all 8
matrices), and runs float and quantized model on held-out inputs drawn like the calibration
inputs: relative output error ‖y−ŷ‖/‖y‖.

Part ``minilm``: minilm_l6 from the corpus; int4, block 32 and 128, symmetric and asymmetric,
QOperator and QDQ; every algorithm of both tools where it exists; embedding cosine vs float on the
64 eval feeds (see _corpus_eval).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _bench_util as bu  # noqa: E402
import _corpus_eval as ce  # noqa: E402

HIDDEN, LAYERS, TOKENS = 4096, 8, 64
CALIB_SAMPLES, EVAL_SAMPLES = 8, 8
LLM_ALGOS = {"ort": ("default", "rtn", "hqq", "gptq"), "ours": ("rtn", "hqq", "gptq")}


# =========================================================================== synthetic model
def channel_scales(seed: int = 7) -> np.ndarray:
    return np.exp(np.random.default_rng(seed).normal(0.0, 1.0, HIDDEN)).astype(np.float32)


def llm_feeds(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng, scales = np.random.default_rng(seed), channel_scales()
    return [{"x": (rng.standard_normal((1, TOKENS, HIDDEN)).astype(np.float32) * scales)}
            for _ in range(count)]


def build_llm_model(path: Path) -> None:
    """8 chained MatMuls x @ W_i, W_i [4096, 4096] float32 (t-distributed, 1/sqrt(K) scale)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits, nodes, src = [], [], "x"
    for i in range(LAYERS):
        w = (rng.standard_t(5, (HIDDEN, HIDDEN)) / np.sqrt(HIDDEN * 5 / 3)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"W{i}"))
        out = "y" if i == LAYERS - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [src, f"W{i}"], [out], name=f"mm{i}"))
        src = out
    graph = helper.make_graph(
        nodes, "llm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "T", HIDDEN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "T", HIDDEN])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data")


# =========================================================================== worker side
def _link_external_data_into_cwd(model: str) -> None:
    """The baseline's GPTQ builds its calibration session from bytes, and onnxruntime then
    resolves external data against the working directory and refuses paths that resolve
    outside it (and onnx refuses hard links): copy the model's data files there."""
    import shutil

    import onnx

    base = Path(model).parent
    proto = onnx.load(model, load_external_data=False)
    for tensor in onnx.external_data_helper._get_all_tensors(proto):
        for entry in tensor.external_data:
            if entry.key == "location" and not Path(entry.value).exists():
                shutil.copyfile(base / entry.value, entry.value)


def _ort(algo: str, model: str, out: str, feeds, bits: int, block: int, sym: bool,
         fmt: str) -> None:
    from onnxruntime.quantization import matmul_nbits_quantizer as mq
    from onnxruntime.quantization.quant_utils import QuantFormat

    qfmt = QuantFormat.QDQ if fmt == "qdq" else QuantFormat.QOperator
    if algo == "default":
        config = mq.DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=sym,
                                                 quant_format=qfmt, bits=bits)
    elif algo == "rtn":
        config = mq.RTNWeightOnlyQuantConfig()
    elif algo == "hqq":
        config = mq.HQQWeightOnlyQuantConfig(block_size=block, bits=bits)
    elif algo == "gptq":
        config = mq.GPTQWeightOnlyQuantConfig(calibration_data_reader=bu.ort_reader(feeds))
        _link_external_data_into_cwd(model)
    else:
        raise ValueError(algo)
    quant = mq.MatMulNBitsQuantizer(model, bits=bits, block_size=block, is_symmetric=sym,
                                    quant_format=qfmt, algo_config=config)
    quant.process()
    quant.model.save_model_to_file(out, True)


def _ours(algo: str, model: str, out: str, feeds, bits: int, block: int, sym: bool,
          fmt: str) -> None:
    bu.use_working_tree()
    import onnxquant
    from onnxquant.weight_only.config import WeightOnlyConfig

    qfmt = onnxquant.QuantFormat.QDQ if fmt == "qdq" else onnxquant.QuantFormat.QOPERATOR
    config = WeightOnlyConfig(bits=bits, block_size=block, symmetric=sym, algorithm=algo,
                              format=qfmt, external_data=True)
    onnxquant.quantize_weights(model, out, config,
                               calibration_data=feeds if algo == "gptq" else None)


def worker_quant(job: dict) -> dict:
    feeds = bu.load_pickle(job["feeds"]) if job["algo"] == "gptq" else None
    fn = _ours if job["tool"] == "ours" else _ort
    return bu.timed_call(fn, job["algo"], job["model"], job["out"], feeds, job["bits"],
                         job["block"], job["sym"], job["format"])


# --------------------------------------------------------------------------- independent unpacking
def _unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """uint8 bytes -> `count` values of `bits` bits each, low bits first (last axis)."""
    per_byte = 8 // bits
    shifts = (np.arange(per_byte) * bits).astype(np.uint8)
    values = (packed[..., None] >> shifts) & ((1 << bits) - 1)
    return values.reshape(*packed.shape[:-1], -1)[..., :count]


def dequantize_matmulnbits(node, arrays: dict) -> np.ndarray:
    """W [K, N] from a MatMulNBits node's B / scales / zero_points."""
    attrs = {a.name: a.i for a in node.attribute}
    k, n, bits, block = attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"]
    blocks = -(-k // block)
    q = _unpack_bits(arrays[node.input[1]].reshape(n, blocks, -1), bits, block)
    q = q.reshape(n, blocks * block)[:, :k].astype(np.float32)
    scales = arrays[node.input[2]].reshape(n, blocks).astype(np.float32)
    if len(node.input) > 3 and node.input[3]:
        zp = arrays[node.input[3]]
        if zp.dtype == np.uint8:
            zp = _unpack_bits(zp.reshape(n, -1), bits, blocks).astype(np.float32)
        zp = zp.reshape(n, blocks).astype(np.float32)
    else:
        zp = np.full((n, blocks), 1 << (bits - 1), np.float32)
    rows = np.arange(k) // block
    return ((q - zp[:, rows]) * scales[:, rows]).T


def dequantize_dq(node, arrays: dict) -> np.ndarray:
    """W [K, N] from a block-wise DequantizeLinear (axis 0)."""
    attrs = {a.name: a.i for a in node.attribute}
    block = attrs["block_size"]
    q = arrays[node.input[0]].astype(np.float32)
    rows = np.arange(q.shape[0]) // block
    scale = arrays[node.input[1]].astype(np.float32)[rows]
    zp = arrays[node.input[2]].astype(np.float32)[rows] if len(node.input) > 2 else 0.0
    return (q - zp) * scale


def quantized_weights(path: str) -> dict[str, np.ndarray]:
    """{MatMul output name: dequantized W [K, N]} of a weight-only quantized model."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(path)
    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            arrays[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    dq_out = {}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in arrays:
            dq_out[node.output[0]] = dequantize_dq(node, arrays)
    weights = {}
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            weights[node.output[0]] = dequantize_matmulnbits(node, arrays)
        elif node.op_type == "MatMul" and node.input[1] in dq_out:
            weights[node.output[0]] = dq_out[node.input[1]]
    return weights


def worker_llm_eval(job: dict) -> dict:
    import onnx
    from onnx import numpy_helper

    float_model = onnx.load(job["float"])
    originals = {n.output[0]: n.input[1] for n in float_model.graph.node}
    float_w = {t.name: numpy_helper.to_array(t) for t in float_model.graph.initializer}
    del float_model
    qw = quantized_weights(job["model"])
    abs_err = sq_err = sq_ref = 0.0
    count = 0
    for out, w_hat in qw.items():
        w = float_w[originals[out]]
        diff = w - w_hat
        abs_err += float(np.abs(diff).sum())
        sq_err += float((diff.astype(np.float64) ** 2).sum())
        sq_ref += float((w.astype(np.float64) ** 2).sum())
        count += w.size
    feeds = llm_feeds(EVAL_SAMPLES, seed=1234)
    ref = ce.run_model(job["float"], feeds)
    got = ce.run_model(job["model"], feeds)
    num = sum(float(np.sum((r["y"] - g["y"]) ** 2)) for r, g in zip(ref, got, strict=True))
    den = sum(float(np.sum(r["y"] ** 2)) for r in ref)
    return {"ok": True, "matrices": len(qw), "weight_mae": abs_err / max(count, 1),
            "weight_rel_mse": sq_err / sq_ref, "output_rel_err": float(np.sqrt(num / den))}


def worker_minilm(job: dict) -> dict:
    feeds = bu.load_pickle(job["feeds"]) if job["algo"] == "gptq" else None
    fn = _ours if job["tool"] == "ours" else _ort
    return bu.timed_call(fn, job["algo"], job["model"], job["out"], feeds, 4, job["block"],
                         job["sym"], job["format"])


# =========================================================================== parent side
def run_llm(args, workdir: Path) -> list[dict]:
    model = workdir / "llm" / "llm.onnx"
    model.parent.mkdir(parents=True, exist_ok=True)
    build_llm_model(model)
    calib = workdir / "llm" / "calib.pkl"
    bu.dump_pickle(llm_feeds(CALIB_SAMPLES, seed=99), calib)
    results = []
    for tool in args.tools:
        for algo in LLM_ALGOS[tool]:
            if algo not in args.algos:
                continue
            jobdir = workdir / "llm" / f"{tool}-{algo}"
            out = jobdir / "model" / "model.onnx"
            out.parent.mkdir(parents=True, exist_ok=True)
            job = {"tool": tool, "algo": algo, "model": str(model), "out": str(out),
                   "feeds": str(calib), "bits": 4, "block": 32, "sym": algo != "hqq",
                   "format": "qop"}
            rec = {"part": "llm", "tool": tool, "algo": algo,
                   **bu.run_repeated("bench_weight_only:worker_quant", job, jobdir, 1,
                                     args.timeout, kind="quant")}
            if rec["ok"]:
                rec["bytes"] = bu.model_bytes(str(out))
                rec.update(bu.run_worker("bench_weight_only:worker_llm_eval",
                                         {"float": str(model), "model": str(out)}, jobdir,
                                         args.timeout, kind="eval"))
            results.append(rec)
            print(f"llm {tool} {algo}: {_describe(rec)}", flush=True)
            shutil.rmtree(jobdir / "model", ignore_errors=True)
    return results


def _describe(rec: dict) -> str:
    if not rec.get("ok"):
        return f"FAILED {rec.get('error')}"
    text = f"{rec['seconds']:.1f} s, peak {rec['peak_mb']:.0f} MB"
    if "weight_mae" in rec:
        text += (f", weight MAE {rec['weight_mae']:.3e}, rel MSE {rec['weight_rel_mse']:.3e}, "
                 f"output rel err {rec['output_rel_err']:.4f}")
    elif "fidelity" in rec:
        text += f", cosine {rec['fidelity']:.4f}"
    elif "eval_error" in rec:
        text += f", eval: {rec['eval_error']}"
    return text


MINILM_ALGOS = {"ours": ("rtn", "hqq", "gptq"), "ort": ("default", "rtn", "hqq", "gptq")}


def _minilm_applicable(tool: str, algo: str, sym: bool, fmt: str) -> bool:
    if tool == "ort":
        if fmt == "qdq" and algo != "default":
            return False  # the baseline's QDQ output exists only for DEFAULT
        if algo == "hqq" and sym:
            return False  # its HQQ is asymmetric only
    return not (algo == "hqq" and sym)  # HQQ optimises a zero point: asymmetric by nature


def run_minilm(args, workdir: Path) -> list[dict]:
    ctx = bu.prepare_model("minilm_l6", workdir, repeat=1, timeout=args.timeout)
    results = []
    for block in (32, 128):
        for sym in (True, False):
            for fmt in ("qop", "qdq"):
                for tool in args.tools:
                    for algo in MINILM_ALGOS[tool]:
                        if algo not in args.algos or not _minilm_applicable(tool, algo, sym,
                                                                            fmt):
                            continue
                        setting = f"b{block}-{'sym' if sym else 'asym'}-{fmt}"
                        jobdir = workdir / "minilm" / setting / f"{tool}-{algo}"
                        job = {"tool": tool, "algo": algo, "model": ctx["model"],
                               "out": str(jobdir / "model" / "model.onnx"),
                               "feeds": ctx["calib"], "block": block, "sym": sym,
                               "format": fmt}
                        rec = bu.quantize_and_evaluate(
                            ctx, "bench_weight_only:worker_minilm", job, jobdir,
                            part="minilm", model="minilm_l6", setting=setting, tool=tool,
                            algo=algo)
                        results.append(rec)
                        print(f"minilm {setting} {tool} {algo}: {bu.describe(rec)}", flush=True)
                        shutil.rmtree(jobdir / "model", ignore_errors=True)
    return results


# =========================================================================== report
def llm_table(results: list[dict]) -> str:
    header = ["tool", "algorithm", "status", "time s", "peak MB", "file MB", "weight MAE",
              "weight rel. MSE", "output rel. error"]
    rows = []
    for rec in results:
        if rec.get("part") != "llm":
            continue
        ok = rec.get("ok")
        rows.append([rec["tool"], rec["algo"],
                     "ok" if ok else bu.cell("✗ " + bu.short_error(rec.get("error", ""))),
                     bu.fmt(bu.get(rec, "seconds"), ".1f"), bu.fmt(bu.get(rec, "peak_mb"), ".0f"),
                     bu.fmt((rec.get("bytes") or 0) / 1e6 if ok else None, ".1f"),
                     bu.fmt(bu.get(rec, "weight_mae"), ".4e"),
                     bu.fmt(bu.get(rec, "weight_rel_mse"), ".4e"),
                     bu.fmt(bu.get(rec, "output_rel_err"), ".4f")])
    return bu.markdown(header, rows)


def minilm_table(results: list[dict]) -> str:
    header = ["setting", "tool", "algorithm", "status", "cosine vs float", "file MB", "time s"]
    rows = []
    for rec in results:
        if rec.get("part") != "minilm":
            continue
        rows.append([rec["setting"], rec["tool"], rec["algo"], bu.status(rec),
                     bu.fmt(bu.get(rec, "fidelity"), ".4f"),
                     bu.fmt((rec.get("bytes") or 0) / 1e6 if rec.get("ok") else None, ".2f"),
                     bu.fmt(bu.get(rec, "seconds"), ".1f")])
    return bu.markdown(header, rows)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=("llm", "minilm", "both"), default="both")
    p.add_argument("--tools", type=bu.list_arg(["ours", "ort"]), default=["ours", "ort"])
    p.add_argument("--algos", type=bu.list_arg(["default", "rtn", "hqq", "gptq"]),
                   default=["default", "rtn", "hqq", "gptq"])
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--keep", metavar="DIR", help="keep models and logs in DIR")
    p.add_argument("--timeout", type=float, default=3600)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    results: list[dict] = []
    with bu.scratch_dir(args.keep, "onnxquant-bench-wo-") as workdir:
        if args.part in ("llm", "both"):
            results += run_llm(args, workdir)
        if args.part in ("minilm", "both"):
            results += run_minilm(args, workdir)
    print()
    if args.part in ("llm", "both"):
        print(llm_table(results))
        print()
    if args.part in ("minilm", "both"):
        print(minilm_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"benchmark": "weight-only int4", "environment": bu.environment(),
             "results": results}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
