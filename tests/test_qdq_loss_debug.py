"""onnxquant.ort.qdq_loss_debug against onnxruntime's own module.

On QDQ models made by onnxruntime both modules must give the same keys at every stage of the
pipeline (augment, collect, match activations, match weights, errors) and the same values,
except where onnxruntime's weight matching wraps around (uint8 weights with a non-zero zero
point), where ours must equal an independent int64 dequantization. On onnxquant's QDQ models
the activations must be keyed by the float tensor they replace (a fused Relu included).
"""

from __future__ import annotations

import math
from pathlib import Path

import dequant_reference as ref
import model_zoo as zoo
import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType
from onnxruntime.quantization import qdq_loss_debug as ort_debug
from onnxruntime.quantization import quantize_static as ort_quantize_static

import onnxquant
from onnxquant import ModelLoadError, OutputPathError
from onnxquant.ort import qdq_loss_debug as ours

CALIB = 4
ERR_TOL_DB = 1e-3


class ListReader(CalibrationDataReader):
    """onnxruntime's reader protocol over a list of feeds (fresh for every use)."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._feeds = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def _pipeline(module, float_path: Path, quant_path: Path, feeds: list, folder: Path) -> dict:
    """Every stage of the qdq_loss_debug pipeline with ``module`` (ours or onnxruntime's)."""
    tag = "ours" if module is ours else "ort"
    aug_float, aug_quant = folder / f"{tag}_float_aug.onnx", folder / f"{tag}_quant_aug.onnx"
    module.modify_model_output_intermediate_tensors(str(float_path), str(aug_float))
    module.modify_model_output_intermediate_tensors(str(quant_path), str(aug_quant))
    float_acts = module.collect_activations(str(aug_float), ListReader(feeds))
    quant_acts = module.collect_activations(str(aug_quant), ListReader(feeds))
    acts = module.create_activation_matching(quant_acts, float_acts)
    weights = module.create_weight_matching(str(float_path), str(quant_path))
    return {"float_acts": float_acts, "quant_acts": quant_acts, "acts": acts,
            "weights": weights, "act_err": module.compute_activation_error(acts),
            "weight_err": module.compute_weight_error(weights)}


def _ort_quantize(model: onnx.ModelProto, folder: Path, name: str, feeds: list,
                  **options: object) -> tuple[Path, Path]:
    float_path, quant_path = folder / f"{name}_float.onnx", folder / f"{name}_qdq.onnx"
    onnx.save(model, float_path)
    ort_quantize_static(str(float_path), str(quant_path), ListReader(feeds),
                        quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                        **options)
    return float_path, quant_path


def _wraps_in_onnxruntime(quant: onnx.ModelProto, stored: str) -> bool:
    """onnxruntime subtracts the zero point in the stored type: unsigned data below its zero
    point wraps around."""
    values = ref.constants(quant)
    q = values[stored].astype(np.int64)
    if values[stored].dtype.kind != "u":
        return False
    dq = next(n for n in quant.graph.node
              if n.op_type == "DequantizeLinear" and n.input[0] == stored)
    zero = values[dq.input[2]].astype(np.int64) if len(dq.input) > 2 else np.zeros(1, np.int64)
    if zero.size > 1:
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1) % q.ndim
        view = [1] * q.ndim
        view[axis] = -1
        zero = zero.reshape(view)
    return bool(np.any(q < zero.reshape(()) if zero.size == 1 else q < zero))


# -- 1. onnxruntime-made QDQ models: same keys and values ------------------------------------
ORT_CASES = [("cnn", False), ("cnn", True), ("matmul_chain", False), ("matmul_chain", True),
             # weights in Constant nodes: onnxruntime quantizes them at run time, Q(Constant)
             ("constant_weights_cnn", False)]


@pytest.fixture(scope="module", params=ORT_CASES, ids=[f"{m}-{'pc' if pc else 'pt'}"
                                                      for m, pc in ORT_CASES])
def ort_case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    name, per_channel = request.param
    folder = tmp_path_factory.mktemp(f"ort_{name}_{per_channel}")
    model = getattr(zoo, name)()
    feeds = zoo.random_feeds(model, CALIB, seed=1)
    float_path, quant_path = _ort_quantize(model, folder, name, feeds, per_channel=per_channel,
                                           weight_type=QuantType.QInt8)
    return {"quant": onnx.load(quant_path),
            "ort": _pipeline(ort_debug, float_path, quant_path, feeds, folder),
            "ours": _pipeline(ours, float_path, quant_path, feeds, folder)}


