"""Dynamic quantization side by side: onnxquant.quantize_dynamic vs onnxruntime.quantization.

    .venv/bin/python benchmarks/bench_dynamic.py                        # all 7 models
    .venv/bin/python benchmarks/bench_dynamic.py --models minilm_l6 --per-channel
    .venv/bin/python benchmarks/bench_dynamic.py --format qdq --tools ours

For each model: whether quantization succeeded (else the error's first line), the output size
against the float model, the fidelity measure of _corpus_eval.py on the 64 eval feeds, and the
inference latency per eval feed (CPU, 1 thread; the fastest of --rounds rounds over all eval
feeds; the models are timed in alternating rounds, so a noisy machine hurts all alike).
Quantization runs in this process.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

import _corpus_eval as ce  # noqa: E402


def quantize_ours(src: str, dst: str, args: argparse.Namespace) -> str:
    from onnxquant.config import QuantFormat
    from onnxquant.dynamic.api import quantize_dynamic
    from onnxquant.dynamic.config import DynamicQuantConfig

    fmt = QuantFormat.QDQ if args.format == "qdq" else QuantFormat.QOPERATOR
    result = quantize_dynamic(src, dst, DynamicQuantConfig(per_channel=args.per_channel,
                                                           format=fmt))
    return "; ".join(result.runtime_notes)


def quantize_ort(src: str, dst: str, args: argparse.Namespace) -> str:
    from onnxruntime.quantization import quantize_dynamic

    quantize_dynamic(src, dst, per_channel=args.per_channel)
    return ""


def latency_ms(paths: dict[str, str], feeds, rounds: int) -> dict[str, float]:
    sessions = {tool: ce.session(path) for tool, path in paths.items()}
    times: dict[str, list[float]] = {tool: [] for tool in paths}
    for feed in feeds[:4]:  # warm up
        for s in sessions.values():
            s.run(None, feed)
    for _ in range(rounds):
        for tool, s in sessions.items():
            start = time.perf_counter()
            for feed in feeds:
                s.run(None, feed)
            times[tool].append((time.perf_counter() - start) * 1000 / len(feeds))
    # The fastest round: on a shared machine, slower rounds measure the neighbours.
    return {tool: min(t) for tool, t in times.items()}


def bench(name: str, args: argparse.Namespace, workdir: Path) -> None:
    src = ce.model_path(name)
    feeds = ce.samples(name, "eval")
    float_outs = ce.float_outputs(name, feeds)
    paths = {"float": src}
    print(f"\n## {name} ({ce.measure_name(name)})")
    for tool in args.tools:
        dst = str(workdir / f"{name}_{tool}.onnx")
        start = time.perf_counter()
        try:
            notes = (quantize_ours if tool == "ours" else quantize_ort)(src, dst, args)
        except Exception as err:  # report and go on with the other tool
            print(f"  {tool:5s} FAILED: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
            if args.verbose:
                traceback.print_exc()
            continue
        seconds = time.perf_counter() - start
        outs = ce.run_model(dst, feeds)
        fid = ce.fidelity(name, float_outs, outs)
        size = sum(os.path.getsize(p) for p in Path(dst).parent.glob(Path(dst).name + "*"))
        print(f"  {tool:5s} fidelity {ce.format_fidelity(name, fid):>8s}  size "
              f"{size / os.path.getsize(src):5.2f}x float  quantize {seconds:5.1f} s")
        if notes and args.verbose:
            print("        notes:", notes)
        paths[tool] = dst
    lat = latency_ms(paths, feeds, args.rounds)
    cells = "  ".join(f"{tool} {ms:7.2f} ms" for tool, ms in lat.items())
    ratio = (f"  ours/ort {lat['ours'] / lat['ort']:.3f}" if "ours" in lat and "ort" in lat
             else "")
    print(f"  latency per feed: {cells}{ratio}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(ce.model_names()))
    parser.add_argument("--tools", default="ours,ort")
    parser.add_argument("--per-channel", action="store_true")
    parser.add_argument("--format", choices=["qoperator", "qdq"], default="qoperator")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--verbose", "-v", action="store_true")
    args = parser.parse_args()
    args.tools = args.tools.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            bench(name, args, Path(tmp))


if __name__ == "__main__":
    main()
