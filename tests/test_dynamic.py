"""Dynamic quantization, QOperator form: graph structure, numerics and bad inputs.

What is checked: the exact nodes each rewrite leaves (DynamicQuantizeLinear, MatMulInteger,
ConvInteger, Cast, Mul, Add, Gather + DequantizeLinear) and the element type behind every input
of the integer nodes; that onnxruntime fuses the MatMul pattern into DynamicQuantizeMatMul; the
stored weights (transposed for Gemm transB, 7-bit with reduce_range, per-channel scales and zero
points); the outputs against the float model (SQNR); Gemm attribute variants, Conv with and
without bias, Constant-node weights, If/Loop bodies, Gather tables, matmul_const_b_only, the
per-tensor SQNR fallback to per-channel, node selection, and that bad inputs write nothing.
"""

from __future__ import annotations

import collections
import dataclasses
from pathlib import Path

import model_zoo as zoo
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxquant.core.errors import ModelLoadError, OutputPathError
from onnxquant.core.qtypes import INT8, UINT8
from onnxquant.dynamic.api import DynamicQuantizationResult, quantize_dynamic
from onnxquant.dynamic.config import DynamicQuantConfig
from onnxquant.dynamic.runtime import RuntimeSupport, probe_runtime

U8, I8, I32, F32 = ir.DataType.UINT8, ir.DataType.INT8, ir.DataType.INT32, ir.DataType.FLOAT
DQL, MMI = "DynamicQuantizeLinear", "MatMulInteger"


@dataclasses.dataclass
class Quantized:
    path: Path
    model: ir.Model
    result: DynamicQuantizationResult

    def nodes(self, op_type: str | None = None) -> list[ir.Node]:
        return [n for n in ir.traversal.RecursiveGraphIterator(self.model.graph)
                if op_type is None or n.op_type == op_type]

    def ops(self) -> collections.Counter:
        return collections.Counter(n.op_type for n in self.nodes())

    def decision(self, name: str):
        (found,) = [d for d in self.result.decisions if d.name == name]
        return found


def quantize(model: onnx.ModelProto, tmp_path: Path, **config) -> Quantized:
    path = tmp_path / "quantized.onnx"
    result = quantize_dynamic(model, path, DynamicQuantConfig(**config))
    onnx.checker.check_model(onnx.load(path), full_check=True)
    return Quantized(path, ir.load(path), result)


def worst_sqnr(model: onnx.ModelProto, path: Path, n: int = 3, **kw) -> float:
    feeds = zoo.random_feeds(model, n, **kw)
    ref, got = zoo.run(model, feeds), zoo.run(str(path), feeds)
    return min(zoo.sqnr_db(a, b) for r, g in zip(ref, got, strict=True)
               for a, b in zip(r, g, strict=True))


def dtypes(node: ir.Node) -> list[ir.DataType | None]:
    return [v.dtype if v is not None else None for v in node.inputs]


def const(value: ir.Value) -> np.ndarray:
    assert value.const_value is not None, f"{value.name} is not an initializer"
    return value.const_value.numpy()


# -- small models --------------------------------------------------------------------------------
def gemm_model(*, trans_a: int = 0, trans_b: int = 0, alpha: float = 1.0, beta: float = 1.0,
               bias: str | None = "vector", seed: int = 0) -> onnx.ModelProto:
    """``x`` -> Gemm(x, W, C) -> ``y`` with M=4 (batch), K=16, N=8."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((8, 16) if trans_b else (16, 8)) / 4).astype(np.float32)
    inits = [numpy_helper.from_array(w, "W")]
    inputs = ["x", "W"]
    if bias is not None:
        shape = {"vector": (8,), "matrix": (4, 8), "scalar": ()}[bias]
        inits.append(numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), "C"))
        inputs.append("C")
    node = helper.make_node("Gemm", inputs, ["y"], name="gemm", transA=trans_a, transB=trans_b,
                            alpha=alpha, beta=beta)
    x_shape = [16, 4] if trans_a else [4, 16]
    graph = helper.make_graph([node], "gemm_model",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])],
                              initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)],
                             ir_version=zoo.IR_VERSION)


def conv_model(*, bias: bool, outlier: bool = False, seed: int = 0) -> onnx.ModelProto:
    """``x`` [N,4,8,8] -> Conv(4->6, 3x3, pad 1[, bias]) -> Relu -> ``y``."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((6, 4, 3, 3)) / 6).astype(np.float32)
    if outlier:
        w[0] *= 40.0  # one loud channel: per-tensor quantization drowns the others
    inits = [numpy_helper.from_array(w, "W")]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(6).astype(np.float32), "B"))
    nodes = [helper.make_node("Conv", ["x", "W", "B"] if bias else ["x", "W"], ["c"],
                              name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "conv_model",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                             ["N", 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                             ["N", 6, 8, 8])],
                              initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)],
                             ir_version=zoo.IR_VERSION)


