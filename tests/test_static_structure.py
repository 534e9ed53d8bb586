"""Graph structure of models produced by ``quantize_static`` on the test model zoo.

What is checked: exact QuantizeLinear/DequantizeLinear counts per graph (subgraphs included),
the element type behind every quantized input (int8 weights, int32 biases whose scale is exactly
input scale x weight scale in float32), per-channel axes, the quantized types of each config,
the fixed output ranges of Softmax/Sigmoid (Relu/Clip and BatchNorm: test_static_activations.py),
node selection filters, weights inside If/Loop bodies, that the input model is left untouched
and that the plan survives a JSON round trip. Every produced model passes the full ONNX checker
and runs in onnxruntime (see :func:`quantize`).
"""

from __future__ import annotations

import os

import model_zoo as zoo
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import numpy_helper
from static_helpers import (
    BYTE_SCALE,
    DQ,
    FLOAT,
    INT8,
    INT16,
    INT32,
    UINT8,
    Q,
    activation_qs,
    check_bias,
    check_weight,
    const,
    dequantizer,
    float_initializers,
    qcache,
    qdq_counts,
    quantize,
    stored_initializer,
    zoo_tensors,
)

import onnxquant
from onnxquant import QuantPlan, StaticQuantConfig, quantize_static
from onnxquant.core import qtypes

__all__ = ["qcache"]  # the fixture, imported for pytest

# -- op counts -------------------------------------------------------------------------------
# (#QuantizeLinear, #DequantizeLinear) per graph for the default config (U8S8, per tensor).
EXPECTED_QDQ = {
    # 10 activations: image, conv1_out (Relu folded), maxpool1_out, conv2_out (Clip folded),
    # avgpool1_out, conv3_out, add_residual_out (Relu folded), gap_out, flatten_out, logits;
    # plus 4 weights and 4 int32 biases.
    "cnn": {"cnn": (10, 18)},
    "conv_transpose": {"conv_transpose": (4, 6)},  # x, convt_out, sigmoid_out, y; W, B
    "matmul_chain": {"matmul_chain": (7, 13)},  # x, 3x (matmul, add); 3 W + 3 Add biases
    "model_with_shared_weight": {"model_with_shared_weight": (3, 6)},  # one DQ for shared_W
    "constant_weights_cnn": {"constant_weights_cnn": (6, 12)},
    "if_subgraph_model": {
        "if_subgraph_model": (1, 1),  # x, read by both branches
        "then_branch": (1, 3),  # then_conv W, B; then_conv_out (then_relu folded)
        "inner_then_branch": (1, 3),  # inner_conv W, B; inner_then_out
        "else_branch": (1, 3),  # else_conv W, B; else_conv_out (else_relu folded: its output,
        # the branch output, is the DequantizeLinear's)
    },
    "loop_model": {"loop_body": (2, 3)},  # state_in, body_W, body_matmul_out
    # 38 activations (LayerNorm outputs are quantized by their readers, so the graph output
    # last_hidden_state has none); 18 constants: word/position embeddings, 6 MatMul weights,
    # 6 Add biases, the mask fill, the attention scale and GELU's 'one' and 'half'.
    # Fixing the LayerNorm-input bug (see test_layernorm_reads_float_input) removes the pairs
    # of pos_add_out, attn_residual_out and ffn_residual_out: (35, 53).
    "transformer_block": {"transformer_block": (35, 53)},
}
FLOAT_OPS_LEFT = {
    "cnn": {"Conv": 3, "Gemm": 1, "Relu": 0, "Clip": 0, "BatchNormalization": 0},
    "matmul_chain": {"MatMul": 3, "Relu": 0},  # the last Relu, writing the graph output, folded
    "if_subgraph_model": {"Conv": 3, "Relu": 0, "If": 2},  # then_relu and else_relu folded
    "loop_model": {"Loop": 1, "MatMul": 1, "Tanh": 1},
    "transformer_block": {"MatMul": 8, "Softmax": 1, "LayerNormalization": 3},
}


