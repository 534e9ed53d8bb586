"""Never worse than float at the edges: a quantized model gives no NaN/Inf where the float model
has none on the calibration data.

* A ``Clip(min=1e-10) -> Log`` (the mel-spectrogram front end of an audio model) keeps its Clip
  (a grid that holds 0 does not reproduce ``min > 0``), and no grid reaches Log's input: the
  Relu/Clip between it and the MatMul stay float and the MatMul's output gets no Q/DQ.
* Singular-domain inputs (Div divisors, Reciprocal, Sqrt, Pow with a negative exponent) get no
  QuantizeLinear/DequantizeLinear in front of them, nor through a ``+ eps`` or a Reshape.
* Weights with values like 1e30 or 3.4e38 stay float — or per channel where that fixes them — in
  static, dynamic and weight-only quantization, and the decision says why.
* What the rules miss, the finiteness check after emission catches and falls back from.
"""

from __future__ import annotations

import math
from pathlib import Path

import model_zoo as zoo
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper
from static_helpers import check_weight, const, dequantizer, stored_initializer

from onnxquant import StaticQuantConfig, quantize_dynamic, quantize_static, quantize_weights
from onnxquant.core import weight_grid
from onnxquant.core.qtypes import INT8, QuantFormat
from onnxquant.dynamic.config import DynamicQuantConfig
from onnxquant.static import rules
from onnxquant.weight_only.config import WeightOnlyConfig

FORMATS = [QuantFormat.QDQ, QuantFormat.QOPERATOR]
SINGULAR = {"Log": (0,), "Reciprocal": (0,), "Sqrt": (0,), "Pow": (0,), "Div": (1,)}


def _model(nodes: list, inputs: list, outputs: list, inits: dict[str, np.ndarray],
           opset: int = 17) -> onnx.ModelProto:
    """A float32 model; ``inputs`` and ``outputs`` are ``(name, shape)`` pairs."""
    graph = helper.make_graph(
        nodes, "edges",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              ir_version=zoo.IR_VERSION)
    onnx.checker.check_model(model, full_check=True)
    return model


def _feeds(n: int, shape: tuple[int, ...], seed: int, name: str = "x") -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{name: rng.standard_normal(shape).astype(np.float32)} for _ in range(n)]


def _outputs(model: onnx.ModelProto | Path, feeds: list[dict]) -> list[np.ndarray]:
    return [out[0] for out in zoo.run(model if isinstance(model, onnx.ModelProto)
                                      else str(model), feeds)]


def _readers_of_singular_inputs(path: Path) -> list[str]:
    """Op types producing the singular-domain inputs of the quantized model."""
    model = onnx.load(path)
    producers = {out: node.op_type for node in model.graph.node for out in node.output}
    found = []
    for node in model.graph.node:
        for index in SINGULAR.get(node.op_type, ()):
            found.append(producers.get(node.input[index], "graph input or initializer"))
    return found


# -- Clip(min=1e-10) -> Log ----------------------------------------------------------------
def _clip_log_model() -> onnx.ModelProto:
    """MatMul -> Relu -> Clip(min=1e-10) -> Log, the front end of a log-mel spectrogram."""
    rng = np.random.default_rng(0)
    return _model(
        [helper.make_node("MatMul", ["x", "w"], ["mm"], name="mm"),
         helper.make_node("Relu", ["mm"], ["power"], name="relu"),
         helper.make_node("Clip", ["power", "floor"], ["clipped"], name="clip"),
         helper.make_node("Log", ["clipped"], ["log_mel"], name="log")],
        [("x", [8, 16])], [("log_mel", [8, 32])],
        {"w": (rng.standard_normal((16, 32)) * 0.25).astype(np.float32),
         "floor": np.array(1e-10, np.float32)})


CLIP_LOG_MIN_DB = 15.0  # measured: 17.9 dB (QDQ), 19.6 dB (QOperator) at worst


