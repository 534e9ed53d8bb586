"""Drop-in compatibility of ``onnxquant.ort`` with ``onnxruntime.quantization``.

The same user script (:func:`_script`) runs against both modules; only the module object differs.
"""

from __future__ import annotations

import enum
import importlib
import inspect
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import model_zoo as zoo
import numpy as np
import onnx
import onnxruntime.quantization as ortq
import pytest
from onnx import TensorProto, numpy_helper

import onnxquant
import onnxquant.ort as oqq
from onnxquant.core.errors import CalibrationError, QuantizationError
from onnxquant.ort._options import _to_native_config

MODULES = pytest.mark.parametrize("q", [ortq, oqq], ids=["onnxruntime", "onnxquant"])
COMPUTE = ("Conv", "Gemm", "MatMul")
I8, U8, I16, U16, I32 = (TensorProto.INT8, TensorProto.UINT8, TensorProto.INT16,
                         TensorProto.UINT16, TensorProto.INT32)


# ---------------------------------------------------------------------------------------------
# The user's script, written once.

def _script(q, model_path, output, feeds, *, activation="QInt8", weight="QInt8", **kwargs):
    """What a user of onnxruntime.quantization writes; ``q`` is the imported module."""

    class Reader(q.CalibrationDataReader):
        def __init__(self, feeds):
            self._feeds = iter(feeds)

        def get_next(self):
            return next(self._feeds, None)

    q.quantize_static(
        model_path,
        output,
        Reader(feeds),
        quant_format=q.QuantFormat.QDQ,
        activation_type=getattr(q.QuantType, activation),
        weight_type=getattr(q.QuantType, weight),
        calibrate_method=q.CalibrationMethod.MinMax,
        **kwargs,
    )
    return onnx.load(str(output))


def _saved(tmp_path: Path, model: onnx.ModelProto, name: str = "float.onnx") -> Path:
    path = tmp_path / name
    onnx.save(model, str(path))
    return path


def _both(tmp_path, model, feeds, **kwargs) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """(onnxruntime's output, ours) for the same script and arguments."""
    path = _saved(tmp_path, model)
    theirs = _script(ortq, path, tmp_path / "ort.onnx", feeds, **kwargs)
    ours = _script(oqq, path, tmp_path / "ours.onnx", feeds, **kwargs)
    return theirs, ours


# ---------------------------------------------------------------------------------------------
# Graph inspection helpers.

def _inits(model: onnx.ModelProto) -> dict[str, TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def _dq_zero_point_type(model: onnx.ModelProto, dq: onnx.NodeProto) -> int:
    """Element type of a DequantizeLinear's zero point (its input's type when absent)."""
    inits = _inits(model)
    if len(dq.input) > 2 and dq.input[2]:
        return inits[dq.input[2]].data_type
    if dq.input[0] in inits:
        return inits[dq.input[0]].data_type
    producer = next(n for n in model.graph.node if dq.input[0] in n.output)
    return inits[producer.input[2]].data_type


def _input_types(model: onnx.ModelProto) -> dict[str, tuple[int | None, ...]]:
    """Compute node name -> zero-point element type of the DQ feeding each input (None: float)."""
    producers = {out: node for node in model.graph.node for out in node.output}
    types = {}
    for node in model.graph.node:
        if node.op_type not in COMPUTE:
            continue
        row = []
        for name in node.input:
            dq = producers.get(name)
            is_dq = dq is not None and dq.op_type == "DequantizeLinear"
            row.append(_dq_zero_point_type(model, dq) if is_dq else None)
        types[node.name] = tuple(row)
    return types


def _activation_qparams(model: onnx.ModelProto) -> dict[str, tuple[float, int]]:
    """Quantized tensor -> (scale, zero point) of every QuantizeLinear."""
    inits = _inits(model)
    return {
        node.input[0]: (float(numpy_helper.to_array(inits[node.input[1]])),
                        int(numpy_helper.to_array(inits[node.input[2]])))
        for node in model.graph.node if node.op_type == "QuantizeLinear"
    }


def _weight_dqs(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, np.ndarray, np.ndarray]]:
    """(DQ node, quantized weight, scale) for every DQ of an int8/uint8 initializer."""
    inits = _inits(model)
    found = []
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            tensor = inits[node.input[0]]
            if tensor.data_type in (I8, U8) and len(tensor.dims) >= 2:
                found.append((node, numpy_helper.to_array(tensor),
                              numpy_helper.to_array(inits[node.input[1]])))
    return found