# -- MatMul ------------------------------------------------------------------------------------
def test_matmul_structure_and_types(tmp_path):
    model = zoo.matmul_chain()
    q = quantize(model, tmp_path)
    ops = q.ops()
    assert ops[DQL] == 3 and ops[MMI] == 3 and ops["Cast"] == 3 and ops["Mul"] == 6
    assert ops["MatMul"] == 0
    for mmi in q.nodes(MMI):
        assert dtypes(mmi) == [U8, I8, U8, I8]
        dql = mmi.inputs[0].producer()
        assert dql.op_type == DQL and mmi.inputs[2] is dql.outputs[2]
        # The scale product is Mul(A scale, W scale): the order onnxruntime's fusion expects.
        (cast, _), = mmi.outputs[0].uses()
        (out_mul, _), = cast.outputs[0].uses()
        scales = [v for v in out_mul.inputs if v is not cast.outputs[0]][0].producer()
        assert scales.op_type == "Mul" and scales.inputs[0] is dql.outputs[1]
        assert const(scales.inputs[1]).shape == ()
        assert const(mmi.inputs[3]).shape == ()
    assert all(d.action == "quantized" for d in q.result.decisions)
    assert worst_sqnr(model, q.path) > 30


def test_matmul_pattern_fuses_in_onnxruntime(tmp_path):
    q = quantize(zoo.matmul_chain(), tmp_path)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(q.path), options, providers=["CPUExecutionProvider"])
    ops = collections.Counter(n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node)
    assert ops["DynamicQuantizeMatMul"] == 3
    assert ops[MMI] == 0 and ops[DQL] == 0


def test_matmul_per_channel_and_reduce_range(tmp_path):
    model = zoo.matmul_chain(dim=16)
    q = quantize(model, tmp_path, per_channel=True, reduce_range=True)
    for mmi in q.nodes(MMI):
        w, zp = const(mmi.inputs[1]), const(mmi.inputs[3])
        assert w.dtype == np.int8 and zp.shape == (16,) and not zp.any()
        assert w.min() >= -64 and w.max() <= 63
        assert np.abs(w).max(axis=0).min() >= 62  # every column uses its own full 7-bit grid
    assert worst_sqnr(model, q.path) > 25


def test_uint8_weights(tmp_path):
    model = zoo.matmul_chain()
    q = quantize(model, tmp_path, weight_type=UINT8)  # unsigned: asymmetric by default
    for mmi in q.nodes(MMI):
        assert dtypes(mmi) == [U8, U8, U8, U8]
        w = const(mmi.inputs[1])
        assert w.min() == 0 and w.max() == 255  # the whole grid is used
    assert worst_sqnr(model, q.path) > 30
    q = quantize(model, tmp_path, weight_type=UINT8, weight_symmetric=True)
    for mmi in q.nodes(MMI):
        assert const(mmi.inputs[3]) == 128  # symmetric uint8: the midpoint
    assert worst_sqnr(model, q.path) > 30


def test_per_tensor_sqnr_fallback_to_per_channel(tmp_path):
    model = zoo.matmul_chain(n=1, dim=64)
    weight = model.graph.initializer[0]
    w = numpy_helper.to_array(weight).copy()
    w[5, 0] *= 200.0  # one outlier: per tensor, every other column loses its resolution
    weight.CopyFrom(numpy_helper.from_array(w, weight.name))
    q = quantize(model, tmp_path)
    (mmi,) = q.nodes(MMI)
    assert const(mmi.inputs[3]).shape == (64,)
    assert "per-tensor SQNR" in q.decision("matmul_0").reason
    assert worst_sqnr(model, q.path) > 30
    q = quantize(model, tmp_path, per_channel_fallback_db=None)
    (mmi,) = q.nodes(MMI)
    assert const(mmi.inputs[3]).shape == ()