@pytest.mark.parametrize("fmt", FORMATS)
def test_clip_before_log_is_kept_and_output_is_finite(tmp_path: Path, fmt: QuantFormat) -> None:
    model = _clip_log_model()
    calib = _feeds(8, (8, 16), seed=1)
    fresh = _feeds(4, (8, 16), seed=2)
    floats = _outputs(model, calib + fresh)
    assert all(np.isfinite(f).all() for f in floats)
    assert sum(int((f < -20).sum()) for f in floats) > 100  # Relu gave exact zeros
    out = tmp_path / "q.onnx"
    # The planner alone must get it right: the finiteness check is off here.
    result = quantize_static(model, out, calib,
                             StaticQuantConfig(format=fmt, verify_finite=False))
    decisions = result.plan.nodes
    assert decisions["mm"].action == "quantize"
    assert "Log 'log'" in decisions["mm"].reason  # its output reaches Log: no grid on it
    for name in ("relu", "clip"):  # they would hand the grid on: float, not removed
        assert decisions[name].action == "float"
        assert "singular-domain input" in decisions[name].reason
    assert "DequantizeLinear" not in _readers_of_singular_inputs(out)
    onnx_model = onnx.load(out)
    assert [n.op_type for n in onnx_model.graph.node][-3:] == ["Relu", "Clip", "Log"]
    quantized = _outputs(out, calib + fresh)
    for f, q in zip(floats, quantized, strict=True):
        assert np.isfinite(q).all()
        assert zoo.sqnr_db(f, q) > CLIP_LOG_MIN_DB


def test_grid_reproduces_a_clip_only_inside_its_bounds(tmp_path: Path) -> None:
    """A Clip(0, 6) after a MatMul is removed (its grid starts at exactly 0); Clip(1e-10, 6)
    is not: the grid holds 0, which is below 1e-10."""
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((16, 32)) * 0.25).astype(np.float32)
    for low, removed in ((0.0, True), (1e-10, False)):
        model = _model(
            [helper.make_node("MatMul", ["x", "w"], ["mm"], name="mm"),
             helper.make_node("Clip", ["mm", "low", "high"], ["c"], name="clip"),
             helper.make_node("MatMul", ["c", "w2"], ["y"], name="mm2")],
            [("x", [8, 16])], [("y", [8, 16])],
            {"w": w, "low": np.array(low, np.float32), "high": np.array(6.0, np.float32),
             "w2": w.T.copy()})
        result = quantize_static(model, tmp_path / "q.onnx", _feeds(4, (8, 16), seed=4))
        assert (result.plan.nodes["clip"].action == "remove") is removed


# -- singular-domain inputs ------------------------------------------------------------------
def _normalize_model() -> onnx.ModelProto:
    """v / sqrt(v*v + eps), v * reciprocal(sqrt(...)) and v * (v*v + eps)^-0.5: finite in float
    for every v (eps = 1e-3 bounds the reciprocals by 32), but inf where a grid rounds a small
    v*v + eps to 0."""
    rng = np.random.default_rng(5)
    return _model(
        [helper.make_node("MatMul", ["x", "w"], ["v"], name="mm"),
         helper.make_node("Mul", ["v", "v"], ["sq"], name="square"),
         helper.make_node("Add", ["sq", "eps"], ["energy"], name="add_eps"),
         helper.make_node("Sqrt", ["energy"], ["norm"], name="sqrt"),
         helper.make_node("Div", ["v", "norm"], ["y_div"], name="div"),
         helper.make_node("Reciprocal", ["norm"], ["inv"], name="reciprocal"),
         helper.make_node("Mul", ["v", "inv"], ["y_recip"], name="mul_recip"),
         helper.make_node("Pow", ["energy", "minus_half"], ["rsqrt"], name="pow"),
         helper.make_node("Mul", ["v", "rsqrt"], ["y_pow"], name="mul_pow")],
        [("x", [8, 16])], [("y_div", [8, 32]), ("y_recip", [8, 32]), ("y_pow", [8, 32])],
        {"w": (rng.standard_normal((16, 32)) * 0.25).astype(np.float32),
         "eps": np.array(1e-3, np.float32), "minus_half": np.array(-0.5, np.float32)})