def _ops(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node]


def _outputs(model, feeds) -> np.ndarray:
    return np.concatenate([outs[0] for outs in zoo.run(model, feeds)])


# ---------------------------------------------------------------------------------------------
# Public API, enums, signatures.

def test_public_api():
    assert set(oqq.__all__) >= {
        "quantize_static", "quantize_dynamic", "quantize", "QuantConfig", "StaticQuantConfig",
        "DynamicQuantConfig", "QuantFormat",
        "QuantType", "QuantizationMode", "CalibrationMethod", "CalibrationDataReader",
    }
    from onnxquant.ort.calibrate import CalibrationDataReader, CalibrationMethod
    from onnxquant.ort.quant_utils import QuantFormat, QuantizationMode, QuantType
    from onnxquant.ort.quantize import StaticQuantConfig, quantize, quantize_static

    assert (quantize_static, quantize, StaticQuantConfig) == (
        oqq.quantize_static, oqq.quantize, oqq.StaticQuantConfig)
    assert (QuantFormat, QuantizationMode, QuantType, CalibrationMethod) == (
        oqq.QuantFormat, oqq.QuantizationMode, oqq.QuantType, oqq.CalibrationMethod)
    assert CalibrationDataReader is oqq.CalibrationDataReader is onnxquant.CalibrationDataReader


@pytest.mark.parametrize("name", ["QuantType", "QuantFormat", "QuantizationMode",
                                  "CalibrationMethod"])
def test_enum_members_equal_onnxruntime(name):
    ours, theirs = getattr(oqq, name), getattr(ortq, name)
    assert [(m.name, m.value) for m in ours] == [(m.name, m.value) for m in theirs]
    for member in ours:
        assert str(member) == str(theirs[member.name])


def test_quant_type_properties():
    assert {t.name: t.tensor_type for t in oqq.QuantType} == {
        t.name: t.tensor_type for t in ortq.QuantType}
    assert {t.name: t.qtype for t in oqq.QuantType} == {
        "QInt8": onnxquant.INT8, "QUInt8": onnxquant.UINT8,
        "QFLOAT8E4M3FN": onnxquant.FLOAT8E4M3FN, "QInt16": onnxquant.INT16,
        "QUInt16": onnxquant.UINT16, "QInt4": onnxquant.INT4, "QUInt4": onnxquant.UINT4}
    assert oqq.QuantType.from_string("QUInt8") is oqq.QuantType.QUInt8
    assert oqq.QuantType.from_string("quint16") is oqq.QuantType.QUInt16
    assert oqq.QuantFormat.from_string("QDQ") is oqq.QuantFormat.QDQ
    assert oqq.QuantizationMode.from_string("QLinearOps") is oqq.QuantizationMode.QLinearOps
    with pytest.raises(ValueError, match="QInt8"):
        oqq.QuantType.from_string("int9")


def _parameters(function) -> list[tuple[str, object]]:
    """(name, default) per parameter; enum defaults become their member names."""
    result = []
    for param in inspect.signature(function).parameters.values():
        default = param.default
        if isinstance(default, enum.Enum):
            default = f"{type(default).__name__}.{default.name}"
        result.append((param.name, default))
    return result


@pytest.mark.parametrize("path", ["quantize_static", "quantize", "StaticQuantConfig.__init__",
                                  "QuantConfig.__init__"])
