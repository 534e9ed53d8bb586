"""Is the quantized model going to be fast here? Known-slow format/type choices, and a latency
check of the float model against the quantized one.

The baseline's users often get a "quantized" model that is slower than float: S8S8 in QOperator
form on x86-64, 16-bit types (no integer kernels), ConvInteger (no fused kernel), U8U8 on CPUs
whose integer dot-product instructions multiply unsigned by signed bytes. :func:`format_advice`
names these from the CPU's instruction set and the quantized model's operators;
:func:`measure_latency` measures instead of guessing (median of single-threaded runs).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
import platform
import statistics
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

__all__ = ["CpuInfo", "cpu_info", "format_advice", "Latency", "measure_latency", "count_ops",
           "RANDOM_FEED"]

RANDOM_FEED = "on a random feed with symbolic dims = 1"
"""How a latency measured on a made-up feed is labelled."""


@dataclasses.dataclass(frozen=True)
class CpuInfo:
    """What matters about this CPU for 8-bit kernels.

    Attributes:
        arch: ``platform.machine()`` (``x86_64``, ``aarch64``, ...).
        vnni: x86 VNNI (AVX512-VNNI or AVX-VNNI): fast u8×s8 dot products.
        amx: x86 AMX-INT8 tiles.
        avx2: x86 AVX2 (without VNNI, u8×s8 products can saturate: use reduce-range).
        dotprod: ARM SDOT/UDOT.
    """

    arch: str
    vnni: bool = False
    amx: bool = False
    avx2: bool = False
    dotprod: bool = False

    @property
    def x86(self) -> bool:
        return self.arch.lower() in ("x86_64", "amd64", "i686", "x86")

    def describe(self) -> str:
        features = [name for name, on in (("AVX2", self.avx2), ("VNNI", self.vnni),
                                          ("AMX-INT8", self.amx), ("dotprod", self.dotprod)) if on]
        return f"{self.arch}" + (f" ({', '.join(features)})" if features else "")


@functools.cache
def cpu_info() -> CpuInfo:
    """This machine's CPU features (from /proc/cpuinfo where available)."""
    arch = platform.machine() or "unknown"
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags.update(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return CpuInfo(arch=arch, vnni=bool(flags & {"avx512_vnni", "avx_vnni"}),
                   amx="amx_int8" in flags, avx2="avx2" in flags,
                   dotprod=bool(flags & {"asimddp", "dotprod"}))


def count_ops(model_path: str | os.PathLike) -> collections.Counter:
    """Op types of a saved model, subgraphs included (external data is not read)."""
    import onnx

    model = onnx.load(os.fspath(model_path), load_external_data=False)
    counts: collections.Counter = collections.Counter()
    stack = [model.graph]
    while stack:
        graph = stack.pop()
        for node in graph.node:
            counts[node.op_type] += 1
            stack.extend(a.g for a in node.attribute if a.HasField("g"))
            stack.extend(a.graphs for a in node.attribute if a.graphs)
    return counts


_INTEGER_OPS = ("QLinearConv", "QLinearMatMul", "QGemm", "MatMulInteger", "ConvInteger",
                "QAttention", "DynamicQuantizeLSTM", "MatMulNBits")


def format_advice(
    op_counts: Mapping[str, int],
    *,
    activation_bits: int = 8,
    activation_signed: bool = False,
    weight_signed: bool = True,
    qoperator: bool = False,
    reduce_range: bool = False,
    cpu: CpuInfo | None = None,
) -> list[str]:
    """Warnings about choices known to be slow (or lossy) with onnxruntime on this CPU.

    Args:
        op_counts: Op types of the quantized model (see :func:`count_ops`).
        activation_bits: Width of quantized activations (8 or 16).
        activation_signed: int8 activations (S8S8) rather than uint8.
        weight_signed: int8 weights rather than uint8.
        qoperator: The model is in QOperator form (QDQ models are fused by onnxruntime).
        reduce_range: Weights were quantized to 7 bits.
        cpu: The CPU to judge for; this machine's by default.

    Returns:
        One sentence per problem, each saying what to do instead; empty when nothing is known
        to be slow.
    """
    cpu = cpu or cpu_info()
    advice: list[str] = []
    integer_ops = sum(op_counts.get(op, 0) for op in _INTEGER_OPS)
    if activation_bits == 16:
        advice.append("onnxruntime has no 16-bit integer kernels: int16/uint16 tensors run as "
                      "float with extra Q/DQ work, so this model is slower than float; use 8-bit "
                      "activations where accuracy allows")
    if cpu.x86 and activation_signed and activation_bits == 8:
        form = "QOperator" if qoperator else "QDQ"
        advice.append(f"S8S8 (int8 activations) in {form} form is slow on x86-64: onnxruntime's "
                      "fast 8-bit kernels take uint8 activations (measured: S8S8 models 1.5-3.5x "
                      "slower than U8S8 ones on minilm, rapidocr cls/rec); quantize activations "
                      "to uint8 (U8S8) for x86-64 CPUs")
    if cpu.x86 and cpu.vnni and not weight_signed and integer_ops:
        advice.append(f"this CPU ({cpu.describe()}) multiplies uint8 by int8 fast; uint8 "
                      "weights (U8U8) take a slower path: use int8 weights")
    if cpu.x86 and not cpu.vnni and weight_signed and not reduce_range and integer_ops:
        advice.append(f"this CPU ({cpu.describe()}) has no VNNI: u8×s8 products can saturate; "
                      "if accuracy drops, quantize with reduce-range (7-bit weights)")
    if op_counts.get("ConvInteger", 0):
        advice.append("ConvInteger has no fused kernel in onnxruntime's CPU provider (integer "
                      "im2col GEMM plus float rescaling): dynamically quantized convolutions are "
                      "usually slower than float; use static quantization for CNNs")
    return advice


@dataclasses.dataclass(frozen=True)
class Latency:
    """Median single-threaded latencies (ms) of a float and a quantized model on one feed.

    Attributes:
        float_ms: Median latency of the float model.
        quantized_ms: Median latency of the quantized model.
        runs: Timed runs per model.
        feed: Which feed was timed, as a phrase (``"on the first --eval feed"``, ``"on a
            random feed with symbolic dims = 1"``); empty when unknown.
    """

    float_ms: float
    quantized_ms: float
    runs: int
    feed: str = ""

    @property
    def ratio(self) -> float:
        """Quantized over float (< 1 is faster)."""
        return self.quantized_ms / self.float_ms

    @property
    def speedup(self) -> float:
        """Float over quantized: how many times faster the quantized model is (> 1 faster)."""
        return self.float_ms / self.quantized_ms

    def verdict(self) -> str:
        """``"1.49× faster"``, ``"1.20× slower"`` or ``"as fast"`` (within 3 %)."""
        if self.ratio < 0.97:
            return f"{self.speedup:.2f}× faster"
        if self.ratio > 1.03:
            return f"{self.ratio:.2f}× slower"
        return "as fast"

    def describe(self) -> str:
        """One line: both medians, the verdict and the feed they were measured on."""
        where = f", {self.feed}" if self.feed else ""
        return (f"latency (1 thread, median of {self.runs}): float {self.float_ms:.2f} ms, "
                f"quantized {self.quantized_ms:.2f} ms ({self.verdict()}{where})")


def _session(path: str | os.PathLike, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])