def _normalize_feeds(n: int, seed: int) -> list[dict]:
    """Standard-normal rows: about 1 in 8 values of v*v lies below half a step of its grid."""
    return _feeds(n, (8, 16), seed)


NORMALIZE_MIN_DB = 20.0  # measured: 23.0 dB at worst (both formats)


@pytest.mark.parametrize("fmt", FORMATS)
def test_singular_domain_inputs_stay_float(tmp_path: Path, fmt: QuantFormat) -> None:
    model = _normalize_model()
    calib, fresh = _normalize_feeds(8, seed=6), _normalize_feeds(4, seed=7)
    out = tmp_path / "q.onnx"
    result = quantize_static(model, out, calib,
                             StaticQuantConfig(format=fmt, verify_finite=False))
    decisions = result.plan.nodes
    assert decisions["mm"].action == "quantize"
    assert "DequantizeLinear" not in _readers_of_singular_inputs(out)
    assert decisions["add_eps"].action == "float"  # v*v + eps would hand on v*v's grid
    assert "Sqrt 'sqrt'" in decisions["add_eps"].reason
    assert "Sqrt 'sqrt'" in decisions["square"].reason  # its output gets no grid
    floats = zoo.run(model, calib + fresh)
    quantized = zoo.run(str(out), calib + fresh)
    for f_outs, q_outs in zip(floats, quantized, strict=True):
        for f, q in zip(f_outs, q_outs, strict=True):
            assert np.isfinite(f).all() and np.isfinite(q).all()
            assert zoo.sqnr_db(f, q) > NORMALIZE_MIN_DB


