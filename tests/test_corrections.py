"""Tests of the static-quantization corrections (onnxquant.static.corrections): per-channel
statistics, SmoothQuant, cross-layer equalization and empirical bias correction, each checked
against a numpy reference, for float fidelity (exact rewrites) and for the quantization error
it is meant to reduce."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from onnxquant.core.plan import NodeDecision, QuantPlan, TensorQuant
from onnxquant.static.corrections import (
    bias_correction_tensors,
    channel_statistics,
    correct_biases,
    equalize_layers,
    smooth_quant,
    smoothing_sites,
    smoothing_tensors,
)

F = onnx.TensorProto.FLOAT


# -- helpers ---------------------------------------------------------------------------------
def _model(nodes: list, inputs: dict[str, list], outputs: list[str],
           inits: dict[str, np.ndarray]) -> ir.Model:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(k, F, s) for k, s in inputs.items()],
        [helper.make_tensor_value_info(k, F, None) for k in outputs],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    return ir.from_proto(proto)


def _run(model: ir.Model, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def _init(model: ir.Model, name: str) -> np.ndarray:
    value = model.graph.initializers[name].const_value
    assert value is not None
    return value.numpy().astype(np.float64)


def _sqnr(ref: np.ndarray, approx: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(ref ** 2) / np.sum((ref - approx) ** 2)))


def _fq_uint8(x: np.ndarray) -> np.ndarray:
    """Per-tensor asymmetric uint8 fake quantization over ``[min(x, 0), max(x, 0)]``."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = (hi - lo) / 255
    zp = np.round(-lo / scale)
    return (np.clip(np.round(x / scale) + zp, 0, 255) - zp) * scale


def _fq_int8(w: np.ndarray) -> np.ndarray:
    """Per-tensor symmetric int8 fake quantization."""
    scale = np.abs(w).max() / 127
    return np.clip(np.round(w / scale), -127, 127) * scale