@pytest.mark.parametrize("name", sorted(EXPECTED_QDQ))
def test_qdq_counts_per_graph(qcache, name: str) -> None:
    q = qcache(name)
    assert qdq_counts(q) == EXPECTED_QDQ[name]
    ops = q.ops()
    for op, count in FLOAT_OPS_LEFT.get(name, {}).items():
        assert ops[op] == count, op


@pytest.mark.parametrize("name", ["cnn", "if_subgraph_model", "loop_model"])
def test_per_channel_keeps_the_same_structure(qcache, name: str) -> None:
    assert qdq_counts(qcache(name, per_channel=True)) == EXPECTED_QDQ[name]


# -- element types and parameters ------------------------------------------------------------
def test_u8s8_is_the_default(qcache) -> None:
    q = qcache("cnn")
    for node in activation_qs(q):
        assert node.outputs[0].dtype == UINT8
        assert const(node.inputs[2]).dtype == np.uint8
    conv2 = q.node("conv2")
    assert stored_initializer(dequantizer(conv2.inputs[1])).dtype == INT8


def test_s8s8_weights_and_biases_of_cnn(qcache) -> None:
    q = qcache("cnn", activation_type=qtypes.INT8)
    tensors = zoo_tensors(zoo.cnn())
    for name, weight, bias in [("conv2", "conv2_W", "conv2_B"), ("conv3", "conv3_W", "conv3_B"),
                               ("gemm", "fc_W", "fc_B")]:
        node = q.node(name)
        _, zp = check_weight(node, 1, INT8, tensors[weight], None)
        assert zp.dtype == np.int8 and not np.any(zp)  # symmetric signed weights
        check_bias(node, tensors[bias])
    # conv1's weight and bias are BatchNorm-folded: only the types and the bias scale.
    conv1 = q.node("conv1")
    assert stored_initializer(dequantizer(conv1.inputs[1])).dtype == INT8
    check_bias(conv1, None)
    # Every activation is int8, every zero point int8.
    for node in activation_qs(q):
        assert node.outputs[0].dtype == INT8
        assert const(node.inputs[2]).dtype == np.int8
    assert q.proto.opset_import[0].version == 17  # int8 needs no opset change


@pytest.mark.parametrize(
    ("name", "node_name", "weight", "axis", "channels"),
    [
        ("cnn", "conv2", "conv2_W", 0, 16),
        ("cnn", "gemm", "fc_W", 0, 10),  # Gemm transB=1: [N, K] -> axis 0
        ("conv_transpose", "convt", "convt_W", 1, 6),  # [C_in, C_out, kH, kW] -> axis 1
        ("matmul_chain", "matmul_1", "fc_1_W", 1, 16),
        ("transformer_block", "ffn_up_matmul", "ffn_up_W", 1, 128),  # [32, 128]: columns
        ("transformer_block", "ffn_down_matmul", "ffn_down_W", 1, 32),  # [128, 32]
        ("loop_model", "body_matmul", "body_W", 1, 8),
        ("if_subgraph_model", "inner_conv", "inner_conv_W", 0, 4),
    ],
)
def test_per_channel_axis_and_scale_length(qcache, name, node_name, weight, axis,
                                           channels) -> None:
    q = qcache(name, per_channel=True)
    w = zoo_tensors(getattr(zoo, name)())[weight]
    scale, zp = check_weight(q.node(node_name), 1, INT8, w, axis)
    assert scale.shape == (channels,) and not np.any(zp)
    # Each channel's scale comes from its own max |w| (symmetric int8: max / 127).
    other = tuple(i for i in range(w.ndim) if i != axis)
    np.testing.assert_allclose(scale, np.abs(w).max(axis=other) / 127, rtol=1e-6)


@pytest.mark.parametrize("node_name", ["conv1", "conv2", "conv3", "gemm"])
def test_per_channel_bias_scale_is_input_times_weight_scale(qcache, node_name) -> None:
    q = qcache("cnn", per_channel=True)
    tensors = zoo_tensors(zoo.cnn())
    bias = {"conv2": "conv2_B", "conv3": "conv3_B", "gemm": "fc_B"}.get(node_name)
    check_bias(q.node(node_name), tensors[bias] if bias else None)


