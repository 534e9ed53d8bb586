"""Relu/Clip removal and BatchNormalization folding in ``quantize_static`` output: a removed
activation's clipping lives in the producer's quantized range, a kept one reads and writes Q/DQ,
folding BatchNorm matches the float model (with and without a Conv bias, and when BatchNorm writes
the graph output), and folded weights get per-channel scales."""

from __future__ import annotations

import model_zoo as zoo
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper
from static_helpers import Q, Quantized, activation_qs, const, dequantizer, qcache

from onnxquant.core import qtypes
from onnxquant.preprocess import passes as preprocess

__all__ = ["qcache"]  # the fixture, imported for pytest

# -- Relu / Clip / BatchNormalization --------------------------------------------------------
def _quantized_range(q: Quantized, value: ir.Value) -> tuple[float, float]:
    node = next(u for u, _ in value.uses() if u.op_type == Q)
    scale = float(const(node.inputs[1]))
    zero_point = int(const(node.inputs[2]))
    info = np.iinfo(const(node.inputs[2]).dtype)
    return scale * (info.min - zero_point), scale * (info.max - zero_point)


def test_relu_and_clip_removed_with_asymmetric_activations(qcache) -> None:
    q = qcache("cnn")
    ops = q.ops()
    assert ops["Relu"] == 0 and ops["Clip"] == 0
    # Their clipping now lives in the producers' quantized ranges.
    low, high = _quantized_range(q, q.node("conv1").outputs[0])
    assert low == 0.0 and high > 0
    low, high = _quantized_range(q, q.node("conv2").outputs[0])
    assert low == 0.0 and high <= 6.0 * (1 + 1e-6)
    assert {d.name for d in q.result.plan.nodes.values() if d.action == "remove"} == {
        "relu1", "clip1", "relu2"}


@pytest.mark.parametrize("fields", [{"keep_removable_activations": True},
                                    {"activation_symmetric": True, "activation_type": qtypes.INT8}],
                         ids=["keep_removable_activations", "activation_symmetric"])
def test_relu_and_clip_kept(qcache, fields) -> None:
    q = qcache("cnn", **fields)
    ops = q.ops()
    assert ops["Relu"] == 2 and ops["Clip"] == 1
    for name in ("relu1", "relu2", "clip1"):
        node = q.node(name)
        dequantizer(node.inputs[0])  # reads the quantized producer
        assert any(u.op_type == Q for u, _ in node.outputs[0].uses())
    assert not any(d.action == "remove" for d in q.result.plan.nodes.values())
    if fields.get("activation_symmetric"):
        assert all(int(const(n.inputs[2])) == 0 for n in activation_qs(q))


def test_batchnorm_folded_in_quantized_model(qcache) -> None:
    q = qcache("cnn")
    assert q.ops()["BatchNormalization"] == 0
    assert q.result.plan.nodes["conv1"].action == "quantize"


def test_batchnorm_kept_when_folding_is_off(qcache) -> None:
    q = qcache("cnn", fold_batchnorm=False)
    assert q.ops()["BatchNormalization"] == 1
    bn = q.node("bn1")
    assert bn.inputs[0] is not None and bn.inputs[0].producer() is not None


def test_fold_batchnorm_matches_float_model() -> None:
    float_model = zoo.cnn()
    model = ir.serde.deserialize_model(float_model)
    assert preprocess.fold_batchnorm(model) == 1
    assert not [n for n in model.graph if n.op_type == "BatchNormalization"]
    folded = ir.serde.serialize_model(model)
    onnx.checker.check_model(folded, full_check=True)
    feeds = zoo.random_feeds(float_model, 4, seed=3)
    for expected, got in zip(zoo.run(float_model, feeds), zoo.run(folded, feeds), strict=True):
        # Folding is done in float64; only float32 rounding of the new weights remains
        # (measured max abs difference 2.4e-7 on outputs of magnitude ~1.6).
        np.testing.assert_allclose(got[0], expected[0], rtol=1e-5, atol=2e-6)


def _conv_bn_model(bn_is_output: bool, with_bias: bool) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    arrays = {"W": rng.standard_normal((4, 3, 3, 3)) * 0.3, "s": rng.uniform(0.5, 2, 4),
              "b": rng.standard_normal(4), "mu": rng.standard_normal(4),
              "var": rng.uniform(0.1, 3, 4), "B": rng.standard_normal(4) * 0.1}
    conv_inputs = ["x", "W", "B"] if with_bias else ["x", "W"]
    nodes = [helper.make_node("Conv", conv_inputs, ["c"], name="conv", pads=[1, 1, 1, 1],
                              kernel_shape=[3, 3]),
             helper.make_node("BatchNormalization", ["c", "s", "b", "mu", "var"],
                              ["y" if bn_is_output else "bn_out"], name="bn", epsilon=1e-3)]
    if not bn_is_output:
        nodes.append(helper.make_node("Relu", ["bn_out"], ["y"], name="relu"))
    graph = helper.make_graph(
        nodes, "conv_bn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])],
        initializer=[numpy_helper.from_array(a.astype(np.float32), n) for n, a in arrays.items()
                     if with_bias or n != "B"])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def _check_fold(float_model: onnx.ModelProto) -> None:
    model = ir.serde.deserialize_model(float_model)
    assert preprocess.fold_batchnorm(model) == 1
    folded = ir.serde.serialize_model(model)
    onnx.checker.check_model(folded, full_check=True)
    assert [o.name for o in folded.graph.output] == ["y"]
    assert "BatchNormalization" not in {n.op_type for n in folded.graph.node}
    feeds = zoo.random_feeds(float_model, 2, seed=3)
    for expected, got in zip(zoo.run(float_model, feeds), zoo.run(folded, feeds), strict=True):
        np.testing.assert_allclose(got[0], expected[0], rtol=1e-5, atol=1e-5)


def test_fold_batchnorm_conv_without_bias() -> None:
    _check_fold(_conv_bn_model(bn_is_output=False, with_bias=False))


def test_fold_batchnorm_whose_output_is_the_graph_output() -> None:
    _check_fold(_conv_bn_model(bn_is_output=True, with_bias=True))




def test_batchnorm_folded_weights_get_per_channel_scales(qcache) -> None:
    """Folding BatchNorm puts its per-channel scale into the weight: per-tensor quantization
    would spend levels on it, so those weights (only those) are quantized per channel."""
    q = qcache("cnn")
    conv1_weight = q.result.plan.tensors["conv1_bn_weight"]
    assert conv1_weight.axis == 0 and "BatchNormalization folded" in conv1_weight.source
    assert q.result.plan.tensors["conv3_W"].axis is None  # no BatchNorm: per tensor
    off = qcache("cnn", per_channel_fallback_db=None)
    assert off.result.plan.tensors["conv1_bn_weight"].axis is None