def _layer_norm(z: np.ndarray, gamma: np.ndarray, beta: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    mean, var = z.mean(-1, keepdims=True), z.var(-1, keepdims=True)
    return (z - mean) / np.sqrt(var + 1e-5) * gamma + beta


def _smooth_reference(act_absmax: np.ndarray, w_rows: np.ndarray, alpha: float = 0.5):
    return np.clip(act_absmax ** alpha / w_rows ** (1 - alpha), 1e-4, 1e4)


def _same_outputs(before: ir.Model, after: ir.Model, feeds: list[dict]) -> None:
    for feed in feeds:
        for a, b in zip(_run(before, feed), _run(after, feed), strict=True):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


# -- channel statistics ----------------------------------------------------------------------
def test_channel_statistics_match_numpy() -> None:
    rng = np.random.default_rng(0)
    c = rng.normal(size=4).astype(np.float32)
    model = _model([helper.make_node("Mul", ["x", "c"], ["y"], name="mul"),
                    helper.make_node("Relu", ["y"], ["out"], name="relu")],
                   {"x": ["b", 3, 4]}, ["out"], {"c": c})
    feeds = [{"x": rng.normal(size=(n, 3, 4)).astype(np.float32)} for n in (2, 5, 1)]
    x = np.concatenate([f["x"] for f in feeds]).astype(np.float64)
    y = (x.astype(np.float32) * c).astype(np.float64)
    for wanted in ({"x": 1, "y": -1}, {"x": -1, "y": 1, "missing": 0, "c": 0}):
        stats = channel_statistics(model, wanted, feeds)
        assert set(stats) == {"x", "y"}
        for name, data in (("x", x), ("y", y)):
            axes = tuple(a for a in range(3) if a != wanted[name] % 3)
            np.testing.assert_array_equal(stats[name].low, data.min(axis=axes))
            np.testing.assert_array_equal(stats[name].high, data.max(axis=axes))
            np.testing.assert_allclose(stats[name].mean, data.mean(axis=axes), rtol=1e-12)
            assert stats[name].count == data.size // data.shape[wanted[name]]
    assert channel_statistics(model, {}, feeds) == {}
    assert len(model.graph.outputs) == 1  # the model itself is never changed


# -- SmoothQuant -----------------------------------------------------------------------------
K, N = 16, 12


def _ln_matmul(rng: np.random.Generator) -> tuple[ir.Model, dict[str, np.ndarray]]:
    gamma = 1 + 0.1 * rng.normal(size=K)
    gamma[3] = 50.0  # planted outlier channel
    params = {"gamma": gamma, "beta": 0.1 * rng.normal(size=K),
              "W": 0.1 * rng.normal(size=(K, N))}
    params = {k: v.astype(np.float32) for k, v in params.items()}
    nodes = [helper.make_node("LayerNormalization", ["z", "gamma", "beta"], ["X"], name="ln",
                              axis=-1),
             helper.make_node("MatMul", ["X", "W"], ["out"], name="mm")]
    return _model(nodes, {"z": [4, 8, K]}, ["out"], params), params


def _z_feeds(rng: np.random.Generator, shape: tuple[int, ...], count: int = 4) -> list[dict]:
    return [{"z": rng.normal(size=shape).astype(np.float32)} for _ in range(count)]


def test_smoothquant_layernorm_matches_reference_and_improves_sqnr() -> None:
    rng = np.random.default_rng(1)
    model, p = _ln_matmul(rng)
    feeds = _z_feeds(rng, (4, 8, K))
    assert smoothing_tensors(model) == {"X": -1}
    stats = channel_statistics(model, smoothing_tensors(model), feeds)
    work = model.clone()
    assert smooth_quant(work, stats, alpha=0.5) == ["X"]
    _same_outputs(model, work, feeds)

    x = np.concatenate([_layer_norm(f["z"], p["gamma"], p["beta"]) for f in feeds])
    act = np.abs(x).reshape(-1, K).max(axis=0)
    s = _smooth_reference(act, np.abs(p["W"]).max(axis=1))
    assert s[3] > 3 * np.median(s)  # the outlier channel moves most
    np.testing.assert_allclose(_init(work, "gamma"), p["gamma"] / s, rtol=1e-5)
    np.testing.assert_allclose(_init(work, "beta"), p["beta"] / s, rtol=1e-5)
    np.testing.assert_allclose(_init(work, "W"), p["W"] * s[:, None], rtol=1e-5)

    w = p["W"].astype(np.float64)
    y = x @ w
    before = _sqnr(y, _fq_uint8(x) @ _fq_int8(w))
    x_s = np.concatenate([_layer_norm(f["z"], _init(work, "gamma"), _init(work, "beta"))
                          for f in feeds])
    after = _sqnr(y, _fq_uint8(x_s) @ _fq_int8(_init(work, "W")))
    assert after >= before + 6.0, (before, after)


def test_smoothquant_decomposed_layernorm() -> None:
    rng = np.random.default_rng(2)
    gamma = 1 + 0.1 * rng.normal(size=K)
    gamma[3] = 50.0
    p = {"gamma": gamma, "beta": 0.1 * rng.normal(size=(1, K)), "W": rng.normal(size=(K, N))}
    nodes = [helper.make_node("Mul", ["z", "gamma"], ["Y"], name="mul"),
             helper.make_node("Add", ["beta", "Y"], ["X"], name="add"),
             helper.make_node("MatMul", ["X", "W"], ["out"], name="mm")]
    model = _model(nodes, {"z": [6, K]}, ["out"], p)
    feeds = _z_feeds(rng, (6, K))
    stats = channel_statistics(model, smoothing_tensors(model), feeds)
    work = model.clone()
    assert smooth_quant(work, stats) == ["X", "Y"]
    _same_outputs(model, work, feeds)
    x = np.concatenate([f["z"] * p["gamma"].astype(np.float32) + p["beta"].astype(np.float32)
                        for f in feeds]).astype(np.float64)
    s = _smooth_reference(np.abs(x).max(axis=0), np.abs(p["W"].astype(np.float32)).max(axis=1))
    np.testing.assert_allclose(_init(work, "gamma"), p["gamma"] / s, rtol=1e-5)
    np.testing.assert_allclose(_init(work, "beta"), p["beta"] / s, rtol=1e-5)
    np.testing.assert_allclose(_init(work, "W"), p["W"] * s[:, None], rtol=1e-5)


def test_smoothquant_gemm_transb_consumer_and_matmul_producer() -> None:
    rng = np.random.default_rng(3)
    w1 = rng.normal(size=(8, K))
    w1[:, 5] *= 40.0  # planted outlier column: channel 5 of X
    p = {"W1": w1, "b1": rng.normal(size=K), "B": rng.normal(size=(N, K)),
         "C": rng.normal(size=N)}
    nodes = [helper.make_node("MatMul", ["z", "W1"], ["h"], name="mm1"),
             helper.make_node("Add", ["h", "b1"], ["X"], name="add"),
             helper.make_node("Gemm", ["X", "B", "C"], ["out"], name="gemm", transB=1)]
    model = _model(nodes, {"z": [5, 8]}, ["out"], p)
    feeds = _z_feeds(rng, (5, 8))
    sites = smoothing_sites(model)
    assert [(s.activation, s.kind, s.channels) for s in sites] == [("X", "linear", K)]
    stats = channel_statistics(model, smoothing_tensors(model), feeds)
    work = model.clone()
    assert smooth_quant(work, stats, alpha=0.7) == ["X", "h"]
    _same_outputs(model, work, feeds)
    b = p["B"].astype(np.float32)
    s = _smooth_reference(stats["X"].absmax, np.abs(b).max(axis=0), alpha=0.7)
    np.testing.assert_allclose(_init(work, "B"), p["B"] * s[None, :], rtol=1e-5)
    np.testing.assert_allclose(_init(work, "W1"), p["W1"] / s[None, :], rtol=1e-5)
    np.testing.assert_allclose(_init(work, "b1"), p["b1"] / s, rtol=1e-5)
    np.testing.assert_array_equal(_init(work, "C"), p["C"].astype(np.float32))  # output side


def test_smoothquant_skips_activation_read_by_other_ops() -> None:
    rng = np.random.default_rng(4)
    model, p = _ln_matmul(rng)
    relu = ir.node("Relu", [model.graph.node("mm").inputs[0]], name="relu")
    relu.outputs[0].name = "side"
    model.graph.append(relu)
    model.graph.outputs.append(relu.outputs[0])
    assert smoothing_sites(model) == []
    stats = channel_statistics(model, {"X": -1}, _z_feeds(rng, (4, 8, K)))
    assert smooth_quant(model, stats) == []
    np.testing.assert_array_equal(_init(model, "W"), p["W"])
    np.testing.assert_array_equal(_init(model, "gamma"), p["gamma"])
    with pytest.raises(ValueError, match="alpha"):
        smooth_quant(model, stats, alpha=1.5)


# -- cross-layer equalization ----------------------------------------------------------------
def _cnn(rng: np.random.Generator, middle: str = "Relu", depthwise: bool = False
         ) -> tuple[ir.Model, dict[str, np.ndarray]]:
    """Conv(3->8) -> middle -> Conv; the first conv's output channels span 100x in range and
    the second conv's input channels compensate (the float function is balanced)."""
    spread = np.logspace(-1, 1, 8)
    w2_shape = (8, 1, 3, 3) if depthwise else (4, 8, 3, 3)
    w2 = rng.normal(size=w2_shape)
    w2 = w2 / (spread[:, None, None, None] if depthwise else spread[None, :, None, None])
    p = {"W1": rng.normal(size=(8, 3, 3, 3)) * spread[:, None, None, None],
         "b1": rng.normal(size=8) * spread, "W2": w2, "b2": rng.normal(size=w2_shape[0])}
    p = {k: v.astype(np.float32) for k, v in p.items()}
    if middle == "Clip":
        p.update(lo=np.array(0.0, np.float32), hi=np.array(6.0, np.float32))
    mid_inputs = ["h", "lo", "hi"] if middle == "Clip" else ["h"]
    second = {"group": 8} if depthwise else {}
    nodes = [helper.make_node("Conv", ["x", "W1", "b1"], ["h"], name="conv1", pads=[1] * 4),
             helper.make_node(middle, mid_inputs, ["r"], name="act"),
             helper.make_node("Conv", ["r", "W2", "b2"], ["y"], name="conv2", **second)]
    return _model(nodes, {"x": [2, 3, 10, 10]}, ["y"], p), p


def _cle_reference(w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, in_axis: int,
                   iterations: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    for _ in range(iterations):
        r1 = np.abs(w1).reshape(w1.shape[0], -1).max(axis=1)
        r2 = np.abs(np.moveaxis(w2, in_axis, 0)).reshape(w2.shape[in_axis], -1).max(axis=1)
        s = np.sqrt(r1.astype(np.float64) / r2)
        shape = [1] * w2.ndim
        shape[in_axis] = -1
        w1 = (w1 / s[:, None, None, None]).astype(np.float32)
        b1 = (b1 / s).astype(np.float32)
        w2 = (w2 * s.reshape(shape)).astype(np.float32)
    return w1, b1, w2


def _weights_sqnr(*weights: np.ndarray) -> float:
    signal = sum(float(np.sum(w ** 2)) for w in weights)
    return float(10 * np.log10(signal / sum(float(np.sum((w - _fq_int8(w)) ** 2))
                                             for w in weights)))


@pytest.mark.parametrize("depthwise", [False, True])
def test_equalization_matches_reference(depthwise: bool) -> None:
    rng = np.random.default_rng(5)
    model, p = _cnn(rng, depthwise=depthwise)
    work = model.clone()
    assert equalize_layers(work) == ["h", "r"]
    feeds = [{"x": rng.normal(size=(2, 3, 10, 10)).astype(np.float32)} for _ in range(2)]
    _same_outputs(model, work, feeds)
    w1, b1, w2 = _cle_reference(p["W1"], p["b1"], p["W2"], 0 if depthwise else 1)
    np.testing.assert_allclose(_init(work, "W1"), w1, rtol=1e-5)
    np.testing.assert_allclose(_init(work, "b1"), b1, rtol=1e-5)
    np.testing.assert_allclose(_init(work, "W2"), w2, rtol=1e-5)
    np.testing.assert_array_equal(_init(work, "b2"), p["b2"])
    r1 = np.abs(_init(work, "W1")).reshape(8, -1).max(axis=1)
    assert r1.max() / r1.min() < 10  # the 100x spread is gone
    before = _weights_sqnr(p["W1"].astype(np.float64), p["W2"].astype(np.float64))
    after = _weights_sqnr(_init(work, "W1"), _init(work, "W2"))
    assert after >= before + 3.0, (before, after)


def test_equalization_skips_clip_and_shared_weights() -> None:
    rng = np.random.default_rng(6)
    model, p = _cnn(rng, middle="Clip")
    assert equalize_layers(model) == []
    np.testing.assert_array_equal(_init(model, "W1"), p["W1"])
    model, p = _cnn(rng)
    extra = ir.node("Conv", [model.graph.inputs[0], model.graph.initializers["W1"]],
                    name="other")
    extra.outputs[0].name = "other_out"
    model.graph.append(extra)
    model.graph.outputs.append(extra.outputs[0])
    assert equalize_layers(model) == []
    np.testing.assert_array_equal(_init(model, "W2"), p["W2"])


def test_equalization_matmul_chain() -> None:
    rng = np.random.default_rng(7)
    spread = np.logspace(-1, 1, 6)
    p = {"W1": rng.normal(size=(5, 6)) * spread, "b1": rng.normal(size=6),
         "W2": rng.normal(size=(6, 4)) / spread[:, None]}
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["m"], name="mm1"),
             helper.make_node("Add", ["m", "b1"], ["h"], name="add"),
             helper.make_node("LeakyRelu", ["h"], ["r"], name="act", alpha=0.1),
             helper.make_node("MatMul", ["r", "W2"], ["y"], name="mm2")]
    model = _model(nodes, {"x": [3, 5]}, ["y"], p)
    work = model.clone()
    assert equalize_layers(work, iterations=1) == ["m", "h", "r"]
    _same_outputs(model, work, [{"x": rng.normal(size=(3, 5)).astype(np.float32)}])
    w1, w2 = p["W1"].astype(np.float32), p["W2"].astype(np.float32)
    s = np.sqrt(np.abs(w1).max(axis=0) / np.abs(w2).max(axis=1))
    np.testing.assert_allclose(_init(work, "W1"), w1 / s, rtol=1e-6)
    np.testing.assert_allclose(_init(work, "b1"), p["b1"].astype(np.float32) / s, rtol=1e-6)
    np.testing.assert_allclose(_init(work, "W2"), w2 * s[:, None], rtol=1e-6)