def test_conv_transpose_bias_per_channel(qcache) -> None:
    q = qcache("conv_transpose", per_channel=True)
    check_bias(q.node("convt"), zoo_tensors(zoo.conv_transpose())["convt_B"])


@pytest.mark.parametrize(
    ("weight_type", "weight_dtype"), [(onnxquant.UINT8, UINT8), (onnxquant.INT8, INT8)],
    ids=["U8U8", "U8S8"])
def test_uint8_activations(qcache, weight_type, weight_dtype) -> None:
    q = qcache("cnn", activation_type=onnxquant.UINT8, weight_type=weight_type)
    for node in activation_qs(q):
        assert node.outputs[0].dtype == UINT8
        assert const(node.inputs[2]).dtype == np.uint8
    tensors = zoo_tensors(zoo.cnn())
    for name, weight, bias in [("conv2", "conv2_W", "conv2_B"), ("gemm", "fc_W", "fc_B")]:
        _, zp = check_weight(q.node(name), 1, weight_dtype, tensors[weight], None)
        if weight_type.signed:
            assert zp.dtype == np.int8 and zp == 0
        else:  # unsigned weights are asymmetric: the zero point sits inside the grid
            assert zp.dtype == np.uint8 and 0 < int(zp) < 255
        check_bias(q.node(name), tensors[bias])
    # After a Relu the asymmetric uint8 range starts at 0: zero point 0.
    conv1_out_q = next(u for u, _ in q.node("conv1").outputs[0].uses() if u.op_type == Q)
    assert int(const(conv1_out_q.inputs[2])) == 0


@pytest.mark.parametrize("name", ["cnn", "if_subgraph_model", "loop_model"])
def test_int16_activations_convert_to_opset_21(qcache, name) -> None:
    q = qcache(name, activation_type=onnxquant.INT16)
    default = [o.version for o in q.proto.opset_import if o.domain in ("", "ai.onnx")]
    assert default == [21]
    qs = activation_qs(q)
    assert qs and all(n.outputs[0].dtype == INT16 for n in qs)
    assert all(const(n.inputs[2]).dtype == np.int16 for n in qs)
    # Weights stay int8 (the default weight type).
    weight_dqs = [n for n in q.nodes() if n.op_type == DQ and n.inputs[0].const_value is not None
                  and n.inputs[0].dtype != INT32]
    assert weight_dqs and all(n.inputs[0].dtype == INT8 for n in weight_dqs)
    assert qdq_counts(q) == EXPECTED_QDQ[name]  # the converted graph is quantized the same way


# -- fixed output ranges ---------------------------------------------------------------------
def _output_q(node: ir.Node) -> ir.Node:
    uses = node.outputs[0].uses()
    assert uses and all(u.op_type == Q for u, _ in uses), "every reader is a QuantizeLinear"
    return uses[0][0]


@pytest.mark.parametrize(("activation_type", "zero_point"),
                         [(onnxquant.INT8, -128), (onnxquant.UINT8, 0)])
def test_softmax_input_float_output_fixed(qcache, activation_type, zero_point) -> None:
    q = qcache("transformer_block", activation_type=activation_type)
    softmax = q.node("softmax")
    producer = softmax.inputs[0].producer()
    assert producer is not None and producer.op_type == "Add"  # not a DequantizeLinear
    assert "scores_mask_out" not in q.result.plan.tensors
    out_q = _output_q(softmax)
    assert const(out_q.inputs[1]) == BYTE_SCALE
    assert const(out_q.inputs[2]).dtype == activation_type.numpy_dtype
    assert int(const(out_q.inputs[2])) == zero_point
    assert q.result.plan.tensors["softmax_out"].source == "fixed"