def test_same_keys_at_every_stage(ort_case: dict) -> None:
    theirs, mine = ort_case["ort"], ort_case["ours"]
    for stage in theirs:
        assert set(mine[stage]) == set(theirs[stage]), stage
    for stage in ("acts", "weights", "act_err"):
        for key, value in theirs[stage].items():
            assert set(mine[stage][key]) == set(value), (stage, key)
    assert theirs["acts"], "onnxruntime matched no activation: the case tests nothing"
    assert all("float" in v for v in mine["acts"].values())


def test_same_collected_and_matched_activations(ort_case: dict) -> None:
    theirs, mine = ort_case["ort"], ort_case["ours"]
    for stage in ("float_acts", "quant_acts"):
        for name, arrays in theirs[stage].items():
            assert len(mine[stage][name]) == len(arrays) == CALIB
            for a, b in zip(arrays, mine[stage][name], strict=True):
                np.testing.assert_array_equal(b, a, err_msg=f"{stage} {name}")
    for name, match in theirs["acts"].items():
        for field in ("pre_qdq", "post_qdq", "float"):
            for a, b in zip(match[field], mine["acts"][name][field], strict=True):
                np.testing.assert_array_equal(b, a, err_msg=f"{name} {field}")


def test_same_float_weights(ort_case: dict) -> None:
    theirs, mine = ort_case["ort"]["weights"], ort_case["ours"]["weights"]
    for name, match in theirs.items():
        assert mine[name]["float"].dtype == match["float"].dtype
        np.testing.assert_array_equal(mine[name]["float"], match["float"], err_msg=name)


def test_same_activation_errors(ort_case: dict) -> None:
    theirs, mine = ort_case["ort"]["act_err"], ort_case["ours"]["act_err"]
    for name, errors in theirs.items():
        for kind, db in errors.items():
            assert mine[name][kind] == pytest.approx(db, abs=ERR_TOL_DB), (name, kind)


def test_same_weight_errors_unless_onnxruntime_wraps(ort_case: dict) -> None:
    quant = ort_case["quant"]
    theirs, mine = ort_case["ort"], ort_case["ours"]
    for name, db in theirs["weight_err"].items():
        stored = f"{name}_quantized"
        expected = ref.dequantize(quant, stored)
        np.testing.assert_allclose(mine["weights"][name]["dequantized"], expected, rtol=1e-12)
        if _wraps_in_onnxruntime(quant, stored):
            # matmul_chain's Add biases are stored uint8 with a zero point: onnxruntime's
            # uint8 subtraction wraps and its SQNR is meaningless.
            assert mine["weight_err"][name] > 30
            assert db < mine["weight_err"][name] - 20, name
        else:
            np.testing.assert_allclose(mine["weights"][name]["dequantized"],
                                       theirs["weights"][name]["dequantized"], rtol=1e-6)
            assert mine["weight_err"][name] == pytest.approx(db, abs=ERR_TOL_DB), name


def test_pairs_recorded_by_structure(ort_case: dict) -> None:
    """The pairs come from the augmented model's metadata, and agree with onnxruntime's
    suffix naming on its own models."""
    quant_acts = ort_case["ours"]["quant_acts"]
    assert set(quant_acts.pairs) == set(ort_case["ort"]["acts"])
    for key, (pre, post) in quant_acts.pairs.items():
        assert pre in quant_acts and post in quant_acts, key


# -- onnxruntime's uint8 per-channel wrap-around ---------------------------------------------
@pytest.fixture(scope="module", params=["cnn", "matmul_chain"])
def uint8_case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
               ) -> dict:
    folder = tmp_path_factory.mktemp(f"u8_{request.param}")
    model = getattr(zoo, request.param)()
    feeds = zoo.random_feeds(model, CALIB, seed=1)
    float_path, quant_path = _ort_quantize(model, folder, request.param, feeds,
                                           per_channel=True, weight_type=QuantType.QUInt8,
                                           extra_options={"WeightSymmetric": False})
    return {"quant": onnx.load(quant_path),
            "ort": ort_debug.compute_weight_error(
                ort_debug.create_weight_matching(str(float_path), str(quant_path))),
            "ours": ours.create_weight_matching(str(float_path), str(quant_path))}


def test_uint8_per_channel_weights_do_not_wrap(uint8_case: dict) -> None:
    quant, theirs, mine = uint8_case["quant"], uint8_case["ort"], uint8_case["ours"]
    errors = ours.compute_weight_error(mine)
    assert set(errors) == set(theirs)
    wrapped = []
    for name, match in mine.items():
        expected = ref.dequantize(quant, f"{name}_quantized")
        np.testing.assert_allclose(match["dequantized"], expected, rtol=1e-12, err_msg=name)
        assert errors[name] == pytest.approx(ref.sqnr_db(match["float"], expected), abs=1e-9)
        assert errors[name] > 30, name
        if _wraps_in_onnxruntime(quant, f"{name}_quantized"):
            wrapped.append(name)
            assert theirs[name] < 0 or theirs[name] < errors[name] - 20, name
        else:
            assert errors[name] == pytest.approx(theirs[name], abs=ERR_TOL_DB), name
    per_channel = [n for n in mine if n.endswith("_W")]
    assert per_channel and set(per_channel) <= set(wrapped)