# -- bias correction -------------------------------------------------------------------------
def _coarse_plan(node: str, op_type: str, weight: np.ndarray) -> QuantPlan:
    """A plan quantizing ``node`` with a per-tensor int8 weight on a coarse grid (15 levels)."""
    scale = float(np.float32(np.abs(weight).max() / 7))
    tq = TensorQuant(name="W", role="weight", qtype="int8", scale=[scale], zero_point=[0],
                     source="constant")
    decision = NodeDecision(name=node, op_type=op_type, action="quantize",
                            inputs={0: "x", 1: "W"})
    return QuantPlan(tensors={"W": tq}, nodes={node: decision})


def _grid(weight: np.ndarray, plan: QuantPlan) -> np.ndarray:
    """Numpy reference of the plan's int8 grid: ``clip(rint(W / s)) * s`` in float32."""
    scale = np.float32(plan.tensors["W"].scale[0])
    q = np.clip(np.rint(weight.astype(np.float32) / scale), -128, 127)
    return (q * scale).astype(np.float32)


def _x_feeds(rng: np.random.Generator, shape: tuple[int, ...], count: int) -> list[dict]:
    means = 5.0 + np.arange(shape[1 if len(shape) == 4 else -1]) * 0.5
    means = means[None, :, None, None] if len(shape) == 4 else means
    return [{"x": (means + 0.1 * rng.normal(size=shape)).astype(np.float32)}
            for _ in range(count)]


