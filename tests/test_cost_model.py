"""The measured cost model decides which nodes are worth quantizing for speed (issue 14).

Decisions are tested with an injected cost table (deterministic, no timing): a fake whose
integer kernels are slow exactly where onnxruntime's are (shallow Convs, depthwise Convs whose
channels are not a multiple of 16, ConvInteger) on YOLO-style, MobileNet-style and audio CNNs
built here. One test times real kernels on a tiny shape into a temporary cache.
"""

from __future__ import annotations

import collections
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import model_zoo as zoo
import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from static_helpers import one_input_model

from onnxquant import DynamicQuantConfig, StaticQuantConfig, quantize_dynamic, quantize_static
from onnxquant.core import costs
from onnxquant.core.costs import ConvSpec, MatMulSpec, MeasuredCosts, NodeSpec
from onnxquant.core.errors import QuantizationError
from onnxquant.core.objective import (
    BALANCED_MIN_SAVED_BYTES,
    NodeCost,
    Objective,
    balanced_accepts,
)
from onnxquant.core.qtypes import QuantFormat

_RNG = np.random.default_rng(14)


# -- models ------------------------------------------------------------------------------------
_model = one_input_model


def _w(*shape: int) -> np.ndarray:
    fan_in = math.prod(shape[1:]) or 1
    return (_RNG.standard_normal(shape) / math.sqrt(fan_in)).astype(np.float32)


def _silu(name: str, x: str) -> list:
    return [helper.make_node("Sigmoid", [x], [f"{name}_s"], name=f"{name}_sig"),
            helper.make_node("Mul", [x, f"{name}_s"], [f"{name}_y"], name=f"{name}_mul")]


def yolo_model() -> onnx.ModelProto:
    """stem 3→16 (3x3/2, depth 27) + SiLU → conv 16→32 + SiLU → Split → two 3x3 convs →
    Concat → Resize ×2 → 1x1 head (32→8)."""
    nodes = [helper.make_node("Conv", ["x", "Ws"], ["stem"], name="stem", strides=[2, 2],
                              pads=[1, 1, 1, 1]), *_silu("stem", "stem"),
             helper.make_node("Conv", ["stem_y", "W1"], ["c1"], name="c1", pads=[1, 1, 1, 1]),
             *_silu("c1", "c1"),
             helper.make_node("Split", ["c1_y", "split"], ["a", "b"], name="split", axis=1),
             helper.make_node("Conv", ["a", "Wa"], ["ca"], name="ca", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["b", "Wb"], ["cb"], name="cb", pads=[1, 1, 1, 1]),
             helper.make_node("Concat", ["ca", "cb"], ["cat"], name="concat", axis=1),
             helper.make_node("Resize", ["cat", "", "scales"], ["up"], name="resize",
                              mode="nearest"),
             helper.make_node("Conv", ["up", "Wh"], ["y"], name="head")]
    inits = {"Ws": _w(16, 3, 3, 3), "W1": _w(32, 16, 3, 3), "Wa": _w(16, 16, 3, 3),
             "Wb": _w(16, 16, 3, 3), "Wh": _w(8, 32, 1, 1),
             "split": np.array([16, 16], np.int64),
             "scales": np.array([1, 1, 2, 2], np.float32)}
    return _model(nodes, inits, [1, 3, 32, 32], ["y"])


def mobilenet_model() -> onnx.ModelProto:
    """stem 3→16 → dw16 (3x3) → pw 16→24 → dw24 (5x5, not a multiple of 16) + Relu →
    pw 24→32 → GlobalAveragePool → Flatten → Gemm 32→10."""
    nodes = [helper.make_node("Conv", ["x", "Ws"], ["s"], name="stem", strides=[2, 2],
                              pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["s"], ["sr"], name="stem_relu"),
             helper.make_node("Conv", ["sr", "Wd1"], ["d1"], name="dw16", group=16,
                              pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["d1"], ["d1r"], name="dw16_relu"),
             helper.make_node("Conv", ["d1r", "Wp1"], ["p1"], name="pw1"),
             helper.make_node("Conv", ["p1", "Wd2"], ["d2"], name="dw24", group=24,
                              pads=[2, 2, 2, 2]),
             helper.make_node("Relu", ["d2"], ["d2r"], name="dw24_relu"),
             helper.make_node("Conv", ["d2r", "Wp2"], ["p2"], name="pw2"),
             helper.make_node("GlobalAveragePool", ["p2"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "Wfc", "Bfc"], ["y"], name="fc", transB=1)]
    inits = {"Ws": _w(16, 3, 3, 3), "Wd1": _w(16, 1, 3, 3), "Wp1": _w(24, 16, 1, 1),
             "Wd2": _w(24, 1, 5, 5), "Wp2": _w(32, 24, 1, 1), "Wfc": _w(10, 32),
             "Bfc": _w(10)}
    return _model(nodes, inits, [1, 3, 32, 32], ["y"])