# -- activation error without float activations ----------------------------------------------
def test_activation_error_without_float(ort_case: dict) -> None:
    quant_acts = ort_case["ours"]["quant_acts"]
    matched = ours.create_activation_matching(quant_acts)
    assert matched and all(set(m) == {"pre_qdq", "post_qdq"} for m in matched.values())
    errors = ours.compute_activation_error(matched)
    assert set(errors) == set(matched)
    for name, err in errors.items():
        assert set(err) == {"qdq_err"}
        assert err["qdq_err"] == pytest.approx(ort_case["ours"]["act_err"][name]["qdq_err"])
    theirs = ort_debug.create_activation_matching(ort_case["ort"]["quant_acts"])
    with pytest.raises(KeyError):
        ort_debug.compute_activation_error(theirs)


# -- SQNR -----------------------------------------------------------------------------------
def _reference_sqnr(x: list[np.ndarray], y: list[np.ndarray]) -> float:
    left = np.concatenate([np.asarray(a, np.float64).ravel() for a in x])
    right = np.concatenate([np.asarray(a, np.float64).ravel() for a in y])
    eps = np.finfo(float).eps
    return 20 * math.log10(max(np.linalg.norm(left), eps) / max(np.linalg.norm(left - right),
                                                                  eps))


_arrays = st.lists(hnp.arrays(np.float64, st.integers(1, 40),
                              elements=st.floats(-1e3, 1e3, allow_nan=False, width=64)),
                   min_size=1, max_size=4)


@settings(max_examples=60, deadline=None)
@given(x=_arrays, seed=st.integers(0, 2**32 - 1), noise=st.floats(1e-6, 10.0))
def test_sqnr_matches_formula(x: list[np.ndarray], seed: int, noise: float) -> None:
    rng = np.random.default_rng(seed)
    y = [a + rng.standard_normal(a.shape) * noise for a in x]
    expected = _reference_sqnr(x, y)
    assert ours.compute_signal_to_quantization_noice_ratio(x, y) == pytest.approx(expected,
                                                                                  rel=1e-9)
    # onnxruntime's, in float64 input, agrees
    assert ort_debug.compute_signal_to_quantization_noice_ratio(x, y) == pytest.approx(
        expected, rel=1e-9, abs=1e-9)
    if len(x) == 1:
        assert ours.compute_signal_to_quantization_noice_ratio(x[0], y[0]) == pytest.approx(
            expected, rel=1e-9)


@settings(max_examples=40, deadline=None)
@given(x=_arrays)
def test_sqnr_of_identical_inputs(x: list[np.ndarray]) -> None:
    eps = np.finfo(float).eps
    norm = np.linalg.norm(np.concatenate([a.ravel() for a in x]))
    expected = 20 * math.log10(max(norm, eps) / eps)
    got = ours.compute_signal_to_quantization_noice_ratio(x, [a.copy() for a in x])
    assert got == pytest.approx(expected, rel=1e-12)


def test_sqnr_of_float32_is_computed_in_float64() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal(10_000).astype(np.float32)
    y = (x + np.float32(1e-4) * rng.standard_normal(10_000).astype(np.float32)).astype(
        np.float32)
    got = ours.compute_signal_to_quantization_noice_ratio(x, y)
    assert got == pytest.approx(_reference_sqnr([x], [y]), rel=1e-12)


# -- 2. onnxquant-made QDQ models through the onnxruntime-compatible pipeline ------------------
CNN_ACTIVATIONS = {"image", "relu1_out", "maxpool1_out", "clip1_out", "avgpool1_out",
                   "conv3_out", "relu2_out", "gap_out", "flatten_out", "logits"}


@pytest.fixture(scope="module", params=["per_tensor", "per_channel", "uint16"])
def onnxquant_cnn(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
                  ) -> dict:
    options = {"per_tensor": {}, "per_channel": {"per_channel": True},
               "uint16": {"activation_type": onnxquant.UINT16,
                          "weight_type": onnxquant.INT8}}[request.param]
    folder = tmp_path_factory.mktemp(f"oq_{request.param}")
    model = zoo.cnn()
    feeds = zoo.random_feeds(model, CALIB, seed=1)
    float_path, quant_path = folder / "cnn.onnx", folder / "cnn_qdq.onnx"
    onnx.save(model, float_path)
    onnxquant.quantize_static(model, quant_path, feeds, onnxquant.StaticQuantConfig(
        bias_correction=False, **options))
    return _pipeline(ours, float_path, quant_path, feeds, folder)