def test_sigmoid_output_calibrated_range(qcache) -> None:
    q = qcache("conv_transpose", activation_type=qtypes.INT8)
    out_q = _output_q(q.node("sigmoid"))
    # The calibrated range lies inside (0, 1): widened to include 0, it starts the int8 grid
    # at -128 with a step no wider than the fixed [0, 1] grid's.
    scale = float(const(out_q.inputs[1]))
    assert int(const(out_q.inputs[2])) == -128 and 0 < scale <= BYTE_SCALE * (1 + 1e-6)
    dequantizer(q.node("sigmoid").inputs[0])
    # Resize only moves data: it shares Sigmoid's parameters (the same initializers).
    resize_q = _output_q(q.node("resize"))
    assert resize_q.inputs[1] is out_q.inputs[1] and resize_q.inputs[2] is out_q.inputs[2]


def test_layernorm_reads_float_input(qcache) -> None:
    q = qcache("transformer_block")
    for name in ("ln_emb", "ln_attn", "ln_out"):
        producer = q.node(name).inputs[0].producer()
        assert producer is not None and producer.op_type == "Add", name


def test_transformer_matmul_weights_are_int8(qcache) -> None:
    q = qcache("transformer_block")
    tensors = zoo_tensors(zoo.transformer_block())
    for prefix in ("q", "k", "v", "attn_out", "ffn_up", "ffn_down"):
        check_weight(q.node(f"{prefix}_matmul"), 1, INT8, tensors[f"{prefix}_W"], None)
    # Activation x activation MatMuls read two dequantized activations.
    for name in ("scores_matmul", "context_matmul"):
        node = q.node(name)
        for value in node.inputs:
            assert dequantizer(value).inputs[0].const_value is None


# -- node selection --------------------------------------------------------------------------
def _reads_float_constant(node: ir.Node, index: int, name: str) -> None:
    value = node.inputs[index]
    assert value is not None and value.name == name and value.producer() is None
    assert value.dtype == FLOAT and value.const_value is not None


def test_nodes_to_exclude(qcache) -> None:
    q = qcache("cnn", nodes_to_exclude=["conv2"])
    conv2 = q.node("conv2")
    _reads_float_constant(conv2, 1, "conv2_W")
    _reads_float_constant(conv2, 2, "conv2_B")
    assert "conv2" not in q.result.plan.nodes
    for name in ("conv1", "conv3", "gemm"):
        assert stored_initializer(dequantizer(q.node(name).inputs[1])).dtype == INT8


def test_op_types_to_exclude(qcache) -> None:
    q = qcache("cnn", op_types_to_exclude=["Conv"])
    for name, weight in (("conv1", "conv1_bn_weight"), ("conv2", "conv2_W"),
                         ("conv3", "conv3_W")):
        _reads_float_constant(q.node(name), 1, weight)
    assert stored_initializer(dequantizer(q.node("gemm").inputs[1])).dtype == INT8
    assert not any(d.op_type == "Conv" for d in q.result.plan.nodes.values())


def test_op_types_only_conv(qcache) -> None:
    q = qcache("cnn", op_types=["Conv"])
    assert set(q.result.plan.nodes) == {"conv1", "conv2", "conv3"}
    gemm = q.node("gemm")
    for value in gemm.inputs:  # flatten_out, fc_W, fc_B: all float
        producer = value.producer()
        assert producer is None or producer.op_type != DQ
    _reads_float_constant(gemm, 1, "fc_W")
    assert q.ops()["Relu"] == 2 and q.ops()["Clip"] == 1  # not selected, so not removed


def test_nodes_to_quantize(qcache) -> None:
    q = qcache("cnn", nodes_to_quantize=["conv1"])
    assert set(q.result.plan.nodes) == {"conv1"}
    assert qdq_counts(q) == {"cnn": (2, 4)}  # image, conv1_out; + weight, bias
    maxpool_out = q.node("conv2").inputs[0]
    assert maxpool_out is not None and maxpool_out.producer().op_type == "MaxPool"
    _reads_float_constant(q.node("conv2"), 1, "conv2_W")


# -- subgraphs -------------------------------------------------------------------------------
def _only_scales_are_float(graph: ir.Graph) -> None:
    """Every float initializer left in ``graph`` is a scale read by Q/DQ nodes."""
    for name, value in float_initializers(graph).items():
        uses = value.uses()
        assert uses, f"unused float initializer {name} in {graph.name}"
        assert all(u.op_type in (Q, DQ) and i == 1 for u, i in uses), (
            f"float initializer {name} in {graph.name} is not a scale")


