"""Micro-benchmarks behind :mod:`onnxquant.core.costs`: one small model per kernel and shape,
timed with onnxruntime on one intra-op thread.

Each model is what onnxruntime runs for one node in one form:

- ``float``: the float Conv / MatMul (its NCHWc reorders included);
- ``integer``: QLinearConv / QLinearMatMul reading and writing uint8 (int8 weights, int32
  bias), which is also what onnxruntime fuses a QDQ ``DQ → Conv → Q`` into (its NHWC
  transposes included);
- ``dynamic``: DynamicQuantizeLinear + ConvInteger / MatMulInteger + Cast + Mul (+ bias), the
  form dynamic quantization writes (onnxruntime fuses the MatMul one);
- ``quantize`` / ``dequantize``: QuantizeLinear / DequantizeLinear of N elements, the cost of
  entering or leaving an integer region.

Times are medians of short rounds within a time budget, in milliseconds, minus the cost of
running an empty (Identity) model, so per-call session overhead does not count.
"""

from __future__ import annotations

import functools
import statistics
import time
from typing import Any

import numpy as np

__all__ = ["time_model", "conv_model", "matmul_model", "transition_model", "overhead_ms"]

_F, _U8, _I8, _I32 = 1, 2, 3, 6  # onnx.TensorProto element types


def _rng() -> np.random.Generator:
    return np.random.default_rng(0)


def _model(nodes: list, inputs: list, outputs: list, inits: dict[str, Any]) -> Any:
    from onnx import helper, numpy_helper

    graph = helper.make_graph(
        nodes, "cost", inputs, outputs,
        initializer=[numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=8)


def _vi(name: str, elem: int, shape: list[int]) -> Any:
    from onnx import helper

    return helper.make_tensor_value_info(name, elem, shape)


def _scalars(prefix: str, scale: float, zero: Any) -> dict[str, Any]:
    return {f"{prefix}_s": np.float32(scale), f"{prefix}_z": zero}


def conv_model(form: str, x_shape: list[int], w_shape: list[int],
               attrs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """A one-Conv model in ``form`` and its feed.

    ``"<form>@float"`` puts the Conv between two float depthwise 1x1 Convs, so the time
    includes what the form does to its float neighbours (a ConvInteger breaks onnxruntime's
    NCHWc chain: its neighbours reorder their input and output).
    """
    from onnx import helper

    base, _, context = form.partition("@")
    if context:
        if context != "float":
            raise ValueError(f"unknown context {context!r}")
        inner, inner_feed = conv_model(base, x_shape, w_shape, attrs)
        graph = inner.graph
        ones = [1] * (len(w_shape) - 2)
        pre = helper.make_node("Conv", ["x0", "w_pre"], ["x"], group=x_shape[1])
        post = helper.make_node("Conv", ["y", "w_post"], ["y0"], group=w_shape[0])
        extra = {"w_pre": np.full([x_shape[1], 1, *ones], 1.01, np.float32),
                 "w_post": np.full([w_shape[0], 1, *ones], 0.99, np.float32)}
        from onnx import numpy_helper

        return (_model([pre, *graph.node, post], [_vi("x0", _F, x_shape)],
                       [_vi("y0", _F, [])],
                       {**{i.name: numpy_helper.to_array(i) for i in graph.initializer},
                        **extra}), {"x0": inner_feed["x"]})

    rng = _rng()
    out_ch = w_shape[0]
    w = rng.standard_normal(w_shape).astype(np.float32) * 0.1
    x = rng.standard_normal(x_shape).astype(np.float32)
    bias = rng.standard_normal(out_ch).astype(np.float32)
    if form == "float":
        node = helper.make_node("Conv", ["x", "w", "b"], ["y"], **attrs)
        return (_model([node], [_vi("x", _F, x_shape)], [_vi("y", _F, [])],
                       {"w": w, "b": bias}), {"x": x})
    if form == "integer":
        inits: dict[str, Any] = {
            "w": (w * 100).astype(np.int8), "b": (bias * 100).astype(np.int32),
            **_scalars("x", 0.02, np.uint8(128)), **_scalars("w", 0.001, np.int8(0)),
            **_scalars("y", 0.05, np.uint8(128))}
        node = helper.make_node("QLinearConv", ["x", "x_s", "x_z", "w", "w_s", "w_z", "y_s",
                                                "y_z", "b"], ["y"], **attrs)
        feed = rng.integers(0, 255, size=x_shape, dtype=np.uint8)
        return _model([node], [_vi("x", _U8, x_shape)], [_vi("y", _U8, [])], inits), {"x": feed}
    if form == "dynamic":
        channel = [out_ch] + [1] * (len(w_shape) - 2)
        inits = {"w": (w * 100).astype(np.int8), "w_z": np.int8(0),
                 "w_s": np.float32(0.001), "b": bias.reshape(channel)}
        nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
                 helper.make_node("ConvInteger", ["xq", "w", "xz", "w_z"], ["acc"], **attrs),
                 helper.make_node("Cast", ["acc"], ["accf"], to=_F),
                 helper.make_node("Mul", ["xs", "w_s"], ["s"]),
                 helper.make_node("Mul", ["accf", "s"], ["ys"]),
                 helper.make_node("Add", ["ys", "b"], ["y"])]
        return _model(nodes, [_vi("x", _F, x_shape)], [_vi("y", _F, [])], inits), {"x": x}
    raise ValueError(f"unknown form {form!r}")


def matmul_model(form: str, m: int, k: int, n: int) -> tuple[Any, dict[str, Any]]:
    """A one-MatMul model ``[m, k] @ [k, n]`` in ``form`` and its feed."""
    from onnx import helper

    rng = _rng()
    w = rng.standard_normal((k, n)).astype(np.float32) * 0.1
    x = rng.standard_normal((m, k)).astype(np.float32)
    if form == "float":
        node = helper.make_node("MatMul", ["x", "w"], ["y"])
        return _model([node], [_vi("x", _F, [m, k])], [_vi("y", _F, [])], {"w": w}), {"x": x}
    if form == "integer":
        inits = {"w": (w * 100).astype(np.int8), **_scalars("x", 0.02, np.uint8(128)),
                 **_scalars("w", 0.001, np.int8(0)), **_scalars("y", 0.05, np.uint8(128))}
        node = helper.make_node("QLinearMatMul", ["x", "x_s", "x_z", "w", "w_s", "w_z", "y_s",
                                                  "y_z"], ["y"])
        feed = rng.integers(0, 255, size=(m, k), dtype=np.uint8)
        return _model([node], [_vi("x", _U8, [m, k])], [_vi("y", _U8, [])], inits), {"x": feed}
    if form == "dynamic":
        inits = {"w": (w * 100).astype(np.int8), "w_z": np.int8(0),
                 "w_s": np.float32(0.001)}
        nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
                 helper.make_node("MatMulInteger", ["xq", "w", "xz", "w_z"], ["acc"]),
                 helper.make_node("Cast", ["acc"], ["accf"], to=_F),
                 helper.make_node("Mul", ["xs", "w_s"], ["s"]),
                 helper.make_node("Mul", ["accf", "s"], ["y"])]
        return _model(nodes, [_vi("x", _F, [m, k])], [_vi("y", _F, [])], inits), {"x": x}
    raise ValueError(f"unknown form {form!r}")