def _mean_error(model: ir.Model, float_model: ir.Model, feeds: list[dict], axis: int) -> float:
    """Largest per-channel (``axis``) mean of (model - float model) outputs over ``feeds``."""
    diffs = [np.moveaxis(_run(model, f)[0] - _run(float_model, f)[0], axis, 0) for f in feeds]
    flat = np.concatenate([d.reshape(d.shape[0], -1) for d in diffs], axis=1)
    return float(np.abs(flat.mean(axis=1)).max())


def _with_weight(model: ir.Model, weight: np.ndarray) -> ir.Model:
    copy = model.clone()
    copy.graph.initializers["W"].const_value = ir.tensor(weight, name="W")
    return copy


@pytest.mark.parametrize("with_bias", [True, False])
def test_bias_correction_conv(with_bias: bool) -> None:
    rng = np.random.default_rng(8)
    p = {"W": 0.5 * rng.normal(size=(6, 3, 3, 3))}
    inputs = ["x", "W"]
    if with_bias:
        p["b"] = rng.normal(size=6)
        inputs.append("b")
    model = _model([helper.make_node("Conv", inputs, ["y"], name="conv")],
                   {"x": [4, 3, 8, 8]}, ["y"], p)
    w = p["W"].astype(np.float32)
    plan = _coarse_plan("conv", "Conv", w)
    assert bias_correction_tensors(model, plan) == {"x": 1}
    feeds = _x_feeds(rng, (4, 3, 8, 8), 3)
    stats = channel_statistics(model, bias_correction_tensors(model, plan), feeds)
    work = model.clone()
    name = "b" if with_bias else "conv.corrected_bias"
    assert correct_biases(work, plan, stats) == [name]
    assert work.graph.node("conv").inputs[2].name == name

    x = np.concatenate([f["x"] for f in feeds]).astype(np.float64)
    delta = _grid(w, plan).astype(np.float64) - w
    b = p["b"].astype(np.float32).astype(np.float64) if with_bias else np.zeros(6)
    expected = b - delta.sum(axis=(2, 3)) @ x.mean(axis=(0, 2, 3))
    np.testing.assert_allclose(_init(work, name), expected, rtol=1e-5, atol=1e-6)

    test_feeds = _x_feeds(rng, (4, 3, 8, 8), 2)
    quantized = _with_weight(model, _grid(w, plan))
    corrected = _with_weight(work, _grid(w, plan))
    before = _mean_error(quantized, model, test_feeds, axis=1)
    after = _mean_error(corrected, model, test_feeds, axis=1)
    assert after * 10 < before, (before, after)