@pytest.mark.parametrize("per_channel", [False, True])
def test_if_branch_weights_stored_int8_inside_subgraphs(qcache, per_channel) -> None:
    q = qcache("if_subgraph_model", per_channel=per_channel)
    tensors = zoo_tensors(zoo.if_subgraph_model())
    for conv, graph in (("then_conv", "then_branch"), ("inner_conv", "inner_then_branch"),
                        ("else_conv", "else_branch")):  # else_conv: weights were Constant nodes
        node = q.node(conv)
        assert node.graph is q.graph(graph)
        check_weight(node, 1, INT8, tensors[f"{conv}_W"], 0 if per_channel else None)
        check_bias(node, tensors[f"{conv}_B"])
        for index in (1, 2):
            assert dequantizer(node.inputs[index]).graph is q.graph(graph)
    for graph in (q.model.graph, *q.model.graph.subgraphs()):
        _only_scales_are_float(graph)
    assert not any(n.op_type == "Constant" for n in q.nodes())


@pytest.mark.parametrize("per_channel", [False, True])
def test_loop_body_weight_stored_int8_inside_body(qcache, per_channel) -> None:
    q = qcache("loop_model", per_channel=per_channel)
    matmul = q.node("body_matmul")
    assert matmul.graph is q.graph("loop_body")
    w = zoo_tensors(zoo.loop_model())["body_W"]
    check_weight(matmul, 1, INT8, w, 1 if per_channel else None)
    assert dequantizer(matmul.inputs[1]).graph is q.graph("loop_body")
    for graph in (q.model.graph, *q.model.graph.subgraphs()):
        _only_scales_are_float(graph)
    # The loop-carried state is quantized inside the body, where it is read.
    assert dequantizer(matmul.inputs[0]).inputs[0].producer().inputs[0].name == "state_in"


def test_constant_weights_cnn_has_no_float_weights(qcache) -> None:
    float_model = zoo.constant_weights_cnn()
    q = qcache("constant_weights_cnn")
    tensors = zoo_tensors(float_model)
    for name, weight, bias in [("conv1", "conv1_W", "conv1_B"), ("conv2", "conv2_W", "conv2_B"),
                               ("gemm", "fc_W", "fc_B")]:
        check_weight(q.node(name), 1, INT8, tensors[weight], None)
        check_bias(q.node(name), tensors[bias])
    assert q.ops()["Constant"] == 0
    _only_scales_are_float(q.model.graph)
    # Tensor bytes: int8 weights + int32 biases + scales is well under half the float bytes.
    quantized_bytes = sum(v.const_value.nbytes for v in q.model.graph.initializers.values())
    assert q.result.float_bytes == sum(a.nbytes for a in tensors.values())
    assert quantized_bytes < q.result.float_bytes / 2
    # The file: the float model, less 3/4 of its weight bytes, plus a few hundred bytes per
    # added Q/DQ node (node, scale and zero point protos).
    n_qdq = sum(sum(c) for c in qdq_counts(q).values())
    float_size = len(float_model.SerializeToString())
    assert os.path.getsize(q.path) < float_size - 0.75 * q.result.float_bytes + 300 * n_qdq


def test_transformer_file_smaller_than_float(qcache) -> None:
    q = qcache("transformer_block")
    assert os.path.getsize(q.path) < 0.8 * len(zoo.transformer_block().SerializeToString())


def test_shared_weight_quantized_once(qcache) -> None:
    q = qcache("model_with_shared_weight")
    conv_a, conv_b = q.node("conv_a"), q.node("conv_b")
    assert conv_a.inputs[1] is conv_b.inputs[1]
    weight = zoo_tensors(zoo.model_with_shared_weight())["shared_W"]
    check_weight(conv_a, 1, INT8, weight, None)
    stored = [v for v in q.model.graph.initializers.values()
              if v.dtype == INT8 and v.shape is not None and tuple(v.shape) == weight.shape]
    assert len(stored) == 1
    check_bias(conv_a, None)
    check_bias(conv_b, None)


