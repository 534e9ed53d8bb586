#!/usr/bin/env python
"""Speed and error of the weight-only numerics (RTN, HQQ, GPTQ) on one synthetic weight.

    .venv/bin/python benchmarks/bench_weight_algorithms.py    # 4096 x 4096, block 32, 4 bits
    .venv/bin/python benchmarks/bench_weight_algorithms.py --size 1024 --repeat 5 --bits 2

The weight is Gaussian (std 0.02, like a transformer projection). GPTQ's calibration inputs are
correlated (a low-rank part, noise and a few 4x outlier channels, like real activations); its
output error ‖X W - X Ŵ‖ / ‖X W‖ is measured on held-out rows of X. Times are medians over
--repeat runs of the numerics alone (no packing, no model I/O).

For comparison it also evaluates, for error only, two baseline-like variants written here from
onnxruntime.quantization's documented behaviour (reference/ort_quantization.md §5.5):

* ``hqq-baseline``: its HQQ solver (rounded initial zero point, zero-only proximal steps,
  whole-tensor early stop, last zero point kept). The baseline itself needs torch and took 131 s
  for eight 4096 x 4096 weights at block 32 (16 s per weight).
* ``gptq+rtn-requant``: our GPTQ output re-quantized with the baseline's RTN (min/max of each
  group without forcing 0 into the range, round half to even), as the baseline does to build
  MatMulNBits.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from onnxquant.weight_only.gptq import HessianAccumulator, quantize_gptq  # noqa: E402
from onnxquant.weight_only.hqq import quantize_hqq  # noqa: E402
from onnxquant.weight_only.rtn import quantize_rtn  # noqa: E402


def timed(fn, repeat):
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def hqq_baseline(w, bits, bs, iters=20):
    k, n = w.shape
    maxq = 2**bits - 1
    x = w.reshape(k // bs, bs, n)
    lo, hi = x.min(1, keepdims=True), x.max(1, keepdims=True)
    s = np.minimum(maxq / np.where(hi - lo == 0, maxq, hi - lo), 2e4).astype(np.float32)
    z = np.round(-lo * s)
    beta, best = 10.0, 1e4
    for _ in range(iters):
        wq = np.clip(np.round(x * s + z), 0, maxq)
        wr = (wq - z) / s
        d = x - wr
        we = np.sign(d) * np.maximum(np.abs(d) - np.power(np.abs(d) + 1e-8, -0.3) / beta, 0)
        z = np.mean(wq - (x - we) * s, axis=1, keepdims=True).astype(np.float32)
        beta *= 1.01
        err = float(np.abs(x - wr).mean())
        if err < best:
            best = err
        else:
            break
    wq = np.clip(np.round(x * s + z), 0, maxq)
    return ((wq - z) / s).reshape(k, n).astype(np.float32)


def inc_rtn_requant(w, bits, bs):
    k, n = w.shape
    maxq = 2**bits - 1
    x = w.reshape(k // bs, bs, n)
    lo, hi = x.min(1, keepdims=True), x.max(1, keepdims=True)
    scale = (hi - lo) / maxq
    scale[scale == 0] = 1
    zp = np.clip(np.round(-lo / scale), 0, maxq)
    q = np.clip(np.round(x / scale + zp), 0, maxq)
    return ((q - zp) * scale).reshape(k, n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--samples", type=int, default=4096, help="calibration rows for GPTQ")
    args = ap.parse_args()
    k = n = args.size
    bits, bs = args.bits, args.block
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((k, n)) * 0.02).astype(np.float32)
    m = args.samples + 1024
    x = rng.standard_normal((m, k // 8)).astype(np.float32) @ (
        rng.standard_normal((k // 8, k)).astype(np.float32) / np.sqrt(k / 8)
    )
    x += 0.3 * rng.standard_normal((m, k)).astype(np.float32)
    x[:, rng.random(k) < 0.02] *= 4
    x_cal, x_eval = x[: args.samples], x[args.samples :]
    y = x_eval @ w

    def report(name, seconds, d):
        e = d - w
        out = np.linalg.norm(x_eval @ d - y) / np.linalg.norm(y)
        sec = f"{seconds:8.3f}" if seconds is not None else "       -"
        print(
            f"{name:24s} {sec} s   mean|W-Ŵ| {np.abs(e).mean():.4e}   "
            f"mse {np.square(e).mean():.4e}   out-err {out:.4f}"
        )

    print(f"W {k}x{n} float32, block {bs}, {bits} bits, median of {args.repeat}")
    for sym in (False, True):
        bq, t = timed(lambda sym=sym: quantize_rtn(w, bits, bs, sym), args.repeat)
        report("rtn-" + ("sym" if sym else "asym"), t, bq.dequantize())
    for izp in (False, True):
        bq, t = timed(
            lambda izp=izp: quantize_hqq(w, bits, bs, integer_zero_point=izp), args.repeat
        )
        report("hqq" + ("-int-zp" if izp else ""), t, bq.dequantize())
    report("hqq-baseline (port)", None, hqq_baseline(w, bits, bs))

    acc = HessianAccumulator(k)
    _, t_h = timed(lambda: acc.update(x_cal), 1)
    h = acc.hessian()
    print(f"{'hessian (' + str(args.samples) + ' rows)':24s} {t_h:8.3f} s")
    for act_order in (False, True):
        bq, t = timed(
            lambda a=act_order: quantize_gptq(w, h, bits, bs, False, act_order=a), args.repeat
        )
        report("gptq-asym" + ("-act-order" if act_order else ""), t, bq.dequantize())
        if not act_order:
            report("gptq+rtn-requant", None, inc_rtn_requant(bq.dequantize(), bits, bs))


if __name__ == "__main__":
    main()
