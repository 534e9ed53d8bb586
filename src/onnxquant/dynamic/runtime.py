"""What the installed onnxruntime's CPU provider can execute, probed once per process.

The ONNX specification allows more type combinations than onnxruntime implements: depending on
the version, ConvInteger has accepted only uint8 weights, or refuses per-channel weight zero
points ("Non per-tensor quantization is not supported now"), and MatMulInteger has had similar
gaps. Rather than hard-coding a version table, :func:`probe_runtime` builds one tiny model per
combination, runs it and compares the result with numpy; only combinations that run *and* give
the right numbers count as supported. The dynamic rewrites ask :class:`RuntimeSupport` which form
to emit and record the choice, with the reason, in the run's notes.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxquant.core.qtypes import INT8, UINT8, QuantType

__all__ = ["RuntimeSupport", "probe_runtime", "assume_everything", "WeightForm"]

logger = logging.getLogger(__name__)

SLOW_FACTOR = 1.5
"""A weight type this many times slower than another is avoided when the other one runs."""

_TYPES = {"uint8": (TensorProto.UINT8, np.uint8), "int8": (TensorProto.INT8, np.int8)}


@dataclasses.dataclass(frozen=True)
class WeightForm:
    """How the weights of one op type are emitted.

    Attributes:
        weight_type: Element type of the stored weight (None: keep the node float).
        per_channel: One scale per output channel.
        channel_zero_points: Per-channel zero points (else one scalar zero point, which is
            exact for symmetric weights: every channel's zero point is the same).
        note: Why this differs from what the config asked for ("" when it does not).
    """

    weight_type: QuantType | None
    per_channel: bool
    channel_zero_points: bool
    note: str = ""


@dataclasses.dataclass(frozen=True)
class RuntimeSupport:
    """Operator/type combinations the runtime executes correctly.

    Attributes:
        version: onnxruntime version probed ("any" when nothing was probed).
        matmul_integer: ``(b_type, per_channel_zero_point)`` pairs MatMulInteger accepts with a
            uint8 A (DynamicQuantizeLinear's output type).
        conv_integer: ``(w_type, per_channel_zero_point)`` pairs ConvInteger accepts with uint8 X.
        gather: Element types a Gather + DequantizeLinear runs on.
        local_functions: Model-local functions (the QDQ form's ComputeQuantizationParameters).
        conv_slowdown: ``(w_type, factor)``: how much slower ConvInteger runs with this weight
            type than with the fastest one, and ``("float", factor)`` for a float Conv
            (measured on a 32-channel 3x3 convolution).
    """

    version: str
    matmul_integer: frozenset[tuple[str, bool]]
    conv_integer: frozenset[tuple[str, bool]]
    gather: frozenset[str]
    local_functions: bool
    conv_slowdown: tuple[tuple[str, float], ...] = ()

    def matmul_form(self, qtype: QuantType, per_channel: bool, symmetric: bool) -> WeightForm:
        """The weight form MatMulInteger gets for the requested type and granularity."""
        return _choose("MatMulInteger", self.matmul_integer, self.version, qtype, per_channel,
                       symmetric, {})

    def conv_form(self, qtype: QuantType, per_channel: bool, symmetric: bool) -> WeightForm:
        """The weight form ConvInteger gets for the requested type and granularity."""
        return _choose("ConvInteger", self.conv_integer, self.version, qtype, per_channel,
                       symmetric, dict(self.conv_slowdown))

    def conv_speed_note(self) -> str:
        """A note when the fastest ConvInteger is slower than a float Conv ("" otherwise)."""
        ratios = dict(self.conv_slowdown)
        if "float" not in ratios or ratios["float"] >= 1.0 / 1.2:
            return ""
        return (f"ConvInteger takes {1.0 / ratios['float']:.1f}x the time of a float Conv in "
                f"onnxruntime {self.version} on this CPU (measured on a 32-channel 3x3 "
                "convolution): dynamic quantization makes these Convs smaller, not faster; "
                "static quantization (QDQ or QOperator) runs Conv on faster integer kernels")

    def gather_type(self, qtype: QuantType) -> QuantType | None:
        """The table type a quantized Gather uses (None: keep it float)."""
        if qtype.name in self.gather:
            return qtype
        other = UINT8 if qtype is INT8 else INT8
        return other if other.name in self.gather else None


def _order(op: str, where: str, qtype: QuantType, slowdown: dict[str, float],
           supported: frozenset[tuple[str, bool]]) -> tuple[list[QuantType], str]:
    """Weight types to try, best first, and why the requested one is not first."""
    other = UINT8 if qtype is INT8 else INT8
    factor = slowdown.get(qtype.name, 1.0)
    if factor >= SLOW_FACTOR and slowdown.get(other.name, 1.0) < SLOW_FACTOR \
            and (other.name, False) in supported:
        return [other, qtype], (
            f"{op} with {qtype} weights runs {factor:.1f}x slower than with {other} weights "
            f"in {where} on this CPU; {other} weights are used instead (the same grid, shifted "
            "by 128)")
    return [qtype, other], ""


def _choose(op: str, supported: frozenset[tuple[str, bool]], version: str, qtype: QuantType,
            per_channel: bool, symmetric: bool, slowdown: dict[str, float]) -> WeightForm:
    where = f"onnxruntime {version}"
    types, why = _order(op, where, qtype, slowdown, supported)
    for wtype in types:
        note = why if wtype is not qtype else ""
        if wtype is not qtype and not why:
            note = (f"{op} in {where} does not run {qtype} weights with uint8 activations; "
                    f"{wtype} weights are used instead")
        if per_channel:
            if (wtype.name, True) in supported:
                return WeightForm(wtype, True, True, note)
            if symmetric and (wtype.name, False) in supported:
                # Symmetric weights have one zero point for all channels: per-channel scales
                # with a scalar zero point are exact.
                return WeightForm(wtype, True, False, note)
            if (wtype.name, False) in supported:
                extra = (f"{op} in {where} rejects per-channel weight zero points; asymmetric "
                         "weights are quantized per tensor (use symmetric weights for "
                         "per-channel scales)")
                return WeightForm(wtype, False, False, "; ".join(filter(None, [note, extra])))
        elif (wtype.name, False) in supported:
            return WeightForm(wtype, False, False, note)
    return WeightForm(None, False, False,
                      f"{op} in {where} runs no 8-bit weight type with uint8 activations; "
                      "these nodes stay float")


def assume_everything() -> RuntimeSupport:
    """Support table that allows every combination (``check_runtime=False``)."""
    pairs = frozenset((t, pc) for t in _TYPES for pc in (False, True))
    return RuntimeSupport("any", pairs, pairs, frozenset(_TYPES), True)


def _model(nodes: list, inputs: list, outputs: list, inits: list, opset: int = 13,
           functions: list | None = None, extra_opsets: list | None = None) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "probe", inputs, outputs, initializer=inits)
    opsets = [helper.make_opsetid("", opset), *(extra_opsets or [])]
    return helper.make_model(graph, opset_imports=opsets, ir_version=8,
                             functions=functions or [])


def _runs(model: onnx.ModelProto, feeds: dict, expected: np.ndarray) -> bool:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4
    try:
        session = ort.InferenceSession(model.SerializeToString(), options,
                                       providers=["CPUExecutionProvider"])
        result = session.run(None, feeds)[0]
    except Exception as err:  # any refusal (load or run) means "not supported"
        logger.debug("runtime probe refused: %s", str(err).splitlines()[0] if str(err) else err)
        return False
    return result.shape == expected.shape and np.allclose(result, expected)


def _probe_integer(op: str, wtype: str, per_channel: bool) -> bool:
    rng = np.random.default_rng(0)
    dtype = _TYPES[wtype][1]
    lo, hi = (0, 255) if dtype == np.uint8 else (-128, 127)
    channels = 3
    x_zp = np.uint8(7)
    w_zp = (rng.integers(lo, hi, channels) if per_channel else np.array(rng.integers(lo, hi)))
    w_zp = w_zp.astype(dtype)
    if op == "MatMulInteger":
        x = rng.integers(0, 255, (2, 4)).astype(np.uint8)
        w = rng.integers(lo, hi, (4, channels)).astype(dtype)
        expected = (x.astype(np.int64) - x_zp) @ (w.astype(np.int64) - w_zp.astype(np.int64))
    else:
        x = rng.integers(0, 255, (1, 2, 3, 3)).astype(np.uint8)  # one output pixel
        w = rng.integers(lo, hi, (channels, 2, 3, 3)).astype(dtype)
        wc = w.astype(np.int64) - w_zp.astype(np.int64).reshape(-1, 1, 1, 1)
        xc = x.astype(np.int64) - x_zp
        expected = np.einsum("nchw,kchw->nk", xc, wc)[..., None, None]
    model = _model(
        [helper.make_node(op, ["X", "W", "x_zp", "w_zp"], ["Y"])],
        [helper.make_tensor_value_info("X", TensorProto.UINT8, list(x.shape))],
        [helper.make_tensor_value_info("Y", TensorProto.INT32, None)],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.array(x_zp), "x_zp"),
         numpy_helper.from_array(w_zp, "w_zp")],
    )
    return _runs(model, {"X": x}, expected.astype(np.int32))


def _probe_gather(wtype: str) -> bool:
    dtype = _TYPES[wtype][1]
    table = np.arange(12).reshape(4, 3).astype(dtype)
    indices = np.array([2, 0], np.int64)
    zp = dtype(1)
    expected = ((table[indices].astype(np.float32) - 1) * np.float32(0.5))
    model = _model(
        [helper.make_node("Gather", ["T", "I"], ["G"]),
         helper.make_node("DequantizeLinear", ["G", "s", "zp"], ["Y"])],
        [helper.make_tensor_value_info("I", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(table, "T"),
         numpy_helper.from_array(np.array(0.5, np.float32), "s"),
         numpy_helper.from_array(np.array(zp), "zp")],
    )
    return _runs(model, {"I": indices}, expected)


def _probe_local_function() -> bool:
    body = [helper.make_node("Mul", ["a", "a"], ["b"])]
    function = helper.make_function("onnxquant.probe", "Square", ["a"], ["b"], body,
                                    [helper.make_opsetid("", 13)])
    model = _model(
        [helper.make_node("Square", ["X"], ["Y"], domain="onnxquant.probe")],
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        [], functions=[function], extra_opsets=[helper.make_opsetid("onnxquant.probe", 1)],
    )
    x = np.array([1.5, -2.0], np.float32)
    return _runs(model, {"X": x}, x * x)


def _conv_seconds(wtype: str | None) -> float:
    """Fastest of a few runs of a 32-channel 3x3 ConvInteger (float Conv for None) on 32x32,
    one thread."""
    import time

    import onnxruntime as ort

    rng = np.random.default_rng(0)
    if wtype is None:
        x_type = TensorProto.FLOAT
        w = rng.standard_normal((32, 32, 3, 3)).astype(np.float32)
        node = helper.make_node("Conv", ["X", "W"], ["Y"], pads=[1, 1, 1, 1])
        inits = [numpy_helper.from_array(w, "W")]
        x = rng.standard_normal((1, 32, 32, 32)).astype(np.float32)
    else:
        x_type, dtype = TensorProto.UINT8, _TYPES[wtype][1]
        w = rng.integers(0, 100, (32, 32, 3, 3)).astype(dtype)
        node = helper.make_node("ConvInteger", ["X", "W", "x_zp", "w_zp"], ["Y"],
                                pads=[1, 1, 1, 1])
        inits = [numpy_helper.from_array(w, "W"),
                 numpy_helper.from_array(np.array(3, np.uint8), "x_zp"),
                 numpy_helper.from_array(np.array(0, dtype), "w_zp")]
        x = rng.integers(0, 255, (1, 32, 32, 32)).astype(np.uint8)
    model = _model([node], [helper.make_tensor_value_info("X", x_type, [1, 32, 32, 32])],
                   [helper.make_tensor_value_info(
                       "Y", TensorProto.FLOAT if wtype is None else TensorProto.INT32, None)],
                   inits)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 4
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    feed = {"X": x}
    best = float("inf")
    for _ in range(8):
        start = time.perf_counter()
        session.run(None, feed)
        best = min(best, time.perf_counter() - start)
    return best


def _conv_slowdown(supported: frozenset[tuple[str, bool]]) -> tuple[tuple[str, float], ...]:
    """``(w_type, time / fastest ConvInteger time)``, plus ``("float", float Conv time /
    fastest ConvInteger time)``."""
    types = sorted({t for t, per_channel in supported if not per_channel})
    if not types:
        return ()
    try:
        seconds = {t: _conv_seconds(t) for t in types}
        fastest = min(seconds.values())
        float_ratio = _conv_seconds(None) / fastest
    except Exception as err:  # a timing probe must never stop quantization
        logger.debug("ConvInteger timing probe failed: %s", err)
        return ()
    return (*((t, s / fastest) for t, s in seconds.items()), ("float", float_ratio))


@functools.cache
def probe_runtime() -> RuntimeSupport:
    """Probe the installed onnxruntime (CPU provider) once per process."""
    import onnxruntime as ort

    pairs = [(t, pc) for t in _TYPES for pc in (False, True)]
    conv = frozenset(p for p in pairs if _probe_integer("ConvInteger", *p))
    support = RuntimeSupport(
        version=ort.__version__,
        matmul_integer=frozenset(p for p in pairs if _probe_integer("MatMulInteger", *p)),
        conv_integer=conv,
        gather=frozenset(t for t in _TYPES if _probe_gather(t)),
        local_functions=_probe_local_function(),
        conv_slowdown=_conv_slowdown(conv),
    )
    logger.info("onnxruntime %s runtime support: %s", support.version, support)
    return support