def audio_model() -> onnx.ModelProto:
    """A keyword-spotting CNN on 40 mel bins: Conv1d 40→64 (k3) → Relu → Conv1d 64→64 (k3) →
    Relu → ReduceMean over time → MatMul 64→12."""
    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], name="conv1", pads=[1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "W2", "B2"], ["c2"], name="conv2", pads=[1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("ReduceMean", ["r2"], ["m"], name="pool", axes=[2], keepdims=0),
             helper.make_node("MatMul", ["m", "Wfc"], ["y"], name="fc")]
    inits = {"W1": _w(64, 40, 3), "B1": _w(64), "W2": _w(64, 64, 3), "B2": _w(64),
             "Wfc": _w(64, 12)}
    return _model(nodes, inits, [1, 40, 50], ["y"])


# -- a fake cost table ---------------------------------------------------------------------------
class FakeCosts:
    """Times proportional to multiply-adds, with onnxruntime's slow integer cases: shallow
    spatial Convs (depth < 32, kernel larger than 1x1) 2.5x float, depthwise Convs with
    channels not a multiple of 16 8x, other integer kernels 0.4x; ConvInteger 4x,
    MatMulInteger 0.5x. ``ratios`` overrides the integer ratio per weight shape."""

    def __init__(self, ratios: dict[tuple[int, ...], float] | None = None) -> None:
        self.ratios = ratios or {}
        self.context: dict = {}
        self.asked: list[tuple[str, str]] = []

    def node_ms(self, spec: NodeSpec, form: str) -> float | None:
        self.asked.append((spec.key(), form))
        if "@" in form:  # no in-context times: the plain forms decide
            return self.context.get(form, lambda _: None)(spec)
        if isinstance(spec, MatMulSpec):
            macs = spec.m * spec.k * spec.n
            ratio = {"float": 1.0, "integer": 0.4, "dynamic": 0.5}[form]
            return macs * 1e-6 * ratio
        depth = math.prod(spec.w_shape[1:])
        macs = spec.output_elements * depth
        group = int(dict(spec.attrs).get("group", 1))  # type: ignore[call-overload]
        if form == "float":
            return macs * 1e-6
        if form == "dynamic":
            return macs * 4e-6
        if spec.w_shape in self.ratios:
            return macs * 1e-6 * self.ratios[spec.w_shape]
        if group > 1 and spec.w_shape[1] == 1:
            return macs * 1e-6 * (8.0 if group % 16 else 0.9)
        shallow = depth < 32 and math.prod(spec.w_shape[2:]) > 1
        return macs * 1e-6 * (2.5 if shallow else 0.4)

    def transition_ms(self, direction: str, elements: int) -> float | None:
        return elements * 1e-7


def _static(model: onnx.ModelProto, tmp_path: Path, qformat: QuantFormat = QuantFormat.QOPERATOR,
            **fields: object):
    out = tmp_path / f"q{len(list(tmp_path.iterdir()))}.onnx"
    fields.setdefault("cost_model", FakeCosts())
    config = StaticQuantConfig(format=qformat, per_channel_fallback_db=None,
                               **fields)  # type: ignore[arg-type]
    result = quantize_static(model, out, zoo.random_feeds(model, 8, seed=1), config)
    proto = onnx.load(out)
    onnx.checker.check_model(proto, full_check=True)
    return proto, result