def test_without_the_singular_rule_the_same_model_is_not_finite(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rule is what keeps the model above finite: without it the divisor rounds to 0."""
    monkeypatch.setattr(rules, "SINGULAR_INPUTS", {})
    model, calib = _normalize_model(), _normalize_feeds(8, seed=6)
    quantize_static(model, tmp_path / "q.onnx", calib, StaticQuantConfig(verify_finite=False))
    quantized = zoo.run(str(tmp_path / "q.onnx"), calib)
    assert any(not np.isfinite(q).all() for outs in quantized for q in outs)


def test_no_grid_reaches_a_log_through_reshape_and_offset(tmp_path: Path) -> None:
    """Log(Reshape(Relu(MatMul(x)) + 1e-6)): the Reshape would hand the grid of the Add's
    output (0 included) to Log, and the Add that of the MatMul's output; both stay float."""
    rng = np.random.default_rng(20)
    model = _model(
        [helper.make_node("MatMul", ["x", "w"], ["mm"], name="mm"),
         helper.make_node("Relu", ["mm"], ["r"], name="relu"),
         helper.make_node("Add", ["r", "eps"], ["a"], name="add"),
         helper.make_node("Reshape", ["a", "shape"], ["flat"], name="reshape"),
         helper.make_node("Log", ["flat"], ["y"], name="log")],
        [("x", [4, 16])], [("y", [128])],
        {"w": (rng.standard_normal((16, 32)) * 0.25).astype(np.float32),
         "eps": np.array(1e-6, np.float32), "shape": np.array([128], np.int64)})
    calib = _feeds(8, (4, 16), seed=21)
    out = tmp_path / "q.onnx"
    result = quantize_static(model, out, calib, StaticQuantConfig(verify_finite=False))
    for name in ("relu", "add", "reshape"):
        assert result.plan.nodes[name].action == "float"
        assert "Log 'log'" in result.plan.nodes[name].reason
    assert result.plan.nodes["mm"].action == "quantize"
    assert "DequantizeLinear" not in _readers_of_singular_inputs(out)
    for f, q in zip(_outputs(model, calib), _outputs(out, calib), strict=True):
        assert np.isfinite(q).all()
        assert zoo.sqnr_db(f, q) > RESHAPE_LOG_MIN_DB


RESHAPE_LOG_MIN_DB = 15.0  # measured: 19.0 dB at worst


# -- the finiteness check after emission ---------------------------------------------------
def _offset_log_model() -> onnx.ModelProto:
    """Log(Relu(MatMul(x)) + e) with a second input e: tiny (1e-6) but for one large value, so
    its grid rounds the tiny values to 0 — nothing the rules can see."""
    rng = np.random.default_rng(8)
    return _model(
        [helper.make_node("MatMul", ["x", "w"], ["mm"], name="mm"),
         helper.make_node("Relu", ["mm"], ["r"], name="relu"),
         helper.make_node("Add", ["r", "e"], ["a"], name="add"),
         helper.make_node("Log", ["a"], ["y"], name="log")],
        [("x", [4, 16]), ("e", [4, 32])], [("y", [4, 32])],
        {"w": (rng.standard_normal((16, 32)) * 0.25).astype(np.float32)})


class _OneShotReader:
    """An ORT-style reader that can be read once."""

    def __init__(self, feeds: list[dict]) -> None:
        self.feeds = iter(feeds)

    def get_next(self) -> dict | None:
        return next(self.feeds, None)


def _offset_feeds(n: int, seed: int) -> list[dict]:
    feeds = _feeds(n, (4, 16), seed)
    for feed in feeds:
        e = np.full((4, 32), 1e-6, np.float32)
        e[0, 0] = 10.0
        feed["e"] = e
    return feeds


FALLBACK_MIN_DB = 15.0  # measured: 18.9 dB at worst (42-51 dB on most feeds)


def test_finiteness_check_falls_back_where_the_rules_do_not_reach(tmp_path: Path) -> None:
    model, calib = _offset_log_model(), _offset_feeds(8, seed=9)
    unchecked = tmp_path / "unchecked.onnx"
    quantize_static(model, unchecked, calib, StaticQuantConfig(verify_finite=False))
    assert any(not np.isfinite(q).all() for q in _outputs(unchecked, calib))

    checked = tmp_path / "checked.onnx"
    result = quantize_static(model, checked, _OneShotReader(calib), StaticQuantConfig())
    add = result.plan.nodes["add"]
    assert add.action == "float"
    assert "finiteness check" in add.reason and "'y'" in add.reason
    assert result.plan.nodes["mm"].action == "quantize"  # only what it takes stays float
    for f, q in zip(_outputs(model, calib), _outputs(checked, calib), strict=True):
        assert np.isfinite(q).all()
        assert zoo.sqnr_db(f, q) > FALLBACK_MIN_DB


# -- extreme weights -------------------------------------------------------------------------
def _extreme_weight() -> np.ndarray:
    rng = np.random.default_rng(10)
    w = (rng.standard_normal((32, 8)) * 0.25).astype(np.float32)
    w[3, 2] = 1e30
    w[5, 6] = 3.4e38
    return w


def _matmul_model(w: np.ndarray) -> onnx.ModelProto:
    return _model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                  [("x", [4, w.shape[0]])], [("y", [4, w.shape[1]])], {"w": w})


def _extreme_feeds(n: int, seed: int) -> list[dict]:
    """Inputs that never reach the huge weights (rows 3 and 5): the float output is finite."""
    feeds = _feeds(n, (4, 32), seed)
    for feed in feeds:
        feed["x"][:, [3, 5]] = 0.0
    return feeds


def _check_close(model: onnx.ModelProto, out: Path, feeds: list[dict], min_db: float) -> None:
    for f, q in zip(_outputs(model, feeds), _outputs(out, feeds), strict=True):
        assert np.isfinite(f).all() and np.isfinite(q).all()
        assert zoo.sqnr_db(f, q) >= min_db


def _says_range(reason: str) -> None:
    assert "weight 'w' range" in reason and "3.4e+38" in reason, reason
    assert "meaningless" in reason and "kept float" in reason, reason


@pytest.mark.parametrize("fmt", FORMATS)
def test_extreme_weight_stays_float_static(tmp_path: Path, fmt: QuantFormat) -> None:
    model, feeds = _matmul_model(_extreme_weight()), _extreme_feeds(8, seed=11)
    out = tmp_path / "q.onnx"
    result = quantize_static(model, out, feeds, StaticQuantConfig(format=fmt))
    decision = result.plan.nodes["mm"]
    assert decision.action == "float"
    _says_range(decision.reason)
    assert "w" not in result.plan.tensors
    _check_close(model, out, _extreme_feeds(4, seed=12), min_db=100.0)


