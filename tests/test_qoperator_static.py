"""Static quantization in QOperator format (``StaticQuantConfig(format=QuantFormat.QOPERATOR)``).

What is checked, per emitted operator: the integer node replaces the float one (op type and
domain), the element type of every integer input (activations, weights, int32 biases), and its
numbers — the float op applied to the dequantized integer inputs, compared with the dequantized
integer output, must agree with the float result on the output grid within one step (movement
ops exactly). Then whole models:
the structure and fidelity of the cnn and transformer builders, U8S8/U8U8/S8S8, per-channel
weights, If/Loop bodies, Relu/Clip fusion, and the nodes kept float (ConvTranspose, int8
activations with uint8 weights) with their reason.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable
from pathlib import Path

import model_zoo as zoo
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxquant import QuantizationResult, StaticQuantConfig, quantize_static
from onnxquant.core import numerics
from onnxquant.core.qtypes import INT8, UINT8, QuantFormat

MS = "com.microsoft"
Q, DQ = "QuantizeLinear", "DequantizeLinear"
TYPES = {"u8s8": (UINT8, INT8), "u8u8": (UINT8, UINT8), "s8s8": (INT8, INT8)}
SHAPE = [1, 4, 6, 6]


@dataclasses.dataclass
class Quantized:
    float_model: onnx.ModelProto
    proto: onnx.ModelProto
    result: QuantizationResult

    @property
    def model(self) -> ir.Model:
        return ir.serde.deserialize_model(self.proto)

    def nodes(self) -> list[onnx.NodeProto]:
        found = []

        def walk(graph: onnx.GraphProto) -> None:
            for node in graph.node:
                found.append(node)
                for attr in node.attribute:
                    if attr.type == onnx.AttributeProto.GRAPH:
                        walk(attr.g)
        walk(self.proto.graph)
        return found

    def ops(self) -> collections.Counter:
        return collections.Counter(n.op_type for n in self.nodes())

    def only(self, op_type: str) -> onnx.NodeProto:
        found = [n for n in self.nodes() if n.op_type == op_type]
        assert len(found) == 1, f"expected one {op_type}, found {len(found)}: {self.ops()}"
        return found[0]


def qconfig(types: str = "u8s8", **fields: object) -> StaticQuantConfig:
    """QOperator config; the toy models' shallow stems are quantized here (the
    ``float_conv_depth`` rule has its own tests in test_qoperator_speed.py)."""
    act, weight = TYPES[types]
    fields.setdefault("float_conv_depth", None)
    fields.setdefault("activation_type", act)
    fields.setdefault("weight_type", weight)
    fields = {"bias_correction": False, **fields}  # structure, not bias correction
    return StaticQuantConfig(format=QuantFormat.QOPERATOR, **fields)  # type: ignore[arg-type]


def quantize(model: onnx.ModelProto, tmp_path: Path, config: StaticQuantConfig,
             feeds: list | None = None) -> Quantized:
    """Quantize; the result must pass the full checker and run in onnxruntime."""
    out = tmp_path / f"q{len(list(tmp_path.iterdir()))}.onnx"
    feeds = feeds if feeds is not None else zoo.random_feeds(model, 8, seed=1)
    result = quantize_static(model, out, feeds, config)
    proto = onnx.load(out)
    onnx.checker.check_model(proto, full_check=True)
    return Quantized(model, proto, result)


def elem_types(q: Quantized) -> dict[str, int]:
    """Element type of every value (after shape inference), initializers included."""
    inferred = onnx.shape_inference.infer_shapes(q.proto)
    types = {v.name: v.type.tensor_type.elem_type
             for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    types.update({t.name: t.data_type for t in q.proto.graph.initializer})
    return types


def run_with_outputs(proto: onnx.ModelProto, names: list[str], feed: dict) -> dict:
    """Run ``proto`` with ``names`` added to its graph outputs."""
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    known = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in known)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    outs = [o.name for o in session.get_outputs()]
    return dict(zip(outs, session.run(None, feed), strict=True))


# -- per-operator models -----------------------------------------------------------------------
def _model(nodes: list, inits: dict, inputs: list, outputs: list[str],
           opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "op", inputs, [onnx.ValueInfoProto(name=n) for n in outputs],
        initializer=[numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              ir_version=zoo.IR_VERSION)
    return onnx.shape_inference.infer_shapes(model)


def _x(name: str = "x", shape: list | None = None, dtype: int = TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape or SHAPE)


_RNG = np.random.default_rng(7)
W1 = (_RNG.standard_normal((4, 4, 1, 1)) * 0.5).astype(np.float32)
W2 = (_RNG.standard_normal((4, 4, 1, 1)) * 0.5).astype(np.float32)


def after_conv(op: str, extra_inputs: tuple = (), inits: dict | None = None,
               second: bool = False, outputs: int = 1, **attrs: object) -> onnx.ModelProto:
    """x -> pre (1x1 Conv, an integer producer) -> ``op`` [-> with pre2 as a second input]."""
    nodes = [helper.make_node("Conv", ["x", "W1"], ["h"], name="pre")]
    inputs = ["h"]
    if second:
        nodes.append(helper.make_node("Conv", ["x", "W2"], ["h2"], name="pre2"))
        inputs.append("h2")
    outs = [f"y{i}" for i in range(outputs)]
    nodes.append(helper.make_node(op, [*inputs, *extra_inputs], outs, name="op", **attrs))
    all_inits = {"W1": W1, "W2": W2, **(inits or {})}
    graph_inputs = [_x()] + ([_x("cond", SHAPE, TensorProto.BOOL)] if op == "Where" else [])
    return _model(nodes, all_inits, graph_inputs, outs)


def where_model() -> onnx.ModelProto:
    nodes = [helper.make_node("Conv", ["x", "W1"], ["h"], name="pre"),
             helper.make_node("Conv", ["x", "W2"], ["h2"], name="pre2"),
             helper.make_node("Where", ["cond", "h", "h2"], ["y0"], name="op")]
    return _model(nodes, {"W1": W1, "W2": W2}, [_x(), _x("cond", SHAPE, TensorProto.BOOL)],
                  ["y0"])


def direct(op: str, inputs: list, inits: dict, shapes: dict, **attrs: object) -> onnx.ModelProto:
    """``op`` reading graph inputs (quantized by a QuantizeLinear) and constants."""
    node = helper.make_node(op, inputs, ["y0"], name="op", **attrs)
    return _model([node], inits, [_x(n, s) for n, s in shapes.items()], ["y0"])


def gather_table() -> onnx.ModelProto:
    table = _RNG.standard_normal((64, 8)).astype(np.float32)
    node = helper.make_node("Gather", ["table", "ids"], ["y0"], name="op", axis=0)
    return _model([node], {"table": table}, [_x("ids", [2, 3], TensorProto.INT64)], ["y0"])


def _i64(*values: int) -> np.ndarray:
    return np.array(values, np.int64)


@dataclasses.dataclass
class Case:
    build: Callable[[], onnx.ModelProto]
    qop: str
    domain: str = ""
    steps: float = 1.0  # allowed |error| in output steps (0: exact)
    ints: dict[int, int] = dataclasses.field(default_factory=lambda: {0: 0})  # float -> q input


_W = {0: 0, 1: 3}  # Conv/MatMul/Gemm/Add/Mul: a at 0, b at 3

CASES: dict[str, Case] = {
    "Conv": Case(lambda: direct("Conv", ["x", "W", "B"], {
        "W": (_RNG.standard_normal((6, 4, 3, 3)) * 0.3).astype(np.float32),
        "B": _RNG.standard_normal(6).astype(np.float32)}, {"x": SHAPE}, pads=[1, 1, 1, 1]),
        "QLinearConv", ints=_W),
    "MatMul": Case(lambda: direct("MatMul", ["x", "W"], {
        "W": (_RNG.standard_normal((8, 5)) * 0.4).astype(np.float32)}, {"x": [2, 3, 8]}),
        "QLinearMatMul", ints=_W),
    "MatMul_activations": Case(lambda: direct("MatMul", ["a", "b"], {},
                                              {"a": [2, 3, 8], "b": [2, 8, 4]}),
                               "QLinearMatMul", ints=_W),
    "Gemm": Case(lambda: direct("Gemm", ["a", "W", "C"], {
        "W": (_RNG.standard_normal((5, 8)) * 0.4).astype(np.float32),
        "C": _RNG.standard_normal(5).astype(np.float32)}, {"a": [3, 8]},
        transB=1, alpha=0.5, beta=2.0), "QGemm", MS, ints=_W),
    "Add": Case(lambda: after_conv("Add", second=True), "QLinearAdd", MS, ints=_W),
    "Add_constant": Case(lambda: after_conv("Add", ("c",), {
        "c": _RNG.standard_normal((6, 1)).astype(np.float32)}), "QLinearAdd", MS),
    "Mul": Case(lambda: after_conv("Mul", second=True), "QLinearMul", MS, ints=_W),
    "Div": Case(lambda: after_conv("Div", ("c",), {"c": np.float32(3.0)}), "QLinearMul", MS),
    "Concat": Case(lambda: after_conv("Concat", second=True, axis=1), "QLinearConcat", MS,
                   ints={0: 2, 1: 5}),
    "AveragePool": Case(lambda: after_conv("AveragePool", kernel_shape=[2, 2], strides=[2, 2]),
                        "QLinearAveragePool", MS),
    "GlobalAveragePool": Case(lambda: after_conv("GlobalAveragePool"),
                              "QLinearGlobalAveragePool", MS),
    "Sigmoid": Case(lambda: after_conv("Sigmoid"), "QLinearSigmoid", MS),
    "LeakyRelu": Case(lambda: after_conv("LeakyRelu", alpha=0.2), "QLinearLeakyRelu", MS),
    "Softmax": Case(lambda: after_conv("Softmax", axis=1), "QLinearSoftmax", MS),
    "Where": Case(where_model, "QLinearWhere", MS, ints={1: 1, 2: 4}),
    "MaxPool": Case(lambda: after_conv("MaxPool", kernel_shape=[2, 2], strides=[2, 2]),
                    "NhwcMaxPool", MS, steps=0),
    "Reshape": Case(lambda: after_conv("Reshape", ("shape",), {"shape": _i64(1, -1)}),
                    "Reshape", steps=0),
    "Transpose": Case(lambda: after_conv("Transpose", perm=[0, 2, 3, 1]), "Transpose", steps=0),
    "Squeeze": Case(lambda: after_conv("Squeeze", ("axes",), {"axes": _i64(0)}), "Squeeze",
                    steps=0),
    "Unsqueeze": Case(lambda: after_conv("Unsqueeze", ("axes",), {"axes": _i64(0)}),
                      "Unsqueeze", steps=0),
    "Flatten": Case(lambda: after_conv("Flatten", axis=1), "Flatten", steps=0),
    "Resize": Case(lambda: after_conv("Resize", ("", "scales"), {
        "scales": np.array([1, 1, 2, 2], np.float32)}, mode="nearest"), "Resize", steps=0),
    "Split": Case(lambda: after_conv("Split", ("split",), {"split": _i64(1, 3)}, outputs=2,
                                     axis=1), "Split", steps=0),
    "Slice": Case(lambda: after_conv("Slice", ("starts", "ends", "axes"), {
        "starts": _i64(1), "ends": _i64(3), "axes": _i64(1)}), "Slice", steps=0),
    "Pad": Case(lambda: after_conv("Pad", ("pads", "value"), {
        "pads": _i64(0, 0, 1, 1, 0, 0, 1, 1), "value": np.float32(0.3)}), "Pad", steps=0),
    "Gather": Case(lambda: after_conv("Gather", ("indices",), {"indices": _i64(2, 0)}, axis=1),
                   "Gather", steps=0),
    "Gather_table": Case(gather_table, "Gather", steps=0),
    "ArgMax": Case(lambda: after_conv("ArgMax", axis=1), "ArgMax", steps=0),
}
MOVEMENT = {"MaxPool", "NhwcMaxPool", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten",
            "Resize", "Split", "Slice", "Pad", "Gather", "ArgMax"}


def nchw_view(q: Quantized, node: onnx.NodeProto) -> onnx.NodeProto:
    """A channels-last node seen from outside its two Transposes (NCHW input and output)."""
    before = next(n for n in q.nodes() if node.input[0] in n.output)
    after = next(n for n in q.nodes() if node.output[0] in n.input)
    assert before.op_type == after.op_type == "Transpose"
    assert [list(n.attribute[0].ints) for n in (before, after)] == [[0, 2, 3, 1], [0, 3, 1, 2]]
    view = onnx.NodeProto()
    view.CopyFrom(node)
    view.input[0], view.output[0] = before.input[0], after.output[0]
    return view


def float_reference(case: Case, q: Quantized, qnode: onnx.NodeProto, feed: dict,
                    got: dict) -> list[np.ndarray]:
    """The original float node run on the dequantized integer inputs of ``qnode``."""
    fnode = next(n for n in q.float_model.graph.node if n.name == "op")
    plan = q.result.plan
    inits = {t.name: numpy_helper.to_array(t) for t in q.proto.graph.initializer}
    float_inits = {t.name: numpy_helper.to_array(t) for t in q.float_model.graph.initializer}
    feeds = {}
    for index, name in enumerate(fnode.input):
        if not name:
            continue
        if index in case.ints:
            tq = plan.tensors[name]
            qname = qnode.input[case.ints[index]]
            data = inits[qname] if qname in inits else got[qname]
            feeds[name] = numerics.dequantize(data, tq.scale_array(), tq.zero_point_array(),
                                              axis=tq.axis).astype(np.float32)
        else:
            feeds[name] = float_inits[name] if name in float_inits else feed[name]
    ref = _model([fnode], {}, [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(
        v.dtype), list(v.shape)) for k, v in feeds.items()], list(fnode.output))
    return zoo.run(ref, [feeds])[0]


# Every operator with U8S8; those whose kernels differ by type also with U8U8 and S8S8.
TYPED = ("Conv", "MatMul", "Gemm", "Add", "Concat", "Softmax", "AveragePool", "Where", "MaxPool",
         "Pad")
OPERATOR_PARAMS = [(n, "u8s8") for n in CASES] + [(n, t) for n in TYPED for t in ("u8u8", "s8s8")]


@pytest.mark.parametrize(("name", "types"), OPERATOR_PARAMS)
def test_operator(tmp_path: Path, name: str, types: str) -> None:
    case = CASES[name]
    model = case.build()
    q = quantize(model, tmp_path, qconfig(types, per_channel_fallback_db=None))
    act, weight = (t.onnx_dtype.value for t in TYPES[types])
    float_op = name.split("_")[0]
    qnode = next(n for n in q.nodes() if n.name == "op_quant")
    if qnode.op_type == "NhwcMaxPool":
        qnode = nchw_view(q, qnode)
    # -- structure: the integer node replaced the float one
    assert (qnode.op_type, qnode.domain) == (case.qop, case.domain)
    assert float_op not in q.ops() or float_op == case.qop
    if case.domain == MS:
        assert any(o.domain == MS and o.version == 1 for o in q.proto.opset_import)
    types_of = elem_types(q)
    consts = {t.name for t in q.proto.graph.initializer}
    for findex, qindex in case.ints.items():
        is_weight = qnode.input[qindex] in consts and name not in ("Add_constant", "Gather_table")
        expected = weight if is_weight and float_op in ("Conv", "MatMul", "Gemm") else act
        assert types_of[qnode.input[qindex]] == expected, (findex, qnode.input[qindex])
    if name in ("Conv", "Gemm"):
        bias = qnode.input[8 if name == "Conv" else 6]
        assert types_of[bias] == TensorProto.INT32
    int_outputs = [o for o in qnode.output if o]
    if name != "ArgMax":
        assert all(types_of[o] == act for o in int_outputs)
    # graph outputs stay float under their names, through one DequantizeLinear each
    for out in q.proto.graph.output:
        assert out.name in {o.name for o in model.graph.output}
        producer = next(n for n in q.nodes() if out.name in n.output)
        assert producer.op_type == (DQ if name != "ArgMax" else "ArgMax")
    # -- numbers
    feed = zoo.random_feeds(model, 1, seed=3)[0]
    wanted = [n for n in [*qnode.input, *int_outputs] if n and n not in consts]
    got = run_with_outputs(q.proto, wanted, feed)
    reference = float_reference(case, q, qnode, feed, got)
    fnode = next(n for n in model.graph.node if n.name == "op")
    for out_name, qout, ref in zip(fnode.output, int_outputs, reference, strict=True):
        if name == "ArgMax":
            np.testing.assert_array_equal(got[qout], ref)
            continue
        tq = q.result.plan.tensors[out_name]
        if case.qop in MOVEMENT:  # the output shares the input's grid
            assert tq.source.startswith("shared:")
        value = numerics.dequantize(got[qout], tq.scale_array(), tq.zero_point_array())
        # The float result on the output grid (saturated where the calibrated range ends)
        expected = numerics.dequantize(
            numerics.quantize(ref, tq.scale_array(), tq.zero_point_array(), tq.quant_type),
            tq.scale_array(), tq.zero_point_array())
        error = float(np.max(np.abs(value - expected)))
        assert error <= case.steps * tq.scale[0] * (1 + 1e-5), (name, error, tq.scale[0])


def test_softmax_output_grid(tmp_path: Path) -> None:
    for types, zero_point in (("u8s8", 0), ("s8s8", -128)):
        q = quantize(CASES["Softmax"].build(), tmp_path, qconfig(types))
        tq = q.result.plan.tensors["y0"]
        assert (tq.scale, tq.zero_point) == ([1.0 / 256.0], [zero_point])
        assert q.only("QLinearSoftmax").attribute[0].name in ("axis", "opset")


def test_gemm_without_output_parameters_writes_float(tmp_path: Path) -> None:
    """A Gemm read only by a LayerNormalization: QGemm without y_scale writes float."""
    w = (_RNG.standard_normal((8, 8)) * 0.4).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["a", "W"], ["g"], name="op", transB=1),
             helper.make_node("LayerNormalization", ["g", "s", "b"], ["y0"], name="ln")]
    model = _model(nodes, {"W": w, "s": np.ones(8, np.float32), "b": np.zeros(8, np.float32)},
                   [_x("a", [3, 8])], ["y0"])
    q = quantize(model, tmp_path, qconfig())
    qgemm = q.only("QGemm")
    assert len(qgemm.input) == 6  # no C, no y_scale / y_zero_point
    assert elem_types(q)[qgemm.output[0]] == TensorProto.FLOAT
    assert q.ops()[DQ] == 0
    ref, got = zoo.run(model, zoo.random_feeds(model, 2, seed=4)), zoo.run(
        q.proto, zoo.random_feeds(model, 2, seed=4))
    assert zoo.sqnr_db(ref[0][0], got[0][0]) > 25


# -- whole models ------------------------------------------------------------------------------
def fidelity(q: Quantized, feeds: list[dict]) -> float:
    ref, got = zoo.run(q.float_model, feeds), zoo.run(q.proto, feeds)
    return min(zoo.sqnr_db(r, g) for rs, gs in zip(ref, got, strict=True)
               for r, g in zip(rs, gs, strict=True))


@pytest.mark.parametrize("types", list(TYPES))
def test_cnn(tmp_path: Path, types: str) -> None:
    q = quantize(zoo.cnn(), tmp_path, qconfig(types))
    ops = q.ops()
    assert ops == collections.Counter({
        "QLinearConv": 3, "QGemm": 1, "QLinearAdd": 1, "QLinearAveragePool": 1,
        "QLinearGlobalAveragePool": 1, "NhwcMaxPool": 1, "Transpose": 2, "Flatten": 1, Q: 1,
        DQ: 1})
    act, weight = (t.onnx_dtype.value for t in TYPES[types])
    types_of = elem_types(q)
    for conv in (n for n in q.nodes() if n.op_type == "QLinearConv"):
        assert [types_of[conv.input[i]] for i in (0, 3, 8)] == [act, weight, TensorProto.INT32]
    assert types_of[q.only("NhwcMaxPool").input[0]] == act
    assert q.only(Q).input[0] == "image" and q.only(DQ).output[0] == "logits"
    # Relu and Clip are fused into the producers' output grids
    removed = [d.name for d in q.result.plan.nodes.values() if d.action == "remove"]
    assert sorted(removed) == ["clip1", "relu1", "relu2"]
    assert fidelity(q, zoo.random_feeds(q.float_model, 4, seed=2)) > 28


def test_per_channel(tmp_path: Path) -> None:
    q = quantize(zoo.cnn(), tmp_path, qconfig(per_channel=True))
    inits = {t.name: numpy_helper.to_array(t) for t in q.proto.graph.initializer}
    channels = [inits[n.input[4]].shape for n in q.nodes() if n.op_type == "QLinearConv"]
    assert sorted(channels) == [(8,), (16,), (16,)]
    assert inits[q.only("QGemm").input[4]].shape == (10,)
    assert fidelity(q, zoo.random_feeds(q.float_model, 4, seed=2)) > 30
    chain = quantize(zoo.matmul_chain(), tmp_path, qconfig(per_channel=True))
    for node in (n for n in chain.nodes() if n.op_type == "QLinearMatMul"):
        assert inits_of(chain)[node.input[4]].shape == (16,)
    # the last Relu writes the graph output: it is not fused and has no integer form
    assert chain.ops()["MatMul"] == 0 and chain.ops()["Relu"] == 1
    assert fidelity(chain, zoo.random_feeds(chain.float_model, 4, seed=2)) > 30


def inits_of(q: Quantized) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in q.proto.graph.initializer}


def test_int8_activations_with_uint8_weights_stay_float(tmp_path: Path) -> None:
    """onnxruntime has no QLinearConv/QGemm for int8 x uint8: those nodes run float on
    quantized weights, with the reason in the plan."""
    config = qconfig("u8s8", activation_type=INT8, weight_type=UINT8)
    q = quantize(zoo.cnn(), tmp_path, config)
    ops = q.ops()
    assert ops["QLinearConv"] == 0 and ops["Conv"] == 3 and ops["Gemm"] == 1
    assert "int8 activations with uint8 weights" in q.result.plan.nodes["conv1"].reason
    types_of = elem_types(q)
    conv = next(n for n in q.nodes() if n.op_type == "Conv")
    weight_dq = next(n for n in q.nodes() if conv.input[1] in n.output)
    assert weight_dq.op_type == DQ and types_of[weight_dq.input[0]] == TensorProto.UINT8
    assert ops["QLinearAdd"] == 1  # the integer ops around them still are
    assert fidelity(q, zoo.random_feeds(q.float_model, 4, seed=2)) > 25


def test_conv_transpose_stays_float_between_integer_ops(tmp_path: Path) -> None:
    q = quantize(zoo.conv_transpose(), tmp_path, qconfig())
    ops = q.ops()
    assert ops["ConvTranspose"] == 1 and ops["QLinearSigmoid"] == 1 and ops["Resize"] == 1
    assert "no integer ConvTranspose" in q.result.plan.nodes["convt"].reason
    types_of = elem_types(q)
    convt = q.only("ConvTranspose")
    w_dq, b_dq = (next(n for n in q.nodes() if name in n.output) for name in convt.input[1:3])
    assert types_of[w_dq.input[0]] == TensorProto.INT8
    assert types_of[b_dq.input[0]] == TensorProto.INT32
    assert types_of[q.only("Resize").input[0]] == TensorProto.UINT8
    assert (ops[Q], ops[DQ]) == (1, 3)  # convt's output (x stays float); w, b, y
    assert fidelity(q, zoo.random_feeds(q.float_model, 4, seed=2)) > 28


def test_relu_stays_when_its_producer_is_float(tmp_path: Path) -> None:
    """A Relu the plan folds into ConvTranspose's range stays: ConvTranspose writes float."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("ConvTranspose", ["x", "W"], ["t"], name="convt"),
             helper.make_node("Relu", ["t"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "W2"], ["y0"], name="conv")]
    model = _model(nodes, {"W": (rng.standard_normal((4, 4, 3, 3)) * 0.3).astype(np.float32),
                           "W2": W1}, [_x()], ["y0"])
    q = quantize(model, tmp_path, qconfig())
    assert q.result.plan.nodes["relu"].action == "remove"
    assert "producer is not an integer node" in q.result.plan.nodes["relu"].reason
    assert q.ops()["Relu"] == 1 and q.ops()["QLinearConv"] == 1
    assert fidelity(q, zoo.random_feeds(model, 4, seed=2)) > 28


