"""write_calibration_table: TensorRT's TrtTable flatbuffer (read back with the flatbuffers
package), calibration.json and calibration.cache, with max(|low|, |high|) values."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flatbuffers import encode, packer, table

from onnxquant.core.errors import OutputPathError, QuantizationError
from onnxquant.ort import quant_utils
from onnxquant.ort._trt_table import read_calibration_flatbuffer
from onnxquant.ort.calibrate import CalibrationMethod, TensorData, TensorsData

RANGES = {"b": (-3.5, 1.25), "a": (0.0, 2.0), "c/neg": (-7.0, -1.0), "d": (-0.5, 0.25)}


def _f32(x):
    return np.array([x], np.float32)


def _own_reader(data: bytes) -> dict[str, str]:
    """An independent reader: walks the buffer by hand (root -> vtable -> vector -> tables)."""
    buf = bytearray(data)
    root = table.Table(buf, encode.Get(packer.uoffset, buf, 0))
    field = root.Offset(4)
    assert field, "TrtTable.dict is missing"
    out = {}
    start = root.Vector(field)
    for i in range(root.VectorLen(field)):
        kv = table.Table(buf, root.Indirect(start + 4 * i))
        out[kv.String(kv.Offset(4) + kv.Pos).decode()] = kv.String(kv.Offset(6) + kv.Pos).decode()
    return out


def _expected(ranges):
    return {k: max(abs(lo), abs(hi)) for k, (lo, hi) in ranges.items()}


def test_pairs_written_as_absolute_max(tmp_path):
    quant_utils.write_calibration_table(RANGES, dir=tmp_path)
    table_ = _own_reader((tmp_path / "calibration.flatbuffers").read_bytes())
    assert {k: float(v) for k, v in table_.items()} == _expected(RANGES)
    assert table_["c/neg"] == "7.0"  # onnxruntime would write max(-1, -7) = -1.0
    assert list(table_) == sorted(RANGES)
    assert read_calibration_flatbuffer((tmp_path / "calibration.flatbuffers").read_bytes()) \
        == table_
    lines = (tmp_path / "calibration.cache").read_text().splitlines()
    assert lines == [f"{k} {_expected(RANGES)[k]}" for k in sorted(RANGES)]
    data = json.loads((tmp_path / "calibration.json").read_text())
    assert data["b"]["lowest"]["data"] == -3.5 and data["b"]["CLS"] == "TensorData"
    assert not list(tmp_path.glob(".*tmp"))


def test_tensors_data_and_per_channel(tmp_path):
    tds = TensorsData(CalibrationMethod.MinMax, {
        "x": TensorData(lowest=_f32(-0.75), highest=_f32(0.5)),
        "w": TensorData(lowest=np.array([-1, -4], np.float32),
                        highest=np.array([2, 3], np.float32)),
    })
    quant_utils.write_calibration_table(tds, tmp_path)
    table_ = _own_reader((tmp_path / "calibration.flatbuffers").read_bytes())
    assert table_ == {"w": "4.0", "x": "0.75"}
    data = json.loads((tmp_path / "calibration.json").read_text())
    assert data["w"]["lowest"] == {"data": [-1.0, -4.0], "dtype": "float32",
                                   "CLS": "numpy.array"}


def test_errors_leave_nothing(tmp_path):
    with pytest.raises(OutputPathError, match="does not exist"):
        quant_utils.write_calibration_table(RANGES, dir=tmp_path / "missing")
    with pytest.raises(QuantizationError, match="'bad'"):
        quant_utils.write_calibration_table({"ok": (0, 1), "bad": (np.nan, 1)}, tmp_path)
    with pytest.raises(QuantizationError, match="no calibrated range"):
        quant_utils.write_calibration_table(
            {"d": TensorData(avg=np.float32(0), std=np.float32(1))}, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_overwrites_atomically(tmp_path):
    quant_utils.write_calibration_table({"a": (0, 1)}, tmp_path)
    quant_utils.write_calibration_table({"b": (-2, 1)}, tmp_path)
    assert _own_reader((tmp_path / "calibration.flatbuffers").read_bytes()) == {"b": "2.0"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "calibration.cache", "calibration.flatbuffers", "calibration.json"]


def test_empty_table_is_valid(tmp_path):
    quant_utils.write_calibration_table({}, tmp_path)
    assert _own_reader((tmp_path / "calibration.flatbuffers").read_bytes()) == {}


def _cli_model(path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 4])
    z = helper.make_tensor_value_info("Z", TensorProto.FLOAT, ["N", 4])
    scale = numpy_helper.from_array(np.array([1, -3, 2, 0.5], np.float32), "C")
    graph = helper.make_graph([helper.make_node("Mul", ["X", "C"], ["Y"]),
                               helper.make_node("Relu", ["Y"], ["Z"])], "g", [x], [z], [scale])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def test_cli_writes_table_of_absmax_ranges(tmp_path):
    import os
    import subprocess
    import sys

    _cli_model(tmp_path / "m.onnx")
    rng = np.random.default_rng(3)
    feeds = [rng.normal(size=(2, 4)).astype(np.float32) for _ in range(3)]
    (tmp_path / "calib").mkdir()
    for i, x in enumerate(feeds):
        np.savez(tmp_path / "calib" / f"f{i}.npz", X=x)
    (tmp_path / "trt").mkdir()
    run = subprocess.run(
        [sys.executable, "-m", "onnxquant", "calibrate", "m.onnx", "--calib", "calib",
         "--trt-table", "trt"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONIOENCODING": "utf-8"}, check=False)
    assert run.returncode == 0, run.stderr
    table_ = _own_reader((tmp_path / "trt" / "calibration.flatbuffers").read_bytes())
    x = np.concatenate(feeds)
    y = x * np.array([1, -3, 2, 0.5], np.float32)
    expected = {"X": np.abs(x).max(), "Y": np.abs(y).max()}
    for name, value in expected.items():
        assert float(table_[name]) == float(value), name
    missing = subprocess.run(
        [sys.executable, "-m", "onnxquant", "calibrate", "m.onnx", "--calib", "calib",
         "--trt-table", "nowhere"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
        check=False)
    assert missing.returncode != 0 and "nowhere" in missing.stderr
