"""Small float32 ONNX models built in code, for the test suite.

Every builder is deterministic for a given ``seed``, returns an ``onnx.ModelProto`` with
``ir_version`` :data:`IR_VERSION`, names every node uniquely (subgraphs included), and scales
its weights (He/Xavier) so that activations stay O(1) on standard-normal inputs, which keeps
quantization error measurements meaningful.

Helpers (defined in :mod:`zoo_runtime`, re-exported here): :func:`random_feeds` makes inputs for
a model, :func:`run` runs it with onnxruntime on the CPU, :func:`sqnr_db` compares two outputs and
:func:`zoo_tensors` lists a model's constant tensors.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from zoo_runtime import random_feeds, run, sqnr_db, zoo_tensors

__all__ = [
    "IR_VERSION",
    "cnn",
    "constant_weights_cnn",
    "conv_transpose",
    "if_subgraph_model",
    "loop_model",
    "matmul_chain",
    "model_with_shared_weight",
    "old_opset_model",
    "random_feeds",
    "run",
    "sqnr_db",
    "transformer_block",
    "zoo_tensors",
]

IR_VERSION = 10
"""IR version of every model built here: the newest that onnxruntime 1.20 (our floor) loads."""

MAX_SEQ = 16
"""Rows in the transformer's position table: the longest sequence it accepts."""

_FLOAT = TensorProto.FLOAT
_INT64 = TensorProto.INT64


def _he(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
    return (rng.standard_normal(shape) * math.sqrt(2.0 / fan_in)).astype(np.float32)


def _xavier(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
    return (rng.standard_normal(shape) * math.sqrt(1.0 / fan_in)).astype(np.float32)


def _small(rng: np.random.Generator, shape: tuple[int, ...], scale: float = 0.1) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _tensor(name: str, value: np.ndarray | float | list[int]) -> TensorProto:
    array = np.asarray(value)
    if array.dtype == np.float64:
        array = array.astype(np.float32)
    return numpy_helper.from_array(array, name)


def _const(name: str, value: np.ndarray | float | list[int]) -> onnx.NodeProto:
    """A ``Constant`` node named ``const_<name>`` whose output is ``name``."""
    return helper.make_node("Constant", [], [name], name=f"const_{name}",
                            value=_tensor(name, value))


def _require_opset(builder: str, opset: int, minimum: int) -> None:
    if opset < minimum:
        raise ValueError(f"{builder}() needs opset >= {minimum}, got {opset}")


def _model(graph: onnx.GraphProto, opset: int, doc: str) -> onnx.ModelProto:
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset)],
        ir_version=IR_VERSION,
        producer_name="onnxquant-tests",
        doc_string=doc,
    )
    graph.doc_string = doc
    return model