def test_transformer_block(tmp_path: Path) -> None:
    model = zoo.transformer_block()
    q = quantize(model, tmp_path, qconfig())
    ops = q.ops()
    assert ops["QLinearMatMul"] == 8 and ops["MatMul"] == 0
    assert ops["QLinearAdd"] >= 6 and ops["QLinearMul"] >= 3
    # The attention scores carry the -1e4 mask: Softmax reads them as float
    assert ops["Softmax"] == 1 and ops["QLinearSoftmax"] == 0
    assert q.result.plan.nodes["softmax"].inputs == {}
    types_of = elem_types(q)
    gather = next(n for n in q.nodes() if n.op_type == "Gather" and "word_embeddings" in
                  n.input[0])
    assert types_of[gather.input[0]] == TensorProto.UINT8  # the table is stored quantized
    assert fidelity(q, zoo.random_feeds(model, 4, seed=2)) > 28


def test_if_subgraphs(tmp_path: Path) -> None:
    model = zoo.if_subgraph_model()
    # Each branch sees only the calibration feeds that take it: 32 feeds give both enough.
    q = quantize(model, tmp_path, qconfig(), zoo.random_feeds(model, 32, seed=1))
    convs = [n for n in q.nodes() if n.op_type == "QLinearConv"]
    assert len(convs) == 3 and q.ops()["Conv"] == 0
    # then_relu is fused; else_relu writes its branch's output and stays
    assert [n.name for n in q.nodes() if n.op_type == "Relu"] == ["else_relu"]
    for flag in (True, False):
        feeds = [{**f, "flag": np.array(flag)} for f in zoo.random_feeds(model, 3, seed=2)]
        assert fidelity(q, feeds) > 28