def _ops(proto: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(n.op_type for n in proto.graph.node)


def _actions(result, *names: str) -> list[str]:
    return [result.plan.nodes[n].action for n in names]


# -- static ------------------------------------------------------------------------------------
@pytest.mark.parametrize("qformat", [QuantFormat.QOPERATOR, QuantFormat.QDQ])
def test_yolo_shallow_stem_and_its_silu_stay_float(tmp_path: Path, qformat: QuantFormat) -> None:
    proto, result = _static(yolo_model(), tmp_path, qformat, objective="speed")
    assert _actions(result, "stem", "stem_sig", "stem_mul") == ["float"] * 3
    stem = result.plan.nodes["stem"].reason
    assert "measured slower than float" in stem and "objective speed" in stem
    assert "elementwise tail of the float Conv 'stem'" in result.plan.nodes["stem_sig"].reason
    assert _actions(result, "c1", "ca", "cb", "head") == ["quantize"] * 4
    assert [n.op_type for n in proto.graph.node][0] == "Conv"  # the stem reads x as float
    if qformat is QuantFormat.QOPERATOR:
        assert _ops(proto)["QLinearConv"] == 4 and _ops(proto)["Conv"] == 1
    est = result.plan.settings["cost_model"]
    assert est["measured"] and est["nodes"] == 5 and est["kept_float"] == 1
    assert est["quantized_ms"] < est["float_ms"]
    assert "cost model:   objective speed; 5 Conv/MatMul/Gemm measured" in result.summary()


def test_mobilenet_odd_depthwise_stays_float_with_its_relu(tmp_path: Path) -> None:
    proto, result = _static(mobilenet_model(), tmp_path, objective="speed")
    assert _actions(result, "dw24", "dw24_relu") == ["float", "float"]
    assert _actions(result, "dw16", "pw1", "pw2", "fc") == ["quantize"] * 4
    assert result.plan.nodes["stem"].action == "float"  # shallow, on the graph input
    # not the fixed rules' reasons: the cost model decided
    assert all("float_depthwise_multiple" not in d.reason and "float_conv_depth" not in d.reason
               for d in result.plan.nodes.values())
    assert _ops(proto)["Conv"] == 2


def test_inside_a_region_the_dequantize_counts(tmp_path: Path) -> None:
    """Inside an integer region (the stem is named, so quantized) leaving dw16 would cost a
    DequantizeLinear of its input: at 1.005x float its integer form is still the cheaper."""
    fake = FakeCosts({(16, 1, 3, 3): 1.005})
    _, result = _static(mobilenet_model(), tmp_path, objective="speed", cost_model=fake,
                        force_nodes=["stem"])
    assert result.plan.nodes["dw16"].action == "quantize"
    fake = FakeCosts({(16, 1, 3, 3): 3.0})
    _, result = _static(mobilenet_model(), tmp_path, objective="speed", cost_model=fake,
                        force_nodes=["stem"])
    assert result.plan.nodes["dw16"].action == "float"


def test_named_nodes_stay_quantized(tmp_path: Path) -> None:
    _, result = _static(mobilenet_model(), tmp_path, objective="speed",
                        force_nodes=["dw24", "stem"])
    assert _actions(result, "dw24", "stem") == ["quantize", "quantize"]
    _, result = _static(yolo_model(), tmp_path, objective="speed", force_op_types=["Conv"])
    assert all(d.action == "quantize" for d in result.plan.nodes.values() if d.op_type == "Conv")
    _, result = _static(yolo_model(), tmp_path, objective="speed", force_quantize=True)
    assert result.plan.nodes["stem"].action == "quantize"


def test_size_quantizes_everything_and_states_the_cost(tmp_path: Path) -> None:
    proto, result = _static(mobilenet_model(), tmp_path, objective="size")
    convs = [d.action for d in result.plan.nodes.values() if d.op_type in ("Conv", "Gemm")]
    assert convs == ["quantize"] * 6 and _ops(proto)["Conv"] == 0
    est = result.plan.settings["cost_model"]
    assert est["objective"] == "size" and est["kept_float"] == 0
    assert est["quantized_ms"] > est["float_ms"]  # the odd depthwise makes it slower
    ratio = est["quantized_ms"] / est["float_ms"]
    assert f"({ratio:.2f}× the float time" in result.summary()


def test_balanced_accepts_a_small_slowdown_for_a_large_saving(tmp_path: Path) -> None:
    """ca with 192 channels (192x16x3x3 = 27.6k weights, 83 KB saved) at 1.03x float: balanced
    takes it (its 0.21 ms loss is within half of the 0.7 ms c1 gained), speed does not."""
    def wide(ratio: float) -> tuple[onnx.ModelProto, FakeCosts]:
        model = yolo_model()
        for init in model.graph.initializer:
            if init.name == "Wa":
                init.CopyFrom(numpy_helper.from_array(_w(192, 16, 3, 3), "Wa"))
            if init.name == "Wh":
                init.CopyFrom(numpy_helper.from_array(_w(8, 208, 1, 1), "Wh"))
        model = onnx.shape_inference.infer_shapes(model, strict_mode=False)
        return model, FakeCosts({(192, 16, 3, 3): ratio})

    model, fake = wide(1.03)
    _, speed = _static(model, tmp_path, objective="speed", cost_model=fake)
    _, balanced = _static(model, tmp_path, objective="balanced", cost_model=fake)
    assert speed.plan.nodes["ca"].action == "float"
    assert balanced.plan.nodes["ca"].action == "quantize"
    assert balanced.plan.settings["cost_model"]["accepted_slower"] == 1
    model, fake = wide(1.6)  # beyond 25 %: float under balanced too
    _, balanced = _static(model, tmp_path, objective="balanced", cost_model=fake)
    assert balanced.plan.nodes["ca"].action == "float"


def test_balanced_rule() -> None:
    big = BALANCED_MIN_SAVED_BYTES
    assert balanced_accepts(NodeCost(1.0, 1.2, big), gained_ms=1.0, accepted_loss_ms=0.0)
    assert not balanced_accepts(NodeCost(1.0, 1.3, big), 10.0, 0.0)  # > 25 % slower
    assert not balanced_accepts(NodeCost(1.0, 1.2, big - 1), 10.0, 0.0)  # saves too little
    assert not balanced_accepts(NodeCost(1.0, 1.2, big), 0.3, 0.0)  # 0.2 > half of 0.3
    assert not balanced_accepts(NodeCost(1.0, 1.2, big), 1.0, 0.35)  # budget spent


def test_not_measuring_falls_back_to_the_fixed_rules(tmp_path: Path) -> None:
    _, result = _static(mobilenet_model(), tmp_path, cost_model=None, measure_costs=False)
    assert result.plan.settings["cost_model"] == {"objective": "balanced", "measured": False}
    assert "float_depthwise_multiple" in result.plan.nodes["dw24"].reason
    assert "float_conv_depth" in result.plan.nodes["stem"].reason
    _, result = _static(mobilenet_model(), tmp_path, cost_model=None, measure_costs=False,
                        objective=Objective.SIZE)
    assert _actions(result, "dw24", "stem") == ["quantize", "quantize"]
    assert "kernel costs not measured" in result.summary()


def test_unknown_objective_is_refused() -> None:
    with pytest.raises(QuantizationError, match="unknown objective 'fast'"):
        StaticQuantConfig(objective="fast")
    with pytest.raises(QuantizationError, match="speed"):
        DynamicQuantConfig(objective="latency")


# -- dynamic -----------------------------------------------------------------------------------
def _dynamic(tmp_path: Path, **fields: object):
    out = tmp_path / f"d{len(list(tmp_path.iterdir()))}.onnx"
    fields.setdefault("cost_model", FakeCosts())
    result = quantize_dynamic(audio_model(), out, DynamicQuantConfig(**fields))  # type: ignore[arg-type]
    return onnx.load(out), result


def test_dynamic_convs_stay_float_where_convinteger_is_slower(tmp_path: Path) -> None:
    proto, result = _dynamic(tmp_path)
    actions = {d.name: (d.action, d.reason) for d in result.decisions}
    assert actions["conv1"][0] == actions["conv2"][0] == "float"
    assert "ConvInteger form measured slower than float" in actions["conv1"][1]
    assert actions["fc"][0] == "quantized"
    assert _ops(proto)["ConvInteger"] == 0 and _ops(proto)["MatMulInteger"] == 1
    assert result.cost_model["kept_float"] == 2
    assert "cost model:   objective balanced; 3 Conv/MatMul/Gemm measured" in result.summary()


def test_dynamic_convs_are_judged_between_float_neighbours(tmp_path: Path) -> None:
    """ConvInteger alone at 0.5x float, but between float Convs it costs them their NCHWc
    layout: the in-context times decide."""
    fake = FakeCosts()
    alone = fake.node_ms
    fake.node_ms = lambda spec, form: (  # type: ignore[method-assign]
        alone(spec, "float") * 0.5 if form == "dynamic" else alone(spec, form))
    proto, _ = _dynamic(tmp_path, cost_model=fake)
    assert _ops(proto)["ConvInteger"] == 2
    fake.context = {"float@float": lambda spec: alone(spec, "float") * 1.2,
                    "dynamic@float": lambda spec: alone(spec, "float") * 1.5}
    proto, result = _dynamic(tmp_path, cost_model=fake)
    assert _ops(proto)["ConvInteger"] == 0
    assert any(form == "dynamic@float" for _, form in fake.asked)


def test_dynamic_named_op_types_and_size_quantize_convs(tmp_path: Path) -> None:
    proto, _ = _dynamic(tmp_path, op_types=["Conv", "MatMul"])
    assert _ops(proto)["ConvInteger"] == 2
    proto, _ = _dynamic(tmp_path, nodes_to_quantize=["conv2"])
    assert _ops(proto)["ConvInteger"] == 1 and _ops(proto)["MatMulInteger"] == 0
    proto, result = _dynamic(tmp_path, objective="size")
    assert _ops(proto)["ConvInteger"] == 2
    assert result.cost_model["quantized_ms"] > result.cost_model["float_ms"]


def test_dynamic_without_measurements_quantizes_as_before(tmp_path: Path) -> None:
    proto, result = _dynamic(tmp_path, cost_model=None, measure_costs=False)
    assert _ops(proto)["ConvInteger"] == 2
    assert result.cost_model == {"objective": "balanced", "measured": False}


# -- the real measurement ----------------------------------------------------------------------
def test_measured_costs_are_cached_per_machine(tmp_path: Path, monkeypatch) -> None:
    cache = tmp_path / "costs.json"
    spec = ConvSpec((1, 4, 8, 8), (8, 4, 3, 3), (("pads", (1, 1, 1, 1)),))
    model = MeasuredCosts(cache, budget_s=0.002)
    times = {form: model.node_ms(spec, form) for form in ("float", "integer", "dynamic")}
    q = model.transition_ms("quantize", spec.input_elements)
    assert all(t is not None and 0 < t < 50 for t in times.values()) and q is not None and q > 0
    model.save()
    data = json.loads(cache.read_text())
    (machine,) = data
    assert "onnxruntime" in machine and len(data[machine]) == 4

    def no_timing(*args: object, **kwargs: object) -> float:
        raise AssertionError("measured again instead of reading the cache")

    monkeypatch.setattr("onnxquant.core._cost_bench.time_model", no_timing)
    again = MeasuredCosts(cache)
    assert again.node_ms(spec, "integer") == times["integer"]


def test_cache_location_and_switch_come_from_the_environment(tmp_path: Path,
                                                             monkeypatch) -> None:
    monkeypatch.setenv("ONNXQUANT_COST_CACHE", str(tmp_path / "c.json"))
    assert costs.cost_cache_path() == tmp_path / "c.json"
    monkeypatch.setenv("ONNXQUANT_MEASURE_COSTS", "0")
    assert not costs.measuring_enabled() and costs.default_cost_model() is None
    assert costs.measuring_enabled(True)
    monkeypatch.setenv("ONNXQUANT_MEASURE_COSTS", "1")
    assert costs.measuring_enabled()


def test_cli_objective_measures_into_the_given_cache(tmp_path: Path) -> None:
    src, out = tmp_path / "audio.onnx", tmp_path / "out.onnx"
    onnx.save(audio_model(), src)
    env = {**os.environ, "ONNXQUANT_MEASURE_COSTS": "1",
           "ONNXQUANT_COST_CACHE": str(tmp_path / "cache.json")}
    run = subprocess.run([sys.executable, "-m", "onnxquant", "dynamic", str(src), "-o", str(out),
                          "--objective", "speed", "--no-eval"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "cost model:   objective speed; 3 Conv/MatMul/Gemm measured" in run.stdout
    assert (tmp_path / "cache.json").exists()
    run = subprocess.run([sys.executable, "-m", "onnxquant", "dynamic", str(src), "-o", str(out),
                          "--objective", "size", "--no-measure-costs", "--no-eval"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "kernel costs not measured" in run.stdout
    assert collections.Counter(n.op_type for n in onnx.load(out).graph.node)["ConvInteger"] == 2