def test_signatures_equal_onnxruntime(path):
    def resolve(module):
        obj = importlib.import_module(f"{module.__name__}.quantize")  # the module, not the function
        for part in path.split("."):
            obj = getattr(obj, part)
        return obj

    assert _parameters(resolve(oqq)) == _parameters(resolve(ortq))


def test_library_never_imports_onnxruntime_quantization(tmp_path):
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import model_zoo as zoo
        import onnxquant.ort as q
        model = zoo.matmul_chain()
        q.quantize_static(model, {str(tmp_path / "q.onnx")!r}, iter(zoo.random_feeds(model, 2)))
        assert "onnxruntime.quantization" not in sys.modules, "imported"
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "q.onnx").is_file()


# ---------------------------------------------------------------------------------------------
# The same script with both modules: fidelity.

@pytest.mark.parametrize(("builder", "per_channel"), [
    pytest.param(zoo.cnn, False, id="cnn-per_tensor"),
    pytest.param(zoo.cnn, True, id="cnn-per_channel"),
    pytest.param(zoo.matmul_chain, False, id="matmul_chain-per_tensor"),
    pytest.param(zoo.matmul_chain, True, id="matmul_chain-per_channel"),
])
def test_same_script_fidelity(tmp_path, builder, per_channel):
    model = builder()
    calibration = zoo.random_feeds(model, 16, seed=0)
    evaluation = zoo.random_feeds(model, 16, seed=1)
    theirs, ours = _both(tmp_path, model, calibration, per_channel=per_channel)
    assert {"QuantizeLinear", "DequantizeLinear"} <= set(_ops(ours))
    reference = _outputs(model, evaluation)
    baseline = zoo.sqnr_db(reference, _outputs(theirs, evaluation))
    achieved = zoo.sqnr_db(reference, _outputs(ours, evaluation))
    assert baseline > 15  # the baseline itself is a sane quantization
    assert achieved >= baseline - 1.0, (achieved, baseline)


# ---------------------------------------------------------------------------------------------
# Type options -> element types per node input, checked against onnxruntime's output too.

TYPE_CASES = {
    "S8S8": ("QInt8", "QInt8", I8, I8),
    "U8U8": ("QUInt8", "QUInt8", U8, U8),
    "U8S8": ("QUInt8", "QInt8", U8, I8),
    "S16S8": ("QInt16", "QInt8", I16, I8),
    "U16U8": ("QUInt16", "QUInt8", U16, U8),
}


@pytest.mark.parametrize("case", list(TYPE_CASES))
def test_types_per_node_input(tmp_path, case):
    activation, weight, act_type, weight_type = TYPE_CASES[case]
    model = zoo.cnn()
    theirs, ours = _both(tmp_path, model, zoo.random_feeds(model, 4),
                         activation=activation, weight=weight)
    expected = {name: (act_type, weight_type, I32) for name in ("conv1", "conv2", "conv3", "gemm")}
    assert _input_types(ours) == expected
    assert _input_types(theirs) == expected
    if act_type in (I16, U16):
        assert ours.opset_import[0].version >= 21


@pytest.mark.parametrize("weight", ["QInt8", "QUInt8"])
def test_per_channel_and_reduce_range(tmp_path, weight):
    model = zoo.matmul_chain()
    _, ours = _both(tmp_path, model, zoo.random_feeds(model, 4), activation="QUInt8",
                    weight=weight, per_channel=True, reduce_range=True)
    weights = _weight_dqs(ours)
    assert len(weights) == 3
    for node, values, scale in weights:
        assert scale.shape == (values.shape[1],)  # MatMul B [K, N]: one scale per column
        assert {a.name: a.i for a in node.attribute}.get("axis") == 1
        low, high = (-64, 64) if weight == "QInt8" else (0, 127)
        assert low <= values.min() and values.max() <= high
        assert values.max() > high // 2  # the 7-bit grid is used, not an even smaller one
    assert set(_input_types(ours).values()) == {(U8, I8 if weight == "QInt8" else U8)}