def test_loop_body(tmp_path: Path) -> None:
    model = zoo.loop_model()
    q = quantize(model, tmp_path, qconfig())
    body = next(n for n in q.proto.graph.node if n.op_type == "Loop").attribute[0].g
    body_ops = collections.Counter(n.op_type for n in body.node)
    assert body_ops["QLinearMatMul"] == 1 and body_ops["MatMul"] == 0
    assert (body_ops[Q], body_ops[DQ]) == (1, 1)  # state_in in, matmul out to Tanh
    assert [o.name for o in body.output] == ["cond_out", "state_out"]
    assert fidelity(q, zoo.random_feeds(model, 4, seed=2)) > 25


def test_maxpool_below_opset_12_stays_float(tmp_path: Path) -> None:
    """MaxPool takes 8-bit tensors from opset 12: at opset 11 it runs float between Q/DQ."""
    nodes = [helper.make_node("Conv", ["x", "W1"], ["h"], name="pre"),
             helper.make_node("MaxPool", ["h"], ["p"], name="op", kernel_shape=[2, 2]),
             helper.make_node("Conv", ["p", "W2"], ["y0"], name="post")]
    model = _model(nodes, {"W1": W1, "W2": W2}, [_x()], ["y0"], opset=11)
    q = quantize(model, tmp_path, qconfig(per_channel_fallback_db=None))
    assert q.proto.opset_import[0].version == 11
    assert "from opset 12" in q.result.plan.nodes["op"].reason
    types_of = elem_types(q)
    assert types_of[q.only("MaxPool").input[0]] == TensorProto.FLOAT
    assert q.ops()["QLinearConv"] == 2
    assert fidelity(q, zoo.random_feeds(model, 2, seed=2)) > 28


