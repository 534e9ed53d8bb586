"""Dynamic quantization of LSTM, Attention and EmbedLayerNormalization into contrib operators.

Each rewrite is called directly on a small model built here, the result is run in onnxruntime
and compared with the float model (SQNR), and the emitted graph is checked node by node.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

from onnxquant.core.qtypes import INT4, INT8, UINT8
from onnxquant.dynamic import contrib_ops
from onnxquant.dynamic.config import DynamicQuantConfig

MS = "com.microsoft"
I32, F32 = ir.DataType.INT32, ir.DataType.FLOAT


# --------------------------------------------------------------------------- helpers


def _model(nodes, inits, inputs, outputs) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", inputs, outputs, [numpy_helper.from_array(a, n) for n, a in inits.items()])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=9)


def _vi(name: str, elem: int, shape=None):
    return helper.make_tensor_value_info(name, elem, shape)


def _namer(graph: ir.Graph):
    used = {v.name for v in graph.inputs} | set(graph.initializers)
    for node in graph:
        used.add(node.name)
        used.update(v.name for v in node.outputs)

    def unique(stem: str) -> str:
        name, i = stem, 1
        while name in used:
            name, i = f"{stem}_{i}", i + 1
        used.add(name)
        return name

    return unique


def _rewrite(proto: onnx.ModelProto, fn, config=None, op_type=None):
    """Run ``fn`` on the (single) node of type ``op_type``; return (changed, note, model)."""
    model = ir.serde.deserialize_model(proto)
    graph = model.graph
    node = next(n for n in graph if op_type is None or n.op_type == op_type)
    changed, note = fn(graph, node, config or DynamicQuantConfig(), _namer(graph))
    return changed, note, model


def _run(model, feeds: dict) -> list[np.ndarray]:
    proto = model if isinstance(model, onnx.ModelProto) else ir.serde.serialize_model(model)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(proto.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def sqnr(ref: np.ndarray, got: np.ndarray) -> float:
    ref64 = ref.astype(np.float64)
    noise = float(np.sum((ref64 - got) ** 2))
    return float("inf") if noise == 0 else float(10 * np.log10(np.sum(ref64**2) / noise))


def _ops(model: ir.Model) -> list[tuple[str, str]]:
    return [(n.domain, n.op_type) for n in model.graph]


def _untouched(proto: onnx.ModelProto, fn, config=None, op_type=None) -> str:
    changed, reason, model = _rewrite(proto, fn, config, op_type)
    assert not changed
    after = ir.serde.serialize_model(model)
    assert after.graph.SerializeToString() == ir.serde.serialize_model(
        ir.serde.deserialize_model(proto)).graph.SerializeToString()
    return reason


# --------------------------------------------------------------------------- LSTM

S, B, K, H = 5, 3, 6, 8


@dataclasses.dataclass
class LstmCase:
    direction: str = "forward"
    states: bool = False
    seq_lens: bool = False
    layout: int = 0
    peephole: bool = False


def _lstm(case: LstmCase, seed: int = 0, w_as_input: bool = False) -> tuple[onnx.ModelProto, dict]:
    rng = np.random.default_rng(seed)
    dirs = 2 if case.direction == "bidirectional" else 1
    inits = {
        "W": (rng.standard_normal((dirs, 4 * H, K)) * 0.4).astype(np.float32),
        "R": (rng.standard_normal((dirs, 4 * H, H)) * 0.3).astype(np.float32),
        "B": (rng.standard_normal((dirs, 8 * H)) * 0.1).astype(np.float32),
    }
    if case.peephole:
        inits["P"] = (rng.standard_normal((dirs, 3 * H)) * 0.1).astype(np.float32)
    x_shape = [B, S, K] if case.layout else [S, B, K]
    h_shape = [B, dirs, H] if case.layout else [dirs, B, H]
    feeds = {"X": rng.standard_normal(x_shape).astype(np.float32)}
    inputs = [_vi("X", TP.FLOAT, x_shape)]
    names = ["X", "W", "R", "B", "", "", "", "P" if case.peephole else ""]
    if case.seq_lens:
        names[4] = "seq"
        inputs.append(_vi("seq", TP.INT32, [B]))
        feeds["seq"] = np.array([S, 2, 4][:B], np.int32)
    if case.states:
        names[5], names[6] = "h0", "c0"
        for n in ("h0", "c0"):
            inputs.append(_vi(n, TP.FLOAT, h_shape))
            feeds[n] = (rng.standard_normal(h_shape) * 0.5).astype(np.float32)
    if w_as_input:
        inputs.append(_vi("W", TP.FLOAT, list(inits["W"].shape)))
    while names[-1] == "":
        names.pop()
    attrs = {"hidden_size": H, "direction": case.direction}
    if case.layout:
        attrs["layout"] = 1
    node = helper.make_node("LSTM", names, ["Y", "Y_h", "Y_c"], name="lstm", **attrs)
    outputs = [_vi(n, TP.FLOAT) for n in ("Y", "Y_h", "Y_c")]
    return _model([node], inits, inputs, outputs), feeds


def _batch_first_reference(case: LstmCase, feeds: dict) -> list[np.ndarray]:
    """Float outputs of a layout=1 LSTM, computed by the equivalent layout=0 model."""
    seq_first = dataclasses.replace(case, layout=0)
    proto, _ = _lstm(seq_first)
    f = {"X": feeds["X"].transpose(1, 0, 2)}
    for n in ("h0", "c0", "seq"):
        if n in feeds:
            f[n] = feeds[n] if n == "seq" else feeds[n].transpose(1, 0, 2)
    y, yh, yc = _run(proto, f)
    return [y.transpose(2, 0, 1, 3), yh.transpose(1, 0, 2), yc.transpose(1, 0, 2)]


LSTM_CASES = {
    "forward": LstmCase(),
    "forward_states_seqlens": LstmCase(states=True, seq_lens=True),
    "reverse_peephole": LstmCase(direction="reverse", peephole=True),
    "bidirectional": LstmCase(direction="bidirectional"),
    "bidirectional_states_seqlens": LstmCase(direction="bidirectional", states=True,
                                             seq_lens=True),
    "batch_first_bidirectional": LstmCase(direction="bidirectional", states=True, layout=1),
}


@pytest.mark.parametrize("per_channel", [False, True], ids=["per_dir", "per_channel"])
@pytest.mark.parametrize("name", list(LSTM_CASES))
def test_lstm_matches_float(name: str, per_channel: bool) -> None:
    case = LSTM_CASES[name]
    proto, feeds = _lstm(case)
    config = DynamicQuantConfig(per_channel=per_channel)
    changed, note, model = _rewrite(proto, contrib_ops.rewrite_lstm, config, "LSTM")
    assert changed, note
    ref = _batch_first_reference(case, feeds) if case.layout else _run(proto, feeds)
    got = _run(model, feeds)
    for r, g in zip(ref, got, strict=True):
        assert r.shape == g.shape
        assert sqnr(r, g) >= 30.0
    # sequence_lens zeroes Y past each sequence's end exactly as the float op does
    if case.seq_lens:
        np.testing.assert_array_equal(got[0][2:, :, 1], 0.0)


def test_lstm_graph_structure() -> None:
    proto, _ = _lstm(LstmCase(direction="bidirectional", states=True, seq_lens=True))
    config = DynamicQuantConfig(per_channel=True)
    changed, _, model = _rewrite(proto, contrib_ops.rewrite_lstm, config, "LSTM")
    assert changed
    assert _ops(model) == [(MS, "DynamicQuantizeLSTM")]
    node = next(iter(model.graph))
    assert [v.name if v is not None else "" for v in node.inputs[:8:4]] == ["X", "seq"]
    assert [v.name for v in node.inputs[5:7]] == ["h0", "c0"]
    assert node.inputs[3].name == "B" and node.inputs[7] is None
    types = [v.dtype for v in node.inputs[1:3]] + [v.dtype for v in node.inputs[8:12]]
    assert types == [ir.DataType.INT8, ir.DataType.INT8, F32, ir.DataType.INT8, F32,
                     ir.DataType.INT8]
    assert [v.name for v in node.outputs] == ["Y", "Y_h", "Y_c"]
    assert node.attributes["direction"].value == "bidirectional"
    assert node.attributes["hidden_size"].value == H
    # W, R transposed to [dirs, K, 4H]; per-channel params [dirs, 4H]; float W/R removed
    assert node.inputs[1].shape.dims == (2, K, 4 * H)
    assert node.inputs[2].shape.dims == (2, H, 4 * H)
    assert node.inputs[8].shape.dims == (2, 4 * H)
    assert "W" not in model.graph.initializers and "R" not in model.graph.initializers
    assert model.opset_imports[MS] == 1


@pytest.mark.parametrize("per_channel", [False, True])
def test_lstm_stored_weights_dequantize_to_float(per_channel: bool) -> None:
    proto, _ = _lstm(LstmCase(direction="bidirectional"))
    w = numpy_helper.to_array(proto.graph.initializer[0])
    config = DynamicQuantConfig(per_channel=per_channel)
    _, _, model = _rewrite(proto, contrib_ops.rewrite_lstm, config, "LSTM")
    node = next(iter(model.graph))
    wq, scale, zp = (node.inputs[i].const_value.numpy() for i in (1, 8, 9))
    assert zp.dtype == np.int8 and np.all(zp == 0)
    scale_b = scale[:, None, :] if per_channel else scale[:, None, None]
    deq = (wq.astype(np.float32) * scale_b).transpose(0, 2, 1)
    assert np.all(np.abs(deq - w) <= scale_b.transpose(0, 2, 1) / 2 + 1e-7)
    expected = np.abs(w).max(axis=2) / 127 if per_channel else np.abs(w).max(axis=(1, 2)) / 127
    np.testing.assert_allclose(scale, expected, rtol=1e-6)


@pytest.mark.parametrize(
    ("config", "zero_points"),
    [(DynamicQuantConfig(weight_type=UINT8), "asymmetric"),
     (DynamicQuantConfig(weight_type=INT8, weight_symmetric=False), "asymmetric"),
     (DynamicQuantConfig(weight_type=UINT8, per_channel=True), 128)],
    ids=["uint8_per_dir", "int8_asym_per_dir", "uint8_sym_per_channel"],
)
def test_lstm_other_weight_grids(config: DynamicQuantConfig, zero_points) -> None:
    proto, feeds = _lstm(LstmCase(direction="bidirectional", states=True))
    changed, note, model = _rewrite(proto, contrib_ops.rewrite_lstm, config, "LSTM")
    assert changed and str(config.weight_type) in note
    node = next(iter(model.graph))
    assert node.inputs[1].dtype == config.weight_type.onnx_dtype
    for zp in (node.inputs[9].const_value.numpy(), node.inputs[11].const_value.numpy()):
        if zero_points == "asymmetric":
            assert zp.shape == (2,) and np.any(zp != (0 if config.weight_type.signed else 128))
        else:
            assert zp.shape == (2, 4 * H) and np.all(zp == zero_points)
    for r, g in zip(_run(proto, feeds), _run(model, feeds), strict=True):
        assert sqnr(r, g) >= 30.0


def test_lstm_shared_weight_is_kept() -> None:
    proto, feeds = _lstm(LstmCase())
    proto.graph.node.append(helper.make_node("Identity", ["W"], ["W_copy"]))
    proto.graph.output.append(_vi("W_copy", TP.FLOAT))
    changed, _, model = _rewrite(proto, contrib_ops.rewrite_lstm, op_type="LSTM")
    assert changed
    assert "W" in model.graph.initializers and "R" not in model.graph.initializers
    np.testing.assert_array_equal(_run(model, feeds)[3], numpy_helper.to_array(
        proto.graph.initializer[0]))


def test_lstm_unused_optional_output() -> None:
    proto, feeds = _lstm(LstmCase())
    proto.graph.node[0].output[:] = ["", "Y_h"]
    del proto.graph.output[2]
    del proto.graph.output[0]
    changed, _, model = _rewrite(proto, contrib_ops.rewrite_lstm, op_type="LSTM")
    assert changed
    assert [o.name for o in model.graph.outputs] == ["Y_h"]
    assert sqnr(_run(proto, feeds)[0], _run(model, feeds)[0]) >= 30.0


@pytest.mark.parametrize(
    ("mutate", "config", "expected"),
    [
        ("w_input", None, "graph input"),
        (None, DynamicQuantConfig(per_channel=True, weight_symmetric=False), "one zero point"),
        (None, DynamicQuantConfig(weight_type=UINT8, per_channel=True, weight_symmetric=False),
         "one zero point"),
        (None, DynamicQuantConfig(weight_type=INT8, reduce_range=True, per_channel=True,
                                  weight_symmetric=False), "one zero point"),
        (None, DynamicQuantConfig(weight_type=INT4), "int8 or uint8"),
        ("r_computed", None, "not a constant"),
        ("attr", None, "not supported"),
        ("direction", None, "direction(s)"),
    ],
)
def test_lstm_refusals(mutate, config, expected: str) -> None:
    proto, _ = _lstm(LstmCase(), w_as_input=mutate == "w_input")
    if mutate == "r_computed":
        proto.graph.node.insert(0, helper.make_node("Identity", ["R"], ["R2"]))
        proto.graph.node[1].input[2] = "R2"
    if mutate == "attr":
        proto.graph.node[0].attribute.append(helper.make_attribute("future_attr", 1))
    if mutate == "direction":
        attr = next(a for a in proto.graph.node[0].attribute if a.name == "direction")
        attr.s = b"bidirectional"
    reason = _untouched(proto, contrib_ops.rewrite_lstm, config, "LSTM")
    assert expected in reason


# --------------------------------------------------------------------------- Attention

AB, AS, D, NH = 2, 6, 16, 4


def _attention(mask: str | None = None, bias: bool = True, seed: int = 1, past: bool = False,
               **attrs) -> tuple[onnx.ModelProto, dict]:
    rng = np.random.default_rng(seed)
    inits = {"Wqkv": (rng.standard_normal((D, 3 * D)) * 0.3).astype(np.float32)}
    if bias:
        inits["Bqkv"] = (rng.standard_normal(3 * D) * 0.1).astype(np.float32)
    feeds = {"x": rng.standard_normal((AB, AS, D)).astype(np.float32)}
    inputs = [_vi("x", TP.FLOAT, [AB, AS, D])]
    names = ["x", "Wqkv", "Bqkv" if bias else ""]
    if mask is not None:
        names.append("mask")
        if mask == "index":  # right padding: valid lengths
            feeds["mask"] = np.array([AS, 3], np.int32)
        else:  # raw 0/1 mask (batch, total_sequence_length)
            m = np.ones((AB, AS), np.int32)
            m[1, 4:] = 0
            feeds["mask"] = m
        inputs.append(_vi("mask", TP.INT32, list(feeds["mask"].shape)))
    outputs = ["y"]
    if past:
        names += [""] * (4 - len(names)) + ["past"]
        feeds["past"] = rng.standard_normal((2, AB, NH, 3, D // NH)).astype(np.float32)
        inputs.append(_vi("past", TP.FLOAT, list(feeds["past"].shape)))
        outputs.append("present")
    node = helper.make_node("Attention", names, outputs, name="attn", domain=MS,
                            num_heads=NH, **attrs)
    return _model([node], inits, inputs, [_vi(o, TP.FLOAT) for o in outputs]), feeds


ATTENTION_CASES = {
    "no_mask": {},
    "mask_index": {"mask": "index"},
    "raw_mask": {"mask": "raw"},
    "no_bias": {"bias": False},
    "past_unidirectional": {"past": True, "unidirectional": 1},
}


@pytest.mark.parametrize(
    "config",
    [DynamicQuantConfig(), DynamicQuantConfig(per_channel=True),
     DynamicQuantConfig(weight_type=UINT8, per_channel=True)],
    ids=["int8", "int8_per_column", "uint8_per_column"],
)
@pytest.mark.parametrize("name", list(ATTENTION_CASES))
def test_attention_matches_float(name: str, config: DynamicQuantConfig) -> None:
    proto, feeds = _attention(**ATTENTION_CASES[name])
    changed, note, model = _rewrite(proto, contrib_ops.rewrite_attention, config)
    assert changed, note
    ref, got = _run(proto, feeds), _run(model, feeds)
    assert len(ref) == len(got)
    for r, g in zip(ref, got, strict=True):
        assert r.shape == g.shape
        assert sqnr(r, g) >= 30.0


def test_attention_graph_structure() -> None:
    proto, _ = _attention(mask="index")
    config = DynamicQuantConfig(per_channel=True)
    changed, _, model = _rewrite(proto, contrib_ops.rewrite_attention, config)
    assert changed
    assert _ops(model) == [("", "DynamicQuantizeLinear"), (MS, "QAttention")]
    dql, qatt = list(model.graph)
    assert dql.inputs[0].name == "x"
    ins = qatt.inputs
    # input order: input, weight, bias, input_scale, weight_scale, mask, input_zp, weight_zp
    assert ins[0] is dql.outputs[0] and ins[3] is dql.outputs[1] and ins[6] is dql.outputs[2]
    assert ins[2].name == "Bqkv" and ins[5].name == "mask"
    assert [v.dtype for v in ins[:8]] == [ir.DataType.UINT8, ir.DataType.INT8, F32, F32, F32,
                                          I32, ir.DataType.UINT8, ir.DataType.INT8]
    assert ins[1].shape.dims == (D, 3 * D) and ins[4].shape.dims == (3 * D,)
    assert qatt.attributes["num_heads"].value == NH
    assert qatt.outputs[0].name == "y"
    assert "Wqkv" not in model.graph.initializers


def test_attention_reduce_range_weights() -> None:
    proto, feeds = _attention()
    config = DynamicQuantConfig(reduce_range=True)
    _, _, model = _rewrite(proto, contrib_ops.rewrite_attention, config)
    wq = next(n for n in model.graph if n.op_type == "QAttention").inputs[1].const_value.numpy()
    assert wq.min() >= -63 and wq.max() <= 63 and np.abs(wq).max() == 63
    assert sqnr(_run(proto, feeds)[0], _run(model, feeds)[0]) >= 25.0


@pytest.mark.parametrize(
    ("kwargs", "config", "expected"),
    [
        ({"qkv_hidden_sizes": [D, D, D]}, None, "qkv_hidden_sizes"),
        ({"do_rotary": 1}, None, "do_rotary"),
        ({}, DynamicQuantConfig(weight_type=INT4), "int8 or uint8"),
        ({"w_input": True}, None, "graph input"),
        ({"attention_bias": True}, None, "attention_bias"),
    ],
)
def test_attention_refusals(kwargs: dict, config, expected: str) -> None:
    w_input = kwargs.pop("w_input", False)
    attention_bias = kwargs.pop("attention_bias", False)
    proto, _ = _attention(**kwargs)
    if w_input:
        proto.graph.input.append(_vi("Wqkv", TP.FLOAT, [D, 3 * D]))
    if attention_bias:
        proto.graph.node[0].input[:] = ["x", "Wqkv", "Bqkv", "", "", "ab"]
        proto.graph.input.append(_vi("ab", TP.FLOAT, [AB, NH, AS, AS]))
    assert expected in _untouched(proto, contrib_ops.rewrite_attention, config)


def test_attention_float16_refused() -> None:
    proto, _ = _attention()
    proto.graph.input[0].type.tensor_type.elem_type = TP.FLOAT16
    assert "float32" in _untouched(proto, contrib_ops.rewrite_attention)


# ------------------------------------------------------------------ EmbedLayerNormalization

V, P, SEG = 30, 10, 2
EB, ES, ED = 2, 7, 16


def _embed(segment: bool = True, mask: bool = True, outputs: int = 2,
           position_ids: bool = False, seed: int = 2) -> tuple[onnx.ModelProto, dict]:
    rng = np.random.default_rng(seed)
    inits = {
        "word": (rng.standard_normal((V, ED)) * 0.5).astype(np.float32),
        "pos": (rng.standard_normal((P, ED)) * 0.2).astype(np.float32),
        "gamma": (1.0 + rng.standard_normal(ED) * 0.1).astype(np.float32),
        "beta": (rng.standard_normal(ED) * 0.1).astype(np.float32),
    }
    feeds = {"ids": rng.integers(0, V, (EB, ES)).astype(np.int32)}
    inputs = [_vi("ids", TP.INT32, [EB, ES])]
    names = ["ids", "", "word", "pos", "", "gamma", "beta"]
    if segment:
        inits["seg"] = (rng.standard_normal((SEG, ED)) * 0.2).astype(np.float32)
        names[1], names[4] = "sids", "seg"
        feeds["sids"] = rng.integers(0, SEG, (EB, ES)).astype(np.int32)
        inputs.append(_vi("sids", TP.INT32, [EB, ES]))
    if mask:
        names.append("mask")
        m = np.ones((EB, ES), np.int32)
        m[1, 5:] = 0
        feeds["mask"] = m
        inputs.append(_vi("mask", TP.INT32, [EB, ES]))
    if position_ids:
        names += [""] * (8 - len(names)) + ["pids"]
        inputs.append(_vi("pids", TP.INT32, [EB, ES]))
        feeds["pids"] = np.tile(np.arange(ES, dtype=np.int32), (EB, 1))
    outs = ["out", "mask_index", "emb_sum"][:outputs]
    attrs = {"mask_index_type": 0} if outputs == 1 else {}  # else ORT's float op wants 2 outputs
    node = helper.make_node("EmbedLayerNormalization", names, outs, name="emb", domain=MS,
                            epsilon=1e-12, **attrs)
    out_vis = [_vi("out", TP.FLOAT)] + [_vi(o, TP.INT32 if o == "mask_index" else TP.FLOAT)
                                        for o in outs[1:]]
    return _model([node], inits, inputs, out_vis), feeds


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"segment": False}, {"mask": False}, {"segment": False, "mask": False, "outputs": 1}],
    ids=["segment_mask", "no_segment", "no_mask", "one_output"],
)
def test_embed_layer_norm_matches_float(kwargs: dict) -> None:
    proto, feeds = _embed(**kwargs)
    changed, note, model = _rewrite(proto, contrib_ops.rewrite_embed_layer_norm)
    assert changed, note
    ref, got = _run(proto, feeds), _run(model, feeds)
    assert len(got) == len(ref)
    assert sqnr(ref[0], got[0]) >= 30.0
    if len(ref) > 1:
        np.testing.assert_array_equal(ref[1], got[1])


def test_embed_layer_norm_graph_structure() -> None:
    proto, _ = _embed()
    changed, _, model = _rewrite(proto, contrib_ops.rewrite_embed_layer_norm)
    assert changed
    assert _ops(model) == [(MS, "QEmbedLayerNormalization")]
    node = next(iter(model.graph))
    ins = node.inputs
    assert len(ins) == 18
    assert [ins[i].name for i in (0, 1, 7)] == ["ids", "sids", "mask"]
    assert [v.dtype for v in ins[2:7]] == [ir.DataType.UINT8] * 5
    assert [v.dtype for v in ins[8:13]] == [F32] * 5
    assert [v.dtype for v in ins[13:18]] == [ir.DataType.UINT8] * 5
    assert all(v.shape.dims == () for v in ins[8:18])
    # order: word, position, segment, gamma, beta in all three groups
    originals = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    for slot, name in enumerate(["word", "pos", "seg", "gamma", "beta"]):
        q, s, z = (ins[g + slot].const_value.numpy() for g in (2, 8, 13))
        deq = (q.astype(np.float32) - z.astype(np.float32)) * s
        assert np.all(np.abs(deq - originals[name]) <= s / 2 + 1e-7), name
        assert name not in model.graph.initializers
    assert node.attributes["epsilon"].value == pytest.approx(1e-12)
    assert [o.name for o in node.outputs] == ["out", "mask_index"]


def test_embed_layer_norm_unused_embedding_sum_is_dropped() -> None:
    proto, feeds = _embed(outputs=3)
    del proto.graph.output[2]
    changed, _, model = _rewrite(proto, contrib_ops.rewrite_embed_layer_norm)
    assert changed
    assert sqnr(_run(proto, feeds)[0], _run(model, feeds)[0]) >= 30.0


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [({"outputs": 3}, "embedding_sum"), ({"position_ids": True}, "position_ids"),
     ({"gamma_input": True}, "graph input")],
)
def test_embed_layer_norm_refusals(kwargs: dict, expected: str) -> None:
    gamma_input = kwargs.pop("gamma_input", False)
    proto, _ = _embed(**kwargs)
    if gamma_input:
        proto.graph.input.append(_vi("gamma", TP.FLOAT, [ED]))
    assert expected in _untouched(proto, contrib_ops.rewrite_embed_layer_norm)


def test_public_api() -> None:
    from onnxquant.dynamic import attention, embed, lstm

    assert contrib_ops.__all__ == ["rewrite_lstm", "rewrite_attention", "rewrite_embed_layer_norm"]
    assert contrib_ops.rewrite_lstm is lstm.rewrite_lstm
    assert contrib_ops.rewrite_attention is attention.rewrite_attention
    assert contrib_ops.rewrite_embed_layer_norm is embed.rewrite_embed_layer_norm
    for module in (lstm, attention, embed):
        assert len(module.__all__) == 1