@pytest.mark.parametrize("per_channel", [False, True])
def test_shared_weight_with_a_bias_that_needs_a_larger_weight_scale(tmp_path,
                                                                    per_channel) -> None:
    # conv_b's bias forces a larger scale on the shared weight; conv_a's bias scale must be
    # computed from that final scale too (it used to keep the old one).
    model = zoo.model_with_shared_weight()
    for init in model.graph.initializer:
        if init.name == "conv_b_B":  # |bias| / (x_scale * w_scale) > 2**31: w_scale must grow
            init.CopyFrom(numpy_helper.from_array(np.full(4, 1e6, np.float32), "conv_b_B"))
    q = quantize(model, tmp_path / "q.onnx", StaticQuantConfig(per_channel=per_channel))
    weight = zoo_tensors(model)["shared_W"]
    scale = const(dequantizer(q.node("conv_a").inputs[1]).inputs[1])
    assert np.all(scale > 2 * np.abs(weight).max() / 127)  # enlarged for conv_b's bias
    check_bias(q.node("conv_b"), np.full(4, 1e6))
    check_bias(q.node("conv_a"), zoo_tensors(model)["conv_a_B"])


# -- the input is never changed; the plan round-trips ----------------------------------------
def test_input_file_unchanged(tmp_path) -> None:
    path = tmp_path / "cnn.onnx"
    onnx.save(zoo.cnn(), path)
    before = path.read_bytes()
    quantize_static(str(path), tmp_path / "q.onnx", zoo.random_feeds(zoo.cnn(), 2, seed=1),
                    StaticQuantConfig(per_channel=True))
    assert path.read_bytes() == before
    assert any(n.op_type == Q for n in onnx.load(tmp_path / "q.onnx").graph.node)


@pytest.mark.parametrize("name", ["cnn", "if_subgraph_model", "constant_weights_cnn"])
def test_input_objects_unchanged(tmp_path, name) -> None:
    proto = getattr(zoo, name)()
    before = proto.SerializeToString(deterministic=True)
    feeds = zoo.random_feeds(proto, 2, seed=1)
    quantize(proto, tmp_path / "a.onnx", StaticQuantConfig(per_channel=True), feeds=feeds)
    assert proto.SerializeToString(deterministic=True) == before

    model = ir.serde.deserialize_model(onnx.load_from_string(before))
    model_before = ir.serde.serialize_model(model).SerializeToString(deterministic=True)
    quantize_static(model, tmp_path / "b.onnx", feeds,  # int16: also an opset conversion
                    StaticQuantConfig(activation_type=onnxquant.INT16))
    assert ir.serde.serialize_model(model).SerializeToString(deterministic=True) == model_before
    assert model.opset_imports[""] == proto.opset_import[0].version


@pytest.mark.parametrize("name", ["cnn", "if_subgraph_model", "transformer_block"])
def test_plan_json_round_trip(qcache, tmp_path, name) -> None:
    plan = qcache(name, per_channel=True).result.plan
    assert plan.tensors and plan.nodes
    assert QuantPlan.from_json(plan.to_json()) == plan
    path = tmp_path / "plan.json"
    plan.to_json(path)
    assert QuantPlan.from_json(path) == plan
    assert QuantPlan.from_json(str(path)) == plan


def test_a_lone_elementwise_node_says_why_it_stays_float(tmp_path):
    """An Add of two graph inputs has no quantized neighbour: calibration leaves its inputs
    out, and the plan gives that reason, not a missing range."""
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Add", ["a", "b"], ["c"], name="add")], "lone",
        [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [2, 4])
         for n in ("a", "b")],
        [onnx.helper.make_tensor_value_info("c", onnx.TensorProto.FLOAT, [2, 4])])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    rng = np.random.default_rng(0)
    feeds = [{n: rng.normal(size=(2, 4)).astype(np.float32) for n in ("a", "b")}
             for _ in range(4)]
    result = quantize(model, tmp_path / "q.onnx", feeds=feeds)
    decision = result.result.plan.nodes["add"]
    assert decision.action == "float" and decision.reason.startswith("no quantized neighbour")