def test_matmul_const_b_only(tmp_path):
    model = zoo.transformer_block()
    q = quantize(model, tmp_path)
    assert q.decision("scores_matmul").action == "float"
    assert "matmul_const_b_only" in q.decision("scores_matmul").reason
    assert q.ops()["MatMul"] == 2 and q.ops()[MMI] == 6
    q = quantize(model, tmp_path, matmul_const_b_only=False)
    assert q.ops()["MatMul"] == 0 and q.ops()[MMI] == 8
    scores = [n for n in q.nodes(MMI) if n.name.startswith("scores_matmul")][0]
    assert [v.producer().op_type for v in scores.inputs] == [DQL] * 4
    assert dtypes(scores) == [U8, U8, U8, U8]
    assert worst_sqnr(model, q.path) > 20


# -- Gemm --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [
    {}, {"trans_b": 1}, {"trans_a": 1}, {"trans_a": 1, "trans_b": 1},
    {"alpha": 0.5, "beta": 2.0}, {"alpha": -1.5, "trans_b": 1}, {"bias": None},
    {"bias": "matrix", "beta": 0.25}, {"bias": "scalar"}, {"beta": 0.0},
], ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "plain")
def test_gemm_variants(tmp_path, kwargs):
    model = gemm_model(**kwargs)
    q = quantize(model, tmp_path)
    ops = q.ops()
    assert ops["Gemm"] == 0 and ops[MMI] == 1 and ops[DQL] == 1
    assert ops["Transpose"] == kwargs.get("trans_a", 0)
    has_bias = kwargs.get("bias", "vector") is not None and kwargs.get("beta", 1.0) != 0.0
    assert ops["Add"] == int(has_bias)
    (mmi,) = q.nodes(MMI)
    assert const(mmi.inputs[1]).shape == (16, 8)  # stored [K, N] whatever transB was
    assert dtypes(mmi) == [U8, I8, U8, I8]
    assert worst_sqnr(model, q.path) > 30


def test_gemm_bias_is_fused_as_second_add_input(tmp_path):
    q = quantize(gemm_model(beta=2.0), tmp_path)
    (add,) = q.nodes("Add")
    assert add.inputs[0].producer().op_type == "Mul"
    bias = const(add.inputs[1])
    expected = 2.0 * numpy_helper.to_array(gemm_model().graph.initializer[1])
    np.testing.assert_array_equal(bias, expected.astype(np.float32))


# -- Conv --------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
def test_conv(tmp_path, bias):
    model = conv_model(bias=bias)
    q = quantize(model, tmp_path)
    ops = q.ops()
    assert ops["Conv"] == 0 and ops["ConvInteger"] == 1 and ops[DQL] == 1
    assert ops["Add"] == int(bias)
    (conv,) = q.nodes("ConvInteger")
    assert list(conv.attributes["pads"].value) == [1, 1, 1, 1]
    expected = probe_runtime().conv_form(INT8, False, True).weight_type
    assert const(conv.inputs[1]).dtype == expected.numpy_dtype
    if bias:
        (add,) = q.nodes("Add")
        assert const(add.inputs[1]).shape == (6, 1, 1)
    assert worst_sqnr(model, q.path) > 30


@pytest.mark.parametrize("symmetric", [True, False])
def test_conv_per_channel_follows_the_runtime(tmp_path, symmetric):
    model = conv_model(bias=True, outlier=True)
    q = quantize(model, tmp_path, per_channel=True, weight_symmetric=symmetric)
    form = probe_runtime().conv_form(INT8, True, symmetric)
    (conv,) = q.nodes("ConvInteger")
    assert const(conv.inputs[1]).dtype == form.weight_type.numpy_dtype
    zp = const(conv.inputs[3])
    assert zp.shape == ((6,) if form.channel_zero_points else ())
    (mul,) = [n for n in q.nodes("Mul") if n.inputs[0].producer().op_type == DQL]
    assert const(mul.inputs[1]).shape == ((6, 1, 1) if form.per_channel else ())
    if form.note:
        assert any(form.note in note for note in q.result.runtime_notes)
    assert worst_sqnr(model, q.path) > (30 if form.per_channel else 10)