def test_onnxruntime_enums_accepted(tmp_path):
    model = zoo.matmul_chain()
    oqq.quantize_static(model, tmp_path / "q.onnx", iter(zoo.random_feeds(model, 2)),
                        quant_format=ortq.QuantFormat.QDQ,
                        activation_type=ortq.QuantType.QUInt8,
                        weight_type=ortq.QuantType.QUInt8,
                        calibrate_method=ortq.CalibrationMethod.MinMax)
    assert set(_input_types(onnx.load(str(tmp_path / "q.onnx"))).values()) == {(U8, U8)}


# ---------------------------------------------------------------------------------------------
# Readers and model inputs.

class _OursReader(oqq.CalibrationDataReader):
    def __init__(self, feeds):
        self._feeds = iter(feeds)

    def get_next(self):
        return next(self._feeds, None)


class _OrtReader(ortq.CalibrationDataReader):
    def __init__(self, feeds):
        self._feeds = iter(feeds)

    def get_next(self):
        return next(self._feeds, None)


def test_readers_of_both_libraries_give_the_same_model(tmp_path):
    model = zoo.matmul_chain()
    feeds = zoo.random_feeds(model, 4)
    results = []
    for reader_class in (_OursReader, _OrtReader):
        out = tmp_path / f"{reader_class.__name__}.onnx"
        oqq.quantize_static(model, out, reader_class(feeds))
        results.append(_activation_qparams(onnx.load(str(out))))
    assert results[0] == results[1]
    assert results[0]["x"][0] == pytest.approx(
        (max(f["x"].max() for f in feeds) - min(f["x"].min() for f in feeds)) / 255, rel=1e-6)


def test_model_proto_input_is_not_modified(tmp_path):
    model = zoo.cnn()
    before = model.SerializeToString()
    feeds = zoo.random_feeds(model, 2)
    result = oqq.quantize_static(model, tmp_path / "q.onnx", _OursReader(feeds))
    assert model.SerializeToString() == before
    assert result.output_files == [tmp_path / "q.onnx"]


def test_missing_reader(tmp_path):
    with pytest.raises(CalibrationError, match="no calibration data"):
        oqq.quantize_static(zoo.matmul_chain(), tmp_path / "q.onnx")
    assert not (tmp_path / "q.onnx").exists()


def test_external_data_format(tmp_path):
    model = zoo.matmul_chain()
    result = oqq.quantize_static(model, tmp_path / "q.onnx", iter(zoo.random_feeds(model, 2)),
                                 use_external_data_format=True)
    assert result.output_files == [tmp_path / "q.onnx", tmp_path / "q.onnx.data"]


# ---------------------------------------------------------------------------------------------
# extra_options.

@pytest.mark.parametrize(("key", "value", "field", "expected"), [
    ("ActivationSymmetric", True, "activation_symmetric", True),
    ("WeightSymmetric", False, "weight_symmetric", False),
    ("WeightSymmetric", None, "weight_symmetric", None),
    ("QuantizeBias", False, "quantize_bias", False),
    ("MinimumRealRange", 0.0001, "min_real_range", 0.0001),
    ("QDQKeepRemovableActivations", True, "keep_removable_activations", True),
    ("EnableSubgraph", False, "subgraphs", False),
    ("EnableSubgraph", True, "subgraphs", True),
    ("CalibMovingAverage", True, "moving_average", True),
    ("CalibMovingAverageConstant", 0.5, "averaging_constant", 0.5),
])
def test_extra_option_fields(key, value, field, expected):
    assert getattr(_to_native_config(extra_options={key: value}), field) == expected