def test_onnxquant_activations_keyed_by_float_tensor(onnxquant_cnn: dict) -> None:
    acts = onnxquant_cnn["acts"]
    assert set(acts) == CNN_ACTIVATIONS
    pairs = onnxquant_cnn["quant_acts"].pairs
    # the fused BatchNorm+Relu and Clip: the Conv output stands for the activation's output
    assert pairs["relu1_out"][0] == "conv1_out"
    assert pairs["clip1_out"][0] == "conv2_out"
    for name, match in acts.items():
        assert "float" in match, name
        assert len(match["float"]) == len(match["post_qdq"]) == CALIB


def test_onnxquant_cross_model_error_is_small(onnxquant_cnn: dict) -> None:
    errors = onnxquant_cnn["act_err"]
    for name, err in errors.items():
        assert err["xmodel_err"] > 25, (name, err)
    # what pairing the fused Relu with the pre-Relu float tensor would have given instead
    wrong = ours.compute_signal_to_quantization_noice_ratio(
        onnxquant_cnn["float_acts"]["bn1_out"], onnxquant_cnn["acts"]["relu1_out"]["post_qdq"])
    assert wrong < 10 < errors["relu1_out"]["xmodel_err"]


def test_onnxquant_weights_and_errors(onnxquant_cnn: dict) -> None:
    weights, errors = onnxquant_cnn["weights"], onnxquant_cnn["weight_err"]
    assert {"conv1_bn_weight", "conv1_bn_bias", "conv2_W", "conv3_W", "fc_W"} <= set(weights)
    for name, db in errors.items():
        assert db > 30, (name, db)
        assert weights[name]["dequantized"].shape == weights[name]["float"].shape


# -- 4. error handling ------------------------------------------------------------------------
@pytest.fixture
def float_file(tmp_path: Path) -> Path:
    path = tmp_path / "model.onnx"
    onnx.save(zoo.matmul_chain(), path)
    return path


def test_output_path_equal_to_input_is_refused(float_file: Path) -> None:
    before = float_file.read_bytes()
    (float_file.parent / "sub").mkdir()
    for output in (float_file, str(float_file),
                   float_file.parent / "sub" / ".." / float_file.name):
        with pytest.raises(OutputPathError):
            ours.modify_model_output_intermediate_tensors(float_file, output)
        assert float_file.read_bytes() == before


def test_missing_input_raises_model_load_error(tmp_path: Path) -> None:
    output = tmp_path / "augmented.onnx"
    with pytest.raises(ModelLoadError):
        ours.modify_model_output_intermediate_tensors(tmp_path / "absent.onnx", output)
    assert not output.exists()


def test_augmented_model_keeps_the_original_outputs(float_file: Path, tmp_path: Path) -> None:
    output = tmp_path / "augmented.onnx"
    ours.modify_model_output_intermediate_tensors(float_file, output, ["MatMul"])
    augmented = onnx.load(output)
    names = [o.name for o in augmented.graph.output]
    assert names[0] == "y"
    saved = {n[: -len("_ReshapedSavedOutput")] for n in names[1:]}
    assert saved == {"x", "relu_0_out", "relu_1_out", "matmul_0_out", "matmul_1_out",
                     "matmul_2_out"}


@pytest.mark.parametrize("reader", ["onnxruntime_reader", "empty_list"])
def test_collect_on_empty_reader_raises(float_file: Path, tmp_path: Path, reader: str) -> None:
    output = tmp_path / "augmented.onnx"
    ours.modify_model_output_intermediate_tensors(float_file, output)
    source = ListReader([]) if reader == "onnxruntime_reader" else []
    with pytest.raises(RuntimeError, match="No data is collected"):
        ours.collect_activations(output, source)
    with pytest.raises(RuntimeError, match="No data is collected"):
        ort_debug.collect_activations(str(output), ListReader([]))


def test_sqnr_of_scalars() -> None:
    """Scalar weights (a LayerNorm epsilon, a GELU constant) come as 0-d values."""
    value = ours.compute_signal_to_quantization_noice_ratio(np.float64(2.0), np.float64(1.9))
    assert value == pytest.approx(20 * math.log10(2.0 / 0.1))
    assert ours.compute_weight_error({"eps": {"float": np.float32(1e-5),
                                              "dequantized": np.float32(1e-5)}})["eps"] > 100
