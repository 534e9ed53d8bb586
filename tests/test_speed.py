"""Tests of the speed advice (known-slow choices per CPU) and the latency measurement."""

from __future__ import annotations

from pathlib import Path

import model_zoo as zoo
import onnx

from onnxquant.core.speed import CpuInfo, Latency, count_ops, format_advice, measure_latency

VNNI = CpuInfo(arch="x86_64", vnni=True, avx2=True)
AVX2 = CpuInfo(arch="x86_64", avx2=True)
ARM = CpuInfo(arch="aarch64", dotprod=True)
QOP = {"QLinearConv": 3, "QuantizeLinear": 1}


def _mentions(advice: list[str], word: str) -> bool:
    return any(word in text for text in advice)


def test_u8s8_qoperator_on_vnni_needs_no_warning() -> None:
    assert format_advice(QOP, qoperator=True, cpu=VNNI) == []


def test_s8s8_is_slow_on_x86_only() -> None:
    for qoperator in (True, False):
        advice = format_advice(QOP, qoperator=qoperator, activation_signed=True, cpu=VNNI)
        assert len(advice) == 1 and "S8S8" in advice[0] and "U8S8" in advice[0]
        assert ("QOperator" in advice[0]) == qoperator
        assert format_advice(QOP, qoperator=qoperator, activation_signed=True, cpu=ARM) == []


def test_u8u8_on_vnni_and_saturation_without_vnni() -> None:
    assert _mentions(format_advice(QOP, weight_signed=False, cpu=VNNI), "int8 weights")
    no_vnni = format_advice(QOP, cpu=AVX2)
    assert _mentions(no_vnni, "reduce-range")
    assert format_advice(QOP, reduce_range=True, cpu=AVX2) == []


def test_int16_and_convinteger_warnings() -> None:
    assert _mentions(format_advice({"QuantizeLinear": 2}, activation_bits=16, cpu=VNNI),
                     "16-bit")
    assert _mentions(format_advice({"ConvInteger": 1}, cpu=VNNI), "static quantization")
    # Nothing integer in the model: no type advice at all.
    assert format_advice({"Conv": 2}, weight_signed=False, cpu=AVX2) == []


def test_count_ops_includes_subgraphs(tmp_path: Path) -> None:
    path = tmp_path / "if.onnx"
    onnx.save(zoo.if_subgraph_model(), path)
    counts = count_ops(path)
    model = onnx.load(path)
    top = sum(1 for _ in model.graph.node)
    assert counts["If"] >= 1 and sum(counts.values()) > top


def test_measure_latency_same_model_is_close(tmp_path: Path) -> None:
    path = tmp_path / "cnn.onnx"
    onnx.save(zoo.cnn(batch=1), path)
    latency = measure_latency(path, path, runs=9)
    assert latency.runs == 9 and latency.float_ms > 0 and latency.quantized_ms > 0
    assert 0.3 < latency.ratio < 3.0
    assert "median of 9" in latency.describe()


def test_latency_verdict() -> None:
    assert "faster" in Latency(10.0, 5.0, 30).describe()
    assert "slower" in Latency(10.0, 12.0, 30).describe()
    assert "as fast" in Latency(10.0, 10.1, 30).describe()