def test_argument_fields():
    config = _to_native_config(
        op_types_to_quantize=["Conv"], per_channel=True, reduce_range=True,
        activation_type=oqq.QuantType.QUInt16, weight_type="QInt4", nodes_to_quantize=["a"],
        nodes_to_exclude=["b"], use_external_data_format=True,
        calibration_providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert (config.activation_type, config.weight_type) == (onnxquant.UINT16, onnxquant.INT4)
    assert (config.per_channel, config.reduce_range, config.external_data) == (True, True, True)
    assert (config.op_types, config.nodes_to_quantize, config.nodes_to_exclude) == (
        {"Conv"}, {"a"}, {"b"})
    assert config.providers == ("CUDAExecutionProvider", "CPUExecutionProvider")
    default = _to_native_config(op_types_to_quantize=[], nodes_to_quantize=[])
    assert (default.op_types, default.nodes_to_quantize, default.nodes_to_exclude) == (
        None, None, frozenset())
    assert (default.subgraphs, default.external_data, default.providers) == (
        True, None, ("CPUExecutionProvider",))


@pytest.mark.parametrize(("key", "value"), [
    ("ActivationSymmetric", "yes"), ("QuantizeBias", 2), ("MinimumRealRange", -1.0),
    ("MinimumRealRange", float("nan")), ("CalibMovingAverageConstant", 0),
    ("CalibMovingAverageConstant", True),
])
def test_invalid_extra_option_values(key, value):
    with pytest.raises(ValueError, match=key) as info:
        _to_native_config(extra_options={key: value})
    assert isinstance(info.value, QuantizationError)


@MODULES
def test_activation_symmetric(tmp_path, q):
    model = zoo.matmul_chain()
    path = _saved(tmp_path, model)
    feeds = zoo.random_feeds(model, 4)
    plain = _activation_qparams(_script(q, path, tmp_path / "p.onnx", feeds))
    symmetric = _activation_qparams(_script(q, path, tmp_path / "s.onnx", feeds,
                                            extra_options={"ActivationSymmetric": True}))
    assert any(zp != 0 for _, zp in plain.values())
    assert plain.keys() <= symmetric.keys()  # symmetric ranges keep Relu (and its Q/DQ)
    assert all(zp == 0 for _, zp in symmetric.values())
    unsigned = _activation_qparams(_script(q, path, tmp_path / "u.onnx", feeds, activation="QUInt8",
                                           extra_options={"ActivationSymmetric": True}))
    assert all(zp == 128 for _, zp in unsigned.values())


@MODULES
def test_quantize_bias_false_and_keep_removable_activations(tmp_path, q):
    model = zoo.cnn()
    path = _saved(tmp_path, model)
    feeds = zoo.random_feeds(model, 4)
    default = _script(q, path, tmp_path / "d.onnx", feeds)
    assert not {"Relu", "Clip"} & set(_ops(default))  # folded into the quantized ranges
    assert [types[2] for types in _input_types(default).values()] == [I32] * 4  # conv1-3, gemm
    changed = _script(q, path, tmp_path / "c.onnx", feeds, extra_options={
        "QuantizeBias": False, "QDQKeepRemovableActivations": True})
    assert (_ops(changed).count("Relu"), _ops(changed).count("Clip")) == (2, 1)
    assert not any(t.data_type == I32 for t in changed.graph.initializer)
    assert [types[2] for types in _input_types(changed).values()] == [None] * 4  # float bias


def test_minimum_real_range(tmp_path):
    model = zoo.matmul_chain()
    _, ours = _both(tmp_path, model, zoo.random_feeds(model, 4),
                    extra_options={"MinimumRealRange": 100.0})
    scales = [scale for scale, _ in _activation_qparams(ours).values()]
    assert scales and min(scales) >= 100.0 / 255 * (1 - 1e-6)


def test_calib_moving_average(tmp_path, caplog):
    model = zoo.matmul_chain()
    feeds = [{"x": f["x"] * (i + 1)} for i, f in enumerate(zoo.random_feeds(model, 4))]
    low, high = 0.0, 0.0
    for i, feed in enumerate(feeds):  # EMA of per-feed ranges, newest weight 0.5
        lo, hi = float(feed["x"].min()), float(feed["x"].max())
        low, high = (lo, hi) if i == 0 else (low + 0.5 * (lo - low), high + 0.5 * (hi - high))
    with caplog.at_level(logging.WARNING, logger="onnxquant"):
        oqq.quantize_static(model, tmp_path / "q.onnx", _OursReader(feeds), extra_options={
            "CalibMovingAverage": True, "CalibMovingAverageConstant": 0.5})
    scale, _ = _activation_qparams(onnx.load(str(tmp_path / "q.onnx")))["x"]
    assert scale == pytest.approx((max(high, 0) - min(low, 0)) / 255, rel=1e-6)
    assert any("CalibMovingAverage" in r.getMessage() for r in _ours(caplog))


def test_enable_subgraph(tmp_path):
    model = zoo.if_subgraph_model()
    feeds = zoo.random_feeds(model, 2)

    def subgraph_ops(extra):
        oqq.quantize_static(model, tmp_path / "q.onnx", iter(feeds), extra_options=extra)
        graph = onnx.load(str(tmp_path / "q.onnx")).graph
        return {op for node in graph.node for attr in node.attribute if attr.g.node
                for op in _ops(onnx.helper.make_model(attr.g))}

    assert "QuantizeLinear" in subgraph_ops(None)
    assert "QuantizeLinear" not in subgraph_ops({"EnableSubgraph": False})


def _ours(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records
            if r.name.startswith("onnxquant") and r.levelno >= logging.WARNING]


@pytest.mark.parametrize(("options", "needle"), [
    ({"ActivationSymetric": True}, "Did you mean 'ActivationSymmetric'"),
    ({"NoSuchOption": 1}, "NoSuchOption"),
])
def test_extra_options_that_warn(caplog, options, needle):
    with caplog.at_level(logging.INFO, logger="onnxquant"):
        _to_native_config(extra_options=options)
    records = _ours(caplog)
    assert len(records) == 1 and needle in records[0].getMessage()


@pytest.mark.parametrize("options", [
    {"ForceQuantizeNoInputCheck": True}, {"MatMulConstBOnly": True},
    {"CalibMaxIntermediateOutputs": 2}, {"CalibStridedMinMax": 2},
    {"DedicatedQDQPair": False}, {"TensorQuantOverrides": {}}, {"BlockSize": 0},
    {"SmoothQuant": False}, {"AddQDQPairToWeight": False}, {"UseQDQContribOps": False},
    {"OpTypesToExcludeOutputQuantization": []}, {"ActivationRestrictedAsymmetric": False},
])
def test_extra_options_accepted_quietly(caplog, options):
    with caplog.at_level(logging.INFO, logger="onnxquant"):
        _to_native_config(extra_options=options)
    assert _ours(caplog) == []


def test_smooth_quant_option_maps_to_the_native_correction():
    config = _to_native_config(extra_options={"SmoothQuant": True, "SmoothQuantAlpha": 0.7})
    assert config.smooth_quant and config.smooth_quant_alpha == 0.7
    with pytest.raises(QuantizationError, match="SmoothQuantAlpha"):
        _to_native_config(extra_options={"SmoothQuant": True, "SmoothQuantAlpha": 2})


def test_unknown_option_warns_and_still_quantizes(tmp_path, caplog):
    model = zoo.matmul_chain()
    with caplog.at_level(logging.WARNING):
        _script(oqq, _saved(tmp_path, model), tmp_path / "q.onnx", zoo.random_feeds(model, 2),
                extra_options={"MadeUpOption": True})
    assert [r.getMessage() for r in _ours(caplog)] == [
        "Unknown extra_options key 'MadeUpOption' is ignored."]
    assert "QuantizeLinear" in _ops(onnx.load(str(tmp_path / "q.onnx")))


# ---------------------------------------------------------------------------------------------
# Unsupported arguments and invalid combinations.

@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"activation_type": oqq.QuantType.QFLOAT8E4M3FN,
      "weight_type": oqq.QuantType.QFLOAT8E4M3FN}, "needs calibrate_method=.*Distribution"),
    ({"activation_type": oqq.QuantType.QFLOAT8E4M3FN, "weight_type": oqq.QuantType.QInt8,
      "calibrate_method": oqq.CalibrationMethod.Distribution}, "both activation_type"),
])
def test_float8_rules_of_onnxruntime(tmp_path, kwargs, needle):
    model = zoo.matmul_chain()
    with pytest.raises(ValueError, match=needle):
        oqq.quantize_static(model, tmp_path / "q.onnx", iter(zoo.random_feeds(model, 2)), **kwargs)
    assert not (tmp_path / "q.onnx").exists()