def test_required_opset() -> None:
    config = qconfig(per_channel_fallback_db=None)
    assert config.required_opset() == 10
    assert qconfig().required_opset() == 13


def test_qdq_plan_unchanged_by_format(tmp_path: Path) -> None:
    """The QOperator-only rules (LeakyRelu, Div, Softmax input) do not leak into QDQ."""
    model = CASES["Div"].build()
    result = quantize_static(model, tmp_path / "qdq.onnx", zoo.random_feeds(model, 4, seed=1),
                             StaticQuantConfig())
    assert "op" not in result.plan.nodes


# -- recurrent layers ----------------------------------------------------------------------------
def lstm_after_conv(hidden: int = 8) -> onnx.ModelProto:
    """Conv -> [T, B, C] -> bidirectional LSTM: the LSTM is quantized weight-only."""
    rng = np.random.default_rng(3)
    conv_w = (rng.standard_normal((4, 3, 1, 3)) * 0.4).astype(np.float32)
    w = (rng.standard_normal((2, 4 * hidden, 4)) * 0.3).astype(np.float32)
    r = (rng.standard_normal((2, 4 * hidden, hidden)) * 0.3).astype(np.float32)
    b = (rng.standard_normal((2, 8 * hidden)) * 0.1).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "cw"], ["c"], name="conv", pads=[0, 1, 0, 1]),
        helper.make_node("Squeeze", ["c", "axes"], ["s"], name="squeeze"),  # [1, 4, T]
        helper.make_node("Transpose", ["s"], ["t"], name="to_tbc", perm=[2, 0, 1]),
        helper.make_node("LSTM", ["t", "W", "R", "B"], ["y"], name="lstm", hidden_size=hidden,
                         direction="bidirectional"),
    ]
    inits = {"cw": conv_w, "axes": _i64(2), "W": w, "R": r, "B": b}
    return _model(nodes, inits, [_x("x", [1, 3, 1, 12])], ["y"])


def test_lstm_becomes_dynamic_quantize_lstm(tmp_path: Path) -> None:
    model = lstm_after_conv()
    q = quantize(model, tmp_path, qconfig())
    lstm = q.only("DynamicQuantizeLSTM")
    assert lstm.domain == "com.microsoft" and q.ops()["LSTM"] == 0
    types = elem_types(q)
    assert [types[name] for name in lstm.input[1:3]] == [TensorProto.INT8] * 2
    assert types[lstm.input[0]] == TensorProto.FLOAT  # activations are quantized inside
    feeds = zoo.random_feeds(model, 4, seed=5)
    ref, got = zoo.run(model, feeds), zoo.run(q.proto, feeds)
    assert min(zoo.sqnr_db(r[0], g[0]) for r, g in zip(ref, got, strict=True)) > 25