@pytest.mark.parametrize("fmt", FORMATS)
def test_extreme_weight_stays_float_dynamic(tmp_path: Path, fmt: QuantFormat) -> None:
    model = _matmul_model(_extreme_weight())
    out = tmp_path / "q.onnx"
    result = quantize_dynamic(model, out, DynamicQuantConfig(format=fmt))
    (decision,) = result.decisions
    assert decision.action == "float"
    _says_range(decision.reason)
    _check_close(model, out, _extreme_feeds(4, seed=12), min_db=100.0)


@pytest.mark.parametrize("fmt", FORMATS)
def test_extreme_weight_stays_float_weight_only(tmp_path: Path, fmt: QuantFormat) -> None:
    model = _matmul_model(_extreme_weight())
    out = tmp_path / "q.onnx"
    result = quantize_weights(model, out, WeightOnlyConfig(format=fmt, block_size=16))
    (decision,) = result.decisions
    assert decision.action == "float"
    _says_range(decision.reason)
    _check_close(model, out, _extreme_feeds(4, seed=12), min_db=100.0)


def test_weight_only_single_huge_value_in_a_large_weight(tmp_path: Path) -> None:
    """1e30 in one block of a 256 x 64 weight: the SQNR of the whole weight looks fine (one
    block of 1024 is lost), but the value is extreme — the block keeps nothing else."""
    rng = np.random.default_rng(13)
    w = (rng.standard_normal((256, 64)) * 0.05).astype(np.float32)
    w[7, 9] = 1e30
    result = quantize_weights(_matmul_model(w), tmp_path / "q.onnx",
                              WeightOnlyConfig(block_size=32))
    (decision,) = result.decisions
    assert decision.action == "float"
    assert "1e+30" in decision.reason and "largest magnitude" in decision.reason


def test_weight_only_keeps_ordinary_large_weights(tmp_path: Path) -> None:
    """A "super weight" 200x the others (LLMs have them) is not extreme: quantized."""
    rng = np.random.default_rng(14)
    w = (rng.standard_normal((256, 64)) * 0.05).astype(np.float32)
    w[7, 9] = 10.0
    result = quantize_weights(_matmul_model(w), tmp_path / "q.onnx",
                              WeightOnlyConfig(block_size=32))
    assert result.decisions[0].action == "weights"


def _wide_channel_weight() -> np.ndarray:
    """A [16, 128] weight whose column 5 is 1e6 times larger: per tensor every other column
    rounds to 0, per channel each column has its own grid."""
    rng = np.random.default_rng(15)
    w = (rng.standard_normal((16, 128)) * 0.25).astype(np.float32)
    w[:, 5] *= 1e6
    return w


def test_per_channel_rescues_a_weight_static(tmp_path: Path) -> None:
    w = _wide_channel_weight()
    model = _model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                   [("x", [4, 16])], [("y", [4, 128])], {"w": w})
    out = tmp_path / "q.onnx"
    result = quantize_static(model, out, _feeds(8, (4, 16), seed=16),
                             StaticQuantConfig(per_channel_fallback_db=None))
    params = result.plan.tensors["w"]
    assert params.axis == 1 and "meaningless" in params.source and "per channel" in params.source
    assert "per-tensor int8 grid meaningless" in result.plan.nodes["mm"].reason
    # The stored weight reproduces every column (the output activation's own per-tensor grid
    # is another matter: column 5 dominates it whatever the weight's grid).
    mm = next(n for n in ir.load(out).graph if n.name == "mm")
    scale, zero_point = check_weight(mm, 1, ir.DataType.INT8, w, axis=1)
    restored = (const(stored_initializer(dequantizer(mm.inputs[1]))).astype(np.float64)
                - zero_point) * scale
    assert weight_grid.grid_quality(w, restored, axis=1).worst_channel_db > 35.0