@MODULES
def test_int8_activations_with_uint8_weights_rejected(tmp_path, q):
    model = zoo.matmul_chain()
    with pytest.raises(ValueError, match="QInt8.*QUInt8") as info:
        _script(q, _saved(tmp_path, model), tmp_path / "q.onnx", zoo.random_feeds(model, 2),
                activation="QInt8", weight="QUInt8")
    assert q is ortq or isinstance(info.value, QuantizationError)
    assert not (tmp_path / "q.onnx").exists()


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"activation_type": "QInt9"}, "activation_type"),
    ({"quant_format": 7}, "quant_format"),
    ({"nodes_to_exclude": "conv1"}, "nodes_to_exclude"),
    ({"calibration_providers": "CPUExecutionProvider"}, "calibration_providers"),
])
def test_invalid_arguments(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        _to_native_config(**kwargs)


# ---------------------------------------------------------------------------------------------
# quantize(model_in, model_out, config).

def test_quantize_with_static_config(tmp_path):
    model = zoo.matmul_chain()
    feeds = zoo.random_feeds(model, 4)
    path = _saved(tmp_path, model)
    oqq.quantize_static(path, tmp_path / "direct.onnx", _OursReader(feeds), per_channel=True,
                        activation_type=oqq.QuantType.QUInt8)
    for config_class, name in ((oqq.StaticQuantConfig, "ours"), (ortq.StaticQuantConfig, "ort")):
        module = oqq if config_class is oqq.StaticQuantConfig else ortq
        config = config_class(_OursReader(feeds), per_channel=True,
                              activation_type=module.QuantType.QUInt8)
        assert config.op_types_to_quantize == [] and config.extra_options == {}
        oqq.quantize(path, tmp_path / f"{name}.onnx", config)
        assert (onnx.load(str(tmp_path / f"{name}.onnx")).SerializeToString()
                == onnx.load(str(tmp_path / "direct.onnx")).SerializeToString())


@pytest.mark.parametrize("config", [object()], ids=["object"])
def test_quantize_rejects_other_configs(tmp_path, config):
    with pytest.raises(TypeError, match="StaticQuantConfig") as info:
        oqq.quantize(zoo.matmul_chain(), tmp_path / "q.onnx", config)
    assert isinstance(info.value, QuantizationError)
    assert not (tmp_path / "q.onnx").exists()


def test_calibration_extra_options_are_mapped():
    native = _to_native_config(calibrate_method=oqq.CalibrationMethod.Entropy,
                               extra_options={"CalibTensorRangeSymmetric": True,
                                              "CalibPercentile": 99.9},
                               calibration_cache_path="stats.json")
    assert native.calibration_method.value == "entropy"
    assert (native.symmetric_ranges, native.percentile) == (True, 99.9)
    assert native.calibration_cache == "stats.json"
    with pytest.raises(ValueError, match="CalibPercentile"):
        _to_native_config(extra_options={"CalibPercentile": 150})