def test_bias_correction_matmul_and_skips() -> None:
    rng = np.random.default_rng(9)
    p = {"W": 0.5 * rng.normal(size=(16, 8)), "b": rng.normal(size=8)}
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"], name="mm"),
             helper.make_node("Add", ["m", "b"], ["y"], name="add")]
    model = _model(nodes, {"x": [64, 16]}, ["y"], p)
    w = p["W"].astype(np.float32)
    plan = _coarse_plan("mm", "MatMul", w)
    assert bias_correction_tensors(model, plan) == {"x": -1}
    feeds = _x_feeds(rng, (64, 16), 2)
    stats = channel_statistics(model, {"x": -1}, feeds)
    work = model.clone()
    assert correct_biases(work, plan, stats) == ["b"]
    x = np.concatenate([f["x"] for f in feeds]).astype(np.float64)
    delta = _grid(w, plan).astype(np.float64) - w
    expected = p["b"].astype(np.float32) - x.mean(axis=0) @ delta
    np.testing.assert_allclose(_init(work, "b"), expected, rtol=1e-5, atol=1e-6)
    test_feeds = _x_feeds(rng, (64, 16), 2)
    before = _mean_error(_with_weight(model, _grid(w, plan)), model, test_feeds, axis=-1)
    after = _mean_error(_with_weight(work, _grid(w, plan)), model, test_feeds, axis=-1)
    assert after * 10 < before, (before, after)

    plan.nodes["mm"].action = "float"  # float nodes are not corrected
    assert bias_correction_tensors(model, plan) == {}
    assert correct_biases(model, plan, stats) == []
    plan.nodes["mm"].action = "quantize"
    plan.tensors["W"].role = "activation"
    assert bias_correction_tensors(model, plan) == {}