def cnn(opset: int = 17, batch: str | int = "N", *, seed: int = 0) -> onnx.ModelProto:
    """A small residual CNN classifier on ``image`` [N,3,32,32] -> ``logits`` [N,10].

    conv1(3->8, 3x3, pad 1, bias) -> bn1 -> relu1 -> maxpool1(2) -> conv2(8->16, 3x3, pad 1)
    -> clip1(min/max as inputs, 0..6) -> avgpool1(2) -> conv3(16->16, 1x1) -> add_residual
    (with avgpool1's output) -> relu2 -> gap -> flatten -> gemm(16->10, transB=1, bias C).
    Needs opset >= 11 (Clip bounds as inputs).
    """
    _require_opset("cnn", opset, 11)
    rng = np.random.default_rng(seed)
    inits = [
        _tensor("conv1_W", _he(rng, (8, 3, 3, 3), 27)),
        _tensor("conv1_B", _small(rng, (8,))),
        _tensor("bn1_scale", (1.0 + _small(rng, (8,))).astype(np.float32)),
        _tensor("bn1_bias", _small(rng, (8,))),
        _tensor("bn1_mean", _small(rng, (8,))),
        _tensor("bn1_var", rng.uniform(1.5, 2.5, (8,)).astype(np.float32)),
        _tensor("conv2_W", _he(rng, (16, 8, 3, 3), 72)),
        _tensor("conv2_B", _small(rng, (16,))),
        _tensor("clip_min", np.float32(0.0)),
        _tensor("clip_max", np.float32(6.0)),
        _tensor("conv3_W", _xavier(rng, (16, 16, 1, 1), 16)),
        _tensor("conv3_B", _small(rng, (16,))),
        _tensor("fc_W", _xavier(rng, (10, 16), 16)),
        _tensor("fc_B", _small(rng, (10,))),
    ]
    pool = {"kernel_shape": [2, 2], "strides": [2, 2]}
    nodes = [
        helper.make_node("Conv", ["image", "conv1_W", "conv1_B"], ["conv1_out"], name="conv1",
                         kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization",
                         ["conv1_out", "bn1_scale", "bn1_bias", "bn1_mean", "bn1_var"],
                         ["bn1_out"], name="bn1"),
        helper.make_node("Relu", ["bn1_out"], ["relu1_out"], name="relu1"),
        helper.make_node("MaxPool", ["relu1_out"], ["maxpool1_out"], name="maxpool1", **pool),
        helper.make_node("Conv", ["maxpool1_out", "conv2_W", "conv2_B"], ["conv2_out"],
                         name="conv2", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["conv2_out", "clip_min", "clip_max"], ["clip1_out"],
                         name="clip1"),
        helper.make_node("AveragePool", ["clip1_out"], ["avgpool1_out"], name="avgpool1", **pool),
        helper.make_node("Conv", ["avgpool1_out", "conv3_W", "conv3_B"], ["conv3_out"],
                         name="conv3", kernel_shape=[1, 1]),
        helper.make_node("Add", ["conv3_out", "avgpool1_out"], ["add_residual_out"],
                         name="add_residual"),
        helper.make_node("Relu", ["add_residual_out"], ["relu2_out"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["relu2_out"], ["gap_out"], name="gap"),
        helper.make_node("Flatten", ["gap_out"], ["flatten_out"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flatten_out", "fc_W", "fc_B"], ["logits"], name="gemm",
                         transB=1),
    ]
    graph = helper.make_graph(
        nodes, "cnn",
        [helper.make_tensor_value_info("image", _FLOAT, [batch, 3, 32, 32])],
        [helper.make_tensor_value_info("logits", _FLOAT, [batch, 10])],
        initializer=inits,
    )
    return _model(graph, opset, cnn.__doc__ or "")


def conv_transpose(opset: int = 17, *, seed: int = 0) -> onnx.ModelProto:
    """Upsample-then-downsample: ``x`` [N,4,8,8] -> ``y`` [N,6,8,8].

    convt(ConvTranspose 4->6, 3x3, stride 2, pads 1, output_padding 1, bias; gives 16x16)
    -> sigmoid -> resize(scales 0.5 on H/W, nearest, no roi). Needs opset >= 13.
    """
    _require_opset("conv_transpose", opset, 13)
    rng = np.random.default_rng(seed)
    inits = [
        # With stride 2 each output pixel sees about 4 channels x (3/2)^2 taps = 9 inputs.
        _tensor("convt_W", _he(rng, (4, 6, 3, 3), 9)),
        _tensor("convt_B", _small(rng, (6,))),
        _tensor("resize_scales", np.array([1.0, 1.0, 0.5, 0.5], np.float32)),
    ]
    nodes = [
        helper.make_node("ConvTranspose", ["x", "convt_W", "convt_B"], ["convt_out"],
                         name="convt", kernel_shape=[3, 3], strides=[2, 2],
                         pads=[1, 1, 1, 1], output_padding=[1, 1]),
        helper.make_node("Sigmoid", ["convt_out"], ["sigmoid_out"], name="sigmoid"),
        helper.make_node("Resize", ["sigmoid_out", "", "resize_scales"], ["y"], name="resize",
                         mode="nearest"),
    ]
    graph = helper.make_graph(
        nodes, "conv_transpose",
        [helper.make_tensor_value_info("x", _FLOAT, ["N", 4, 8, 8])],
        [helper.make_tensor_value_info("y", _FLOAT, ["N", 6, 8, 8])],
        initializer=inits,
    )
    return _model(graph, opset, conv_transpose.__doc__ or "")


def transformer_block(
    opset: int = 17, vocab: int = 50, hidden: int = 32, heads: int = 2, seq: str | int = "S",
    *, seed: int = 0,
) -> onnx.ModelProto:
    """One post-LN BERT-style encoder layer with embeddings.

    Inputs ``input_ids`` and ``attention_mask`` (int64 [B,S], S <= 16); output
    ``last_hidden_state`` (float [B,S,hidden]). Nodes: word_emb (Gather on
    ``word_embeddings`` [vocab,hidden]) + pos_add (position table [1,16,hidden] cut to S by
    shape -> seq_len (Gather) -> pos_slice) -> ln_emb -> q/k/v_matmul + q/k/v_add ->
    reshape/transpose to heads -> scores_matmul -> scores_scale (Mul) -> scores_mask (Add of
    (1 - Cast(mask)) * -10000, Unsqueezed) -> softmax -> context_matmul -> transpose/reshape ->
    attn_out_matmul + attn_out_add -> attn_residual -> ln_attn -> ffn_up_matmul + ffn_up_add ->
    GELU via Erf (gelu_*) -> ffn_down_matmul + ffn_down_add -> ffn_residual -> ln_out.
    Needs opset >= 17 (LayerNormalization).
    """
    _require_opset("transformer_block", opset, 17)
    if hidden % heads:
        raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads})")
    rng = np.random.default_rng(seed)
    head_dim = hidden // heads
    ffn = 4 * hidden

    def ln_params(prefix: str) -> list[TensorProto]:
        return [_tensor(f"{prefix}_scale", (1.0 + _small(rng, (hidden,))).astype(np.float32)),
                _tensor(f"{prefix}_bias", _small(rng, (hidden,)))]

    def linear(prefix: str, n_in: int, n_out: int, src: str) -> tuple[list, list, str]:
        weights = [_tensor(f"{prefix}_W", _xavier(rng, (n_in, n_out), n_in)),
                   _tensor(f"{prefix}_B", _small(rng, (n_out,)))]
        nodes = [helper.make_node("MatMul", [src, f"{prefix}_W"], [f"{prefix}_mm"],
                                  name=f"{prefix}_matmul"),
                 helper.make_node("Add", [f"{prefix}_mm", f"{prefix}_B"], [f"{prefix}_out"],
                                  name=f"{prefix}_add")]
        return weights, nodes, f"{prefix}_out"

    def node(op: str, inputs: list[str], name: str, **attrs: object) -> onnx.NodeProto:
        return helper.make_node(op, inputs, [f"{name}_out"], name=name, **attrs)

    inits = [
        _tensor("word_embeddings", rng.standard_normal((vocab, hidden)).astype(np.float32)),
        _tensor("position_embeddings", _small(rng, (1, MAX_SEQ, hidden), 0.5)),
        *ln_params("ln_emb"),
        _tensor("seq_axis", np.array([1], np.int64)),
        _tensor("slice_zero", np.array([0], np.int64)),
        _tensor("heads_shape", np.array([0, 0, heads, head_dim], np.int64)),
        _tensor("merge_shape", np.array([0, 0, hidden], np.int64)),
        _tensor("mask_axes", np.array([1, 2], np.int64)),
        _tensor("one", np.float32(1.0)),
        _tensor("mask_fill", np.float32(-10000.0)),
        _tensor("attn_scale", np.float32(1.0 / math.sqrt(head_dim))),
        _tensor("sqrt2", np.float32(math.sqrt(2.0))),
        _tensor("half", np.float32(0.5)),
    ]
    nodes = [
        node("Gather", ["word_embeddings", "input_ids"], "word_emb"),
        node("Shape", ["input_ids"], "shape"),
        node("Gather", ["shape_out", "seq_axis"], "seq_len"),
        node("Slice", ["position_embeddings", "slice_zero", "seq_len_out", "seq_axis"],
             "pos_slice"),
        node("Add", ["word_emb_out", "pos_slice_out"], "pos_add"),
        node("LayerNormalization", ["pos_add_out", "ln_emb_scale", "ln_emb_bias"], "ln_emb",
             axis=-1, epsilon=1e-5),
        node("Cast", ["attention_mask"], "mask_cast", to=_FLOAT),
        node("Sub", ["one", "mask_cast_out"], "mask_invert"),
        node("Mul", ["mask_invert_out", "mask_fill"], "mask_bias"),
        node("Unsqueeze", ["mask_bias_out", "mask_axes"], "mask_unsqueeze"),
    ]
    for prefix in ("q", "k", "v"):
        weights, lin_nodes, out = linear(prefix, hidden, hidden, "ln_emb_out")
        inits += weights
        nodes += lin_nodes
        perm = [0, 2, 3, 1] if prefix == "k" else [0, 2, 1, 3]
        nodes += [node("Reshape", [out, "heads_shape"], f"{prefix}_reshape"),
                  node("Transpose", [f"{prefix}_reshape_out"], f"{prefix}_transpose", perm=perm)]
    nodes += [
        node("MatMul", ["q_transpose_out", "k_transpose_out"], "scores_matmul"),
        node("Mul", ["scores_matmul_out", "attn_scale"], "scores_scale"),
        node("Add", ["scores_scale_out", "mask_unsqueeze_out"], "scores_mask"),
        node("Softmax", ["scores_mask_out"], "softmax", axis=-1),
        node("MatMul", ["softmax_out", "v_transpose_out"], "context_matmul"),
        node("Transpose", ["context_matmul_out"], "context_transpose", perm=[0, 2, 1, 3]),
        node("Reshape", ["context_transpose_out", "merge_shape"], "context_reshape"),
    ]
    weights, lin_nodes, attn_out = linear("attn_out", hidden, hidden, "context_reshape_out")
    inits += weights + ln_params("ln_attn")
    nodes += lin_nodes + [
        node("Add", [attn_out, "ln_emb_out"], "attn_residual"),
        node("LayerNormalization", ["attn_residual_out", "ln_attn_scale", "ln_attn_bias"],
             "ln_attn", axis=-1, epsilon=1e-5),
    ]
    weights, lin_nodes, up = linear("ffn_up", hidden, ffn, "ln_attn_out")
    inits += weights
    nodes += lin_nodes + [
        node("Div", [up, "sqrt2"], "gelu_div"),
        node("Erf", ["gelu_div_out"], "gelu_erf"),
        node("Add", ["gelu_erf_out", "one"], "gelu_add"),
        node("Mul", [up, "gelu_add_out"], "gelu_mul"),
        node("Mul", ["gelu_mul_out", "half"], "gelu_half"),
    ]
    weights, lin_nodes, down = linear("ffn_down", ffn, hidden, "gelu_half_out")
    inits += weights + ln_params("ln_out")
    nodes += lin_nodes + [
        node("Add", [down, "ln_attn_out"], "ffn_residual"),
        helper.make_node("LayerNormalization", ["ffn_residual_out", "ln_out_scale",
                                                "ln_out_bias"],
                         ["last_hidden_state"], name="ln_out", axis=-1, epsilon=1e-5),
    ]
    graph = helper.make_graph(
        nodes, "transformer_block",
        [helper.make_tensor_value_info("input_ids", _INT64, ["B", seq]),
         helper.make_tensor_value_info("attention_mask", _INT64, ["B", seq])],
        [helper.make_tensor_value_info("last_hidden_state", _FLOAT, ["B", seq, hidden])],
        initializer=inits,
    )
    return _model(graph, opset, transformer_block.__doc__ or "")