def transition_model(direction: str, elements: int) -> tuple[Any, dict[str, Any]]:
    """QuantizeLinear (``"quantize"``) or DequantizeLinear (``"dequantize"``) of ``elements``
    values, and its feed."""
    from onnx import helper

    rng = _rng()
    inits = _scalars("x", 0.02, np.uint8(128))
    if direction == "quantize":
        node = helper.make_node("QuantizeLinear", ["x", "x_s", "x_z"], ["y"])
        feed = rng.standard_normal(elements).astype(np.float32)
        return (_model([node], [_vi("x", _F, [elements])], [_vi("y", _U8, [])], inits),
                {"x": feed})
    if direction == "dequantize":
        node = helper.make_node("DequantizeLinear", ["x", "x_s", "x_z"], ["y"])
        ints = rng.integers(0, 255, size=elements, dtype=np.uint8)
        return (_model([node], [_vi("x", _U8, [elements])], [_vi("y", _F, [])], inits),
                {"x": ints})
    raise ValueError(f"unknown direction {direction!r}")


def _session(model: Any) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def _raw_ms(model: Any, feed: dict[str, np.ndarray], budget_s: float) -> float:
    import onnxruntime as ort

    session = _session(model)
    quiet = ort.RunOptions()
    quiet.log_severity_level = 4  # a kernel that fails raises; no log line for it
    session.run(None, feed, quiet)  # warm-up (first-run allocations, packing)
    rounds: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(rounds) < 5 or (time.perf_counter() < deadline and len(rounds) < 400):
        start = time.perf_counter()
        session.run(None, feed)
        rounds.append((time.perf_counter() - start) * 1e3)
    return statistics.median(rounds)


@functools.cache
def overhead_ms() -> float:
    """Median time of running an Identity model: onnxruntime's per-call overhead."""
    from onnx import helper

    node = helper.make_node("Identity", ["x"], ["y"])
    model = _model([node], [_vi("x", _F, [1])], [_vi("y", _F, [1])], {})
    return _raw_ms(model, {"x": np.zeros(1, np.float32)}, 0.02)


def time_model(model: Any, feed: dict[str, np.ndarray], budget_s: float = 0.03) -> float:
    """Median single-threaded time of ``model`` on ``feed`` in ms, without onnxruntime's
    per-call overhead (never below 1 µs)."""
    return max(_raw_ms(model, feed, budget_s) - overhead_ms(), 1e-3)
