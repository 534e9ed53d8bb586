"""Models below opset 11 brought to opset 11 (Upsample -> Resize) by
``onnxquant.preprocess.legacy_opset`` and onnxruntime's ``quant_pre_process``; the converted
Resize is run in onnxruntime against the original Upsample."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxquant.core.errors import OutputPathError
from onnxquant.ort.shape_inference import quant_pre_process
from onnxquant.preprocess.legacy_opset import default_opset, upgrade_legacy_opset

F = TensorProto.FLOAT
X = np.random.default_rng(0).standard_normal((1, 2, 5, 4)).astype(np.float32)


def _upsample(opset: int, mode: str, scales: list[float]) -> onnx.ModelProto:
    inits = []
    if opset >= 9:
        node = helper.make_node("Upsample", ["x", "scales"], ["u"], name="up", mode=mode)
        inits.append(numpy_helper.from_array(np.array(scales, np.float32), "scales"))
    else:
        node = helper.make_node("Upsample", ["x"], ["u"], name="up", mode=mode, scales=scales)
    relu = helper.make_node("Relu", ["u"], ["y"], name="relu")
    graph = helper.make_graph([node, relu], "g", [helper.make_tensor_value_info("x", F, X.shape)],
                              [helper.make_tensor_value_info("y", F, ["n", "c", "h", "w"])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 6
    return model


def _run(model: onnx.ModelProto) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": X})[0]


@pytest.mark.parametrize("opset", [7, 9])
@pytest.mark.parametrize("mode", ["nearest", "linear"])
@pytest.mark.parametrize("scales", [[1.0, 1.0, 2.0, 2.0], [1.0, 1.0, 1.5, 2.5]])
def test_upsample_becomes_an_equivalent_resize(opset, mode, scales):
    model = _upsample(opset, mode, scales)
    converted = upgrade_legacy_opset(model)
    onnx.checker.check_model(converted)
    assert default_opset(converted) == 11
    assert [n.op_type for n in converted.graph.node] == ["Resize", "Relu"]
    assert {o.domain for o in converted.opset_import} == {""}
    np.testing.assert_array_equal(_run(converted), _run(model))
    assert model.graph.node[0].op_type == "Upsample"  # the input is not modified


def test_new_models_are_returned_as_they_are():
    model = _upsample(9, "nearest", [1.0, 1.0, 2.0, 2.0])
    converted = upgrade_legacy_opset(model)
    assert upgrade_legacy_opset(converted) is converted


def test_quant_pre_process_converts_opset_10_and_clip_6(tmp_path):
    # Upsample at opset 10 (deprecated there, so onnxruntime refuses to run it) computes what
    # Upsample-9 does.
    model = _upsample(9, "nearest", [1.0, 1.0, 2.0, 3.0])
    old = onnx.ModelProto()
    old.CopyFrom(model)
    old.opset_import[0].version = 10
    onnx.save(old, tmp_path / "up.onnx")
    quant_pre_process(tmp_path / "up.onnx", tmp_path / "up_out.onnx", skip_optimization=True,
                      skip_symbolic_shape=True)
    out = onnx.load(str(tmp_path / "up_out.onnx"))
    assert default_opset(out) == 11 and "Upsample" not in [n.op_type for n in out.graph.node]
    np.testing.assert_array_equal(_run(out), _run(model))
    # A Clip-6 that already takes its bounds as inputs is valid at opset 11.
    bounds = [numpy_helper.from_array(np.array(v, np.float32), n)
              for n, v in (("lo", -0.5), ("hi", 0.5))]
    graph = helper.make_graph([helper.make_node("Clip", ["x", "lo", "hi"], ["y"], name="clip")],
                              "g", [helper.make_tensor_value_info("x", F, X.shape)],
                              [helper.make_tensor_value_info("y", F, X.shape)], bounds)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 6)]),
              tmp_path / "clip.onnx")
    quant_pre_process(tmp_path / "clip.onnx", tmp_path / "clip_out.onnx",
                      skip_symbolic_shape=True)
    clip = onnx.load(str(tmp_path / "clip_out.onnx"))
    assert default_opset(clip) >= 11
    np.testing.assert_array_equal(_run(clip), np.clip(X, -0.5, 0.5))


def test_converting_still_refuses_to_overwrite_the_input(tmp_path):
    path = tmp_path / "up.onnx"
    onnx.save(_upsample(9, "nearest", [1.0, 1.0, 2.0, 2.0]), path)
    with pytest.raises(OutputPathError):
        quant_pre_process(path, path, skip_symbolic_shape=True)