def test_per_channel_rescues_a_weight_dynamic(tmp_path: Path) -> None:
    w = _wide_channel_weight()
    model = _model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                   [("x", [4, 16])], [("y", [4, 128])], {"w": w})
    out = tmp_path / "q.onnx"
    result = quantize_dynamic(model, out, DynamicQuantConfig(
        format=QuantFormat.QDQ, per_channel_fallback_db=None))
    (decision,) = result.decisions
    assert decision.action == "quantized"
    assert "per-channel" in decision.reason and "meaningless" in decision.reason
    feeds = _feeds(4, (4, 16), seed=17)
    others = np.delete(np.arange(128), 5)
    for f, q in zip(_outputs(model, feeds), _outputs(out, feeds), strict=True):
        assert zoo.sqnr_db(f[:, others], q[:, others]) > 30.0


# -- the measure -----------------------------------------------------------------------------
def _restored(w: np.ndarray, axis: int | None = None) -> np.ndarray:
    from onnxquant.core import numerics

    return numerics.quantize_weight(w, INT8, axis=axis).dequantize()


def test_grid_quality_ignores_what_the_outliers_hide() -> None:
    rng = np.random.default_rng(18)
    w = rng.standard_normal((64, 32)).astype(np.float32)
    normal = weight_grid.grid_quality(w, _restored(w))
    assert 35.0 < normal.sqnr_db < 45.0  # 8-bit grid of a Gaussian
    w[0, 0] = 1e30
    plain = 10 * math.log10(np.sum(w.astype(np.float64) ** 2)
                            / np.sum((w.astype(np.float64) - _restored(w)) ** 2))
    assert plain > 100.0  # the whole-tensor SQNR hides the loss
    stretched = weight_grid.grid_quality(w, _restored(w))
    assert stretched.sqnr_db < 0.5 and not stretched.passes(weight_grid.MIN_GRID_SQNR_DB)


def test_grid_quality_in_float64_and_overflow() -> None:
    w = np.array([[-3.4e38, 3.4e38], [1.0, -1.0]], np.float32)
    with np.errstate(all="raise"):
        quality = weight_grid.grid_quality(w, w)  # exact: no overflow in the sums
    assert quality.sqnr_db == math.inf and quality.finite
    broken = weight_grid.grid_quality(w, np.array([[-np.inf, 3.4e38], [1.0, -1.0]], np.float32))
    assert not broken.finite and not broken.passes(0.0)
    assert "Inf/NaN" in broken.text()


def test_grid_quality_per_channel_counts_lost_channels_but_not_dead_ones() -> None:
    rng = np.random.default_rng(19)
    w = rng.standard_normal((64, 16)).astype(np.float32)
    w[:, 3] *= 1e-6  # a dead channel: its own grid reproduces it
    assert weight_grid.grid_quality(w, _restored(w, 1), axis=1).worst_channel_db > 35.0
    w[0, 7] = 1e30  # channel 7 keeps only its outlier
    lost = weight_grid.grid_quality(w, _restored(w, 1), axis=1)
    assert lost.worst_channel_db < 0.5 and lost.sqnr_db > 10.0
    dead = w.copy()
    dead[:, 7] = 0.0
    dead[0, 7] = 1e-3  # a nearly dead channel whose rest is lost: negligible next to the others
    dead[1:4, 7] = 1e-9
    assert weight_grid.grid_quality(dead, _restored(dead, 1), axis=1).worst_channel_db > 35.0


def test_outlier_ratio_and_thresholds() -> None:
    assert weight_grid.outlier_ratio(np.zeros(10)) == 1.0
    w = np.ones(1000)
    w[0] = 1e30
    assert weight_grid.outlier_ratio(w) == pytest.approx(1e30)
    assert weight_grid.min_grid_sqnr_db(8) == weight_grid.MIN_GRID_SQNR_DB
    assert weight_grid.min_grid_sqnr_db(4) == 4.0 and weight_grid.min_grid_sqnr_db(2) == 3.0