def _conv1d(name: str, src: str, weight: str, bias: str, out: str) -> onnx.NodeProto:
    return helper.make_node("Conv", [src, weight, bias], [out], name=name,
                            kernel_shape=[3], pads=[1, 1])


def if_subgraph_model(opset: int = 17, *, seed: int = 0) -> onnx.ModelProto:
    """An If with Conv1d weights inside its branches: ``x`` [1,4,16], ``flag`` bool [] -> ``y``.

    then-branch (``then_branch``): then_conv (weights ``then_conv_W``/``then_conv_B`` are
    *subgraph initializers*) -> then_relu -> then_flag (Identity of the outer ``flag``) ->
    inner_if, whose then-branch runs inner_conv (subgraph initializers ``inner_conv_W/B``) and
    whose else-branch is inner_identity. else-branch (``else_branch``): else_conv (weights from
    the ``Constant`` nodes const_else_conv_W/B) -> else_relu. So y = inner_conv(relu(then_conv(x)))
    when flag, else relu(else_conv(x)). All convs are 4->4 channels, kernel 3, pad 1.
    """
    rng = np.random.default_rng(seed)

    def conv_weights() -> tuple[np.ndarray, np.ndarray]:
        return _he(rng, (4, 4, 3), 12), _small(rng, (4,))

    def out_info(name: str) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, _FLOAT, [1, 4, 16])

    then_w, then_b = conv_weights()
    inner_w, inner_b = conv_weights()
    else_w, else_b = conv_weights()

    inner_then = helper.make_graph(
        [_conv1d("inner_conv", "then_relu_out", "inner_conv_W", "inner_conv_B", "inner_then_out")],
        "inner_then_branch", [], [out_info("inner_then_out")],
        initializer=[_tensor("inner_conv_W", inner_w), _tensor("inner_conv_B", inner_b)],
    )
    inner_else = helper.make_graph(
        [helper.make_node("Identity", ["then_relu_out"], ["inner_else_out"],
                          name="inner_identity")],
        "inner_else_branch", [], [out_info("inner_else_out")],
    )
    then_branch = helper.make_graph(
        [_conv1d("then_conv", "x", "then_conv_W", "then_conv_B", "then_conv_out"),
         helper.make_node("Relu", ["then_conv_out"], ["then_relu_out"], name="then_relu"),
         helper.make_node("Identity", ["flag"], ["then_flag_out"], name="then_flag"),
         helper.make_node("If", ["then_flag_out"], ["then_out"], name="inner_if",
                          then_branch=inner_then, else_branch=inner_else)],
        "then_branch", [], [out_info("then_out")],
        initializer=[_tensor("then_conv_W", then_w), _tensor("then_conv_B", then_b)],
    )
    else_branch = helper.make_graph(
        [_const("else_conv_W", else_w), _const("else_conv_B", else_b),
         _conv1d("else_conv", "x", "else_conv_W", "else_conv_B", "else_conv_out"),
         helper.make_node("Relu", ["else_conv_out"], ["else_out"], name="else_relu")],
        "else_branch", [], [out_info("else_out")],
    )
    graph = helper.make_graph(
        [helper.make_node("If", ["flag"], ["y"], name="outer_if",
                          then_branch=then_branch, else_branch=else_branch)],
        "if_subgraph_model",
        [helper.make_tensor_value_info("x", _FLOAT, [1, 4, 16]),
         helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
        [out_info("y")],
    )
    return _model(graph, opset, if_subgraph_model.__doc__ or "")


def loop_model(opset: int = 17, *, seed: int = 0) -> onnx.ModelProto:
    """A Loop (``loop``) with trip count 3 over ``state = tanh(state @ W)``.

    Input ``x`` [1,8] is the initial state; output ``y`` [1,8] is the final state. The trip
    count is the int64 initializer ``trip_count``; the loop has no condition input. The body
    (``loop_body``) holds W as the ``Constant`` node const_body_W (output ``body_W``) and runs
    body_matmul -> body_tanh, passing its condition through body_cond (Identity).
    """
    rng = np.random.default_rng(seed)
    weight = (rng.standard_normal((8, 8)) * (1.5 / math.sqrt(8))).astype(np.float32)
    body = helper.make_graph(
        [_const("body_W", weight),
         helper.make_node("MatMul", ["state_in", "body_W"], ["body_matmul_out"],
                          name="body_matmul"),
         helper.make_node("Tanh", ["body_matmul_out"], ["state_out"], name="body_tanh"),
         helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond")],
        "loop_body",
        [helper.make_tensor_value_info("iteration", _INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("state_in", _FLOAT, [1, 8])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("state_out", _FLOAT, [1, 8])],
    )
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trip_count", "", "x"], ["y"], name="loop", body=body)],
        "loop_model",
        [helper.make_tensor_value_info("x", _FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", _FLOAT, [1, 8])],
        initializer=[_tensor("trip_count", np.int64(3))],
    )
    return _model(graph, opset, loop_model.__doc__ or "")


def constant_weights_cnn(opset: int = 13, *, seed: int = 0) -> onnx.ModelProto:
    """A tiny CNN whose weights are all ``Constant`` nodes, as paddle2onnx exports them.

    ``image`` [N,3,16,16] -> conv1(3->8, 3x3, pad 1) -> relu1 -> conv2(8->8, 3x3, pad 1) -> gap
    -> flatten -> gemm(8->10, transB=1) -> ``logits`` [N,10]. No initializers; six Constant
    nodes named const_<tensor> for conv1_W/B, conv2_W/B, fc_W/B.
    """
    rng = np.random.default_rng(seed)
    nodes = [
        _const("conv1_W", _he(rng, (8, 3, 3, 3), 27)),
        _const("conv1_B", _small(rng, (8,))),
        _const("conv2_W", _he(rng, (8, 8, 3, 3), 72)),
        _const("conv2_B", _small(rng, (8,))),
        _const("fc_W", _xavier(rng, (10, 8), 8)),
        _const("fc_B", _small(rng, (10,))),
        helper.make_node("Conv", ["image", "conv1_W", "conv1_B"], ["conv1_out"], name="conv1",
                         kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv1_out"], ["relu1_out"], name="relu1"),
        helper.make_node("Conv", ["relu1_out", "conv2_W", "conv2_B"], ["conv2_out"],
                         name="conv2", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["conv2_out"], ["gap_out"], name="gap"),
        helper.make_node("Flatten", ["gap_out"], ["flatten_out"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flatten_out", "fc_W", "fc_B"], ["logits"], name="gemm",
                         transB=1),
    ]
    graph = helper.make_graph(
        nodes, "constant_weights_cnn",
        [helper.make_tensor_value_info("image", _FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("logits", _FLOAT, ["N", 10])],
    )
    return _model(graph, opset, constant_weights_cnn.__doc__ or "")


def matmul_chain(opset: int = 13, n: int = 3, dim: int = 16, *, seed: int = 0) -> onnx.ModelProto:
    """A stack of n dense layers: ``x`` [B,dim] -> ``y`` [B,dim].

    Layer i (from 0) is matmul_i (weight ``fc_i_W`` [dim,dim]) -> add_i (bias ``fc_i_B``)
    -> relu_i; the last Relu writes ``y``.
    """
    if n < 1:
        raise ValueError(f"matmul_chain() needs n >= 1, got {n}")
    rng = np.random.default_rng(seed)
    inits: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    src = "x"
    for i in range(n):
        inits += [_tensor(f"fc_{i}_W", _he(rng, (dim, dim), dim)),
                  _tensor(f"fc_{i}_B", _small(rng, (dim,)))]
        out = "y" if i == n - 1 else f"relu_{i}_out"
        nodes += [
            helper.make_node("MatMul", [src, f"fc_{i}_W"], [f"matmul_{i}_out"], name=f"matmul_{i}"),
            helper.make_node("Add", [f"matmul_{i}_out", f"fc_{i}_B"], [f"add_{i}_out"],
                             name=f"add_{i}"),
            helper.make_node("Relu", [f"add_{i}_out"], [out], name=f"relu_{i}"),
        ]
        src = out
    graph = helper.make_graph(
        nodes, "matmul_chain",
        [helper.make_tensor_value_info("x", _FLOAT, ["B", dim])],
        [helper.make_tensor_value_info("y", _FLOAT, ["B", dim])],
        initializer=inits,
    )
    return _model(graph, opset, matmul_chain.__doc__ or "")


def old_opset_model(*, seed: int = 0) -> onnx.ModelProto:
    """Conv + Relu at opset 9, older than onnxquant supports.

    ``x`` [N,3,8,8] -> conv(3->4, 3x3, pad 1, bias) -> relu -> ``y`` [N,4,8,8].
    """
    rng = np.random.default_rng(seed)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "conv_W", "conv_B"], ["conv_out"], name="conv",
                          kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["conv_out"], ["y"], name="relu")],
        "old_opset_model",
        [helper.make_tensor_value_info("x", _FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", _FLOAT, ["N", 4, 8, 8])],
        initializer=[_tensor("conv_W", _he(rng, (4, 3, 3, 3), 27)),
                     _tensor("conv_B", _small(rng, (4,)))],
    )
    return _model(graph, 9, old_opset_model.__doc__ or "")


def model_with_shared_weight(opset: int = 17, *, seed: int = 0) -> onnx.ModelProto:
    """Two Convs reading the same weight initializer ``shared_W`` [4,4,3,3].

    ``x`` [N,4,8,8] -> conv_a(shared_W, conv_a_B) -> relu_a -> conv_b(shared_W, conv_b_B)
    -> ``y`` [N,4,8,8]. Both convs have pad 1.
    """
    rng = np.random.default_rng(seed)
    conv = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "shared_W", "conv_a_B"], ["conv_a_out"], name="conv_a",
                          **conv),
         helper.make_node("Relu", ["conv_a_out"], ["relu_a_out"], name="relu_a"),
         helper.make_node("Conv", ["relu_a_out", "shared_W", "conv_b_B"], ["y"], name="conv_b",
                          **conv)],
        "model_with_shared_weight",
        [helper.make_tensor_value_info("x", _FLOAT, ["N", 4, 8, 8])],
        [helper.make_tensor_value_info("y", _FLOAT, ["N", 4, 8, 8])],
        initializer=[_tensor("shared_W", _he(rng, (4, 4, 3, 3), 36)),
                     _tensor("conv_a_B", _small(rng, (4,))),
                     _tensor("conv_b_B", _small(rng, (4,)))],
    )
    return _model(graph, opset, model_with_shared_weight.__doc__ or "")
