#!/usr/bin/env python
"""float16 and float8 models, quantized by onnxquant and run in onnxruntime (CPU).

For each corpus model (default rapidocr_cls_v2, minilm_l6):

    fp16-u8s8   the float model converted to float16 (onnxruntime.transformers.float16,
                float32 inputs/outputs kept), then static QDQ U8S8 MinMax on 32 calibration
                feeds: float16 activations and weights get float16 scales.
    fp8-e4m3    the float32 model, static QDQ float8 E4M3FN on activations and weights with
                the Distribution calibration (onnxruntime's rule: scale = std / std(float8
                grid)), through onnxquant.ort.quantize_static.

Fidelity is against the float32 model on the 64 eval feeds (_corpus_eval.fidelity); the
float16 model's own fidelity is printed as the baseline of the fp16 row.

    QCORPUS_DIR=/tmp/qcorpus python benchmarks/bench_float_types.py [--models a,b] [--keep DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _corpus_eval as ce  # noqa: E402

import onnxquant  # noqa: E402
from onnxquant.ort import CalibrationMethod, QuantFormat, QuantType  # noqa: E402
from onnxquant.ort import quantize_static as ort_quantize_static  # noqa: E402


def to_float16(src: str, dst: Path) -> None:
    """float16 copy of a float32 model, float32 graph inputs and outputs kept."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(src), keep_io_types=True)
    onnx.save(model, dst)


def _fidelity(name: str, path: Path, feeds, float_outs) -> float:
    return ce.fidelity(name, float_outs, ce.run_model(str(path), feeds))


def bench(name: str, work: Path) -> list[tuple[str, str, float]]:
    calib, evals = ce.samples(name, "calib"), ce.samples(name, "eval")
    float_outs = ce.float_outputs(name, evals)
    rows = []
    half = work / f"{name}.fp16.onnx"
    to_float16(ce.model_path(name), half)
    rows.append(("fp16 float", "-", _fidelity(name, half, evals, float_outs)))

    out = work / f"{name}.fp16_u8s8.onnx"
    start = time.perf_counter()
    onnxquant.quantize_static(half, out, calib, onnxquant.StaticQuantConfig(evaluate=False))
    rows.append(("fp16-u8s8", f"{time.perf_counter() - start:.1f}s",
                 _fidelity(name, out, evals, float_outs)))

    out = work / f"{name}.fp8.onnx"
    start = time.perf_counter()
    ort_quantize_static(ce.model_path(name), str(out), iter(calib),
                        quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QFLOAT8E4M3FN,
                        weight_type=QuantType.QFLOAT8E4M3FN,
                        calibrate_method=CalibrationMethod.Distribution)
    rows.append(("fp8-e4m3", f"{time.perf_counter() - start:.1f}s",
                 _fidelity(name, out, evals, float_outs)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="rapidocr_cls_v2,minilm_l6")
    parser.add_argument("--keep", help="folder to keep the models in")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        print(f"{'model':<18} {'variant':<12} {'time':>7}  fidelity ({'measure'})")
        for name in args.models.split(","):
            for variant, seconds, value in bench(name, work):
                print(f"{name:<18} {variant:<12} {seconds:>7}  "
                      f"{ce.format_fidelity(name, value)} ({ce.measure_name(name)})")


if __name__ == "__main__":
    main()