def test_conv_weights_in_constant_nodes_and_batchnorm(tmp_path):
    model = zoo.constant_weights_cnn()
    q = quantize(model, tmp_path)
    assert q.ops()["ConvInteger"] == 2 and q.ops()[MMI] == 1 and q.ops()["Constant"] == 0
    assert all(d.action == "quantized" for d in q.result.decisions)
    assert worst_sqnr(model, q.path) > 30
    model = zoo.cnn()
    q = quantize(model, tmp_path)
    assert q.ops()["BatchNormalization"] == 0 and q.ops()["ConvInteger"] == 3
    assert worst_sqnr(model, q.path) > 28


# -- subgraphs ---------------------------------------------------------------------------------
def test_if_subgraphs(tmp_path):
    model = zoo.if_subgraph_model()
    q = quantize(model, tmp_path, subgraphs=True)
    assert q.ops()["ConvInteger"] == 3 and q.ops()["Conv"] == 0
    graphs = {d.name: d.graph for d in q.result.decisions}
    assert graphs == {"then_conv": "then_branch", "inner_conv": "inner_then_branch",
                      "else_conv": "else_branch"}
    names = [v.name for n in q.nodes() for v in n.outputs] + [n.name for n in q.nodes()]
    for g in (q.model.graph, *q.model.graph.subgraphs()):
        names += list(g.initializers)
    assert len(names) == len(set(names)), "names must be unique across the whole model"
    feeds = zoo.random_feeds(model, 4)
    for flag in (True, False):
        for feed in feeds:
            feed["flag"] = np.array(flag)
        ref, got = zoo.run(model, feeds), zoo.run(str(q.path), feeds)
        assert min(zoo.sqnr_db(r[0], g[0]) for r, g in zip(ref, got, strict=True)) > 30
    q = quantize(model, tmp_path)  # subgraphs are off by default
    assert q.ops()["ConvInteger"] == 0
    assert {d.action for d in q.result.decisions} == {"float"}
    assert all("subgraphs=True" in d.reason for d in q.result.decisions)


def test_loop_body(tmp_path):
    model = zoo.loop_model()
    q = quantize(model, tmp_path, per_channel=True, subgraphs=True)
    (mmi,) = q.nodes(MMI)
    assert mmi.graph.name == "loop_body"
    assert worst_sqnr(model, q.path) > 35


# -- Gather ------------------------------------------------------------------------------------
@pytest.mark.parametrize("per_channel", [False, True])
def test_gather_table(tmp_path, per_channel):
    model = zoo.transformer_block()
    q = quantize(model, tmp_path, per_channel=per_channel)
    (gather,) = [n for n in q.nodes("Gather") if n.name.startswith("word_emb")]
    table = const(gather.inputs[0])
    assert table.dtype == np.int8 and table.shape == (50, 32)
    (dq, _), = gather.outputs[0].uses()
    assert dq.op_type == "DequantizeLinear" and dtypes(dq) == [I8, F32, I8]
    assert const(dq.inputs[1]).shape == ((32,) if per_channel else ())
    axis = dq.attributes.get("axis")
    assert (axis.value if axis is not None else None) == (-1 if per_channel else None)
    assert q.decision("seq_len").action == "float"  # Gather on a shape, not a table
    assert worst_sqnr(model, q.path) > 30