_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
                "tensor(double)": np.float64, "tensor(int64)": np.int64,
                "tensor(int32)": np.int32, "tensor(bool)": np.bool_, "tensor(uint8)": np.uint8,
                "tensor(int8)": np.int8}


def random_feed(session, dim_value: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """A feed for ``session`` with symbolic dimensions set to ``dim_value``."""
    rng = np.random.default_rng(seed)
    feed: dict[str, np.ndarray] = {}
    for arg in session.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else dim_value for d in arg.shape]
        dtype = _NUMPY_TYPES.get(arg.type, np.float32)
        if np.issubdtype(dtype, np.floating):
            feed[arg.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feed[arg.name] = np.zeros(shape, dtype=dtype)
    return feed


def _median_ms(session, feed: Mapping[str, np.ndarray], runs: int) -> float:
    session.run(None, dict(feed))  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, dict(feed))
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure_latency(
    float_model: str | os.PathLike,
    quantized_model: str | os.PathLike,
    feed: Mapping[str, np.ndarray] | None = None,
    *,
    runs: int = 30,
    threads: int = 1,
    feed_label: str | None = None,
) -> Latency:
    """Median latency of both models on the same feed (interleaved rounds, to share noise).

    Args:
        float_model: Path of the float model.
        quantized_model: Path of the quantized model.
        feed: Inputs to time on; a random feed (symbolic dims = 1) when None.
        runs: Timed runs per model (after one warm-up run each).
        threads: onnxruntime intra-op threads.
        feed_label: How the summary names ``feed`` (e.g. ``"on the first --eval feed"``);
            a random feed is always named :data:`RANDOM_FEED`.
    """
    float_session = _session(float_model, threads)
    quant_session = _session(quantized_model, threads)
    if feed is None:
        feed, feed_label = random_feed(float_session), RANDOM_FEED
    else:
        feed = dict(feed)
    rounds = 3
    per_round = max(1, runs // rounds)
    float_times, quant_times = [], []
    for _ in range(rounds):
        float_times.append(_median_ms(float_session, feed, per_round))
        quant_times.append(_median_ms(quant_session, feed, per_round))
    return Latency(statistics.median(float_times), statistics.median(quant_times),
                   per_round * rounds, feed_label or "")


def first_feed(feeds: Iterable[Mapping[str, np.ndarray]] | None) -> dict | None:
    """The first feed of an iterable of feeds (None when there is none)."""
    if feeds is None:
        return None
    for feed in feeds:
        return dict(feed)
    return None