# -- selection, decisions, bad inputs ----------------------------------------------------------
def test_selection_and_decisions(tmp_path):
    model = zoo.cnn()
    q = quantize(model, tmp_path, nodes_to_exclude=["conv2"], op_types_to_exclude=["Gemm"])
    assert q.decision("conv2").action == "float"
    assert "nodes_to_exclude" in q.decision("conv2").reason
    assert "op_types_to_exclude" in q.decision("gemm").reason
    assert q.result.counts()["Conv"] == (2, 3)
    assert q.ops()["Gemm"] == 1 and q.ops()["Conv"] == 1
    assert any("ConvInteger" in note and "conv1" in note for note in q.result.runtime_notes)
    q = quantize(model, tmp_path, nodes_to_quantize=["gemm"])
    assert [d.name for d in q.result.quantized] == ["gemm"]
    assert q.result.quantized_bytes == q.path.stat().st_size
    assert q.result.output_files == [q.path]


def test_input_model_is_not_modified(tmp_path):
    model = zoo.constant_weights_cnn()
    before = model.SerializeToString()
    quantize(model, tmp_path)
    assert model.SerializeToString() == before


def test_missing_input_file(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        quantize_dynamic(tmp_path / "missing.onnx", tmp_path / "out.onnx")
    assert list(tmp_path.iterdir()) == []


def test_output_equal_to_input(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(zoo.matmul_chain(), path)
    before = path.read_bytes()
    with pytest.raises(OutputPathError, match="is the input model"):
        quantize_dynamic(path, path)
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]
    with pytest.raises(OutputPathError, match="does not exist"):
        quantize_dynamic(path, tmp_path / "no" / "out.onnx")
    assert list(tmp_path.iterdir()) == [path]


def test_inferred_shapes_are_not_written(tmp_path):
    # Shapes inferred for our own analysis change onnxruntime's fusions (slower
    # SkipLayerNormalization on BERT models); only the input's annotations are kept.
    model = zoo.matmul_chain()
    q = quantize(model, tmp_path)
    intermediate = [v for n in q.nodes() for v in n.outputs if not v.is_graph_output()]
    assert intermediate and all(v.shape is None for v in intermediate)
    assert q.model.graph.outputs[0].shape is not None


# -- runtime support -----------------------------------------------------------------------------
def support(conv: set, matmul: set | None = None, slowdown=()) -> RuntimeSupport:
    pairs = {(t, pc) for t in ("int8", "uint8") for pc in (False, True)}
    return RuntimeSupport("test", frozenset(pairs if matmul is None else matmul),
                          frozenset(conv), frozenset({"int8", "uint8"}), True, tuple(slowdown))


def test_runtime_forms():
    scalar_only = support({("int8", False), ("uint8", False)})
    form = scalar_only.conv_form(INT8, True, True)
    assert (form.weight_type, form.per_channel, form.channel_zero_points) == (INT8, True, False)
    form = scalar_only.conv_form(INT8, True, False)
    assert (form.weight_type, form.per_channel) == (INT8, False)
    assert "rejects per-channel weight zero points" in form.note
    form = support({("uint8", False)}).conv_form(INT8, False, True)
    assert form.weight_type == UINT8 and "does not run int8 weights" in form.note
    form = support(set()).conv_form(INT8, False, True)
    assert form.weight_type is None and "stay float" in form.note
    slow = support({("int8", False), ("uint8", False)}, slowdown=[("int8", 4.0), ("uint8", 1.0)])
    form = slow.conv_form(INT8, False, True)
    assert form.weight_type == UINT8 and "4.0x slower" in form.note
    assert slow.matmul_form(INT8, True, True).channel_zero_points


def test_probed_runtime_runs_what_it_reports():
    found = probe_runtime()
    assert found.version == ort.__version__
    assert ("uint8", False) in found.conv_integer  # the one form every version has had
    assert ("int8", False) in found.matmul_integer and found.local_functions
    assert probe_runtime() is found  # probed once per process


def test_conv_stays_float_when_the_runtime_cannot_run_it(tmp_path, monkeypatch):
    import onnxquant.dynamic.api as api

    monkeypatch.setattr(api, "probe_runtime", lambda: support(set()))
    model = zoo.cnn()
    q = quantize(model, tmp_path)
    assert q.ops()["Conv"] == 3 and q.ops()["ConvInteger"] == 0 and q.ops()[MMI] == 1
    assert "stay float" in q.decision("conv1").reason
    assert any("stay float" in note and "conv1" in note for note in q.result.runtime_notes)
    assert worst_sqnr(model, q.path) > 30
