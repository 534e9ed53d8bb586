"""Bad inputs to ``quantize_static``: the error type, a message that names what is wrong and
where, and nothing written (no output, no temporary files) when it fails.

Also: calibration data with NaN/Inf batches still quantizes, from the finite batches.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import model_zoo as zoo
import numpy as np
import onnx
import pytest

import onnxquant
from onnxquant import (
    CalibrationError,
    FeedError,
    ModelLoadError,
    OutputPathError,
    QuantizationError,
    StaticQuantConfig,
    UnsupportedModelError,
    quantize_static,
)

FEEDS = 4


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``tmp_path`` as the cwd, with the system temp folder moved to ``tmp_path/systmp``."""
    systmp = tmp_path / "systmp"
    systmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(systmp))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def cnn_path(workdir: Path) -> Path:
    path = workdir / "cnn.onnx"
    onnx.save(zoo.cnn(), path)
    return path


def feeds(n: int = FEEDS, seed: int = 1) -> list[dict[str, np.ndarray]]:
    return zoo.random_feeds(zoo.cnn(), n, seed=seed)


def assert_nothing_written(workdir: Path, *expected: str) -> None:
    """Only ``expected`` (and the empty system temp folder) are left in ``workdir``."""
    assert sorted(p.name for p in workdir.iterdir()) == sorted({*expected, "systmp"})
    assert list((workdir / "systmp").iterdir()) == []


class CountingReader:
    """An ORT-style reader that records how many feeds were taken."""

    def __init__(self, data: list[dict[str, np.ndarray]]) -> None:
        self.data = list(data)
        self.calls = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        self.calls += 1
        return self.data.pop(0) if self.data else None


# -- the model -------------------------------------------------------------------------------
def test_corrupt_file(workdir: Path) -> None:
    path = workdir / "corrupt.onnx"
    path.write_bytes(np.random.default_rng(0).bytes(1000))
    with pytest.raises(ModelLoadError, match="corrupt.onnx") as info:
        quantize_static(path, "out.onnx", feeds())
    assert "not a valid ONNX model" in str(info.value)
    assert info.value.__cause__ is not None  # the parser's error is chained
    assert_nothing_written(workdir, "corrupt.onnx")


def test_truncated_file(workdir: Path) -> None:
    path = workdir / "truncated.onnx"
    path.write_bytes(zoo.cnn().SerializeToString()[:-100])
    with pytest.raises(ModelLoadError, match="truncated.onnx"):
        quantize_static(path, "out.onnx", feeds())
    assert_nothing_written(workdir, "truncated.onnx")


def test_missing_file(workdir: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"nope\.onnx.*does not exist"):
        quantize_static(workdir / "nope.onnx", "out.onnx", feeds())
    assert_nothing_written(workdir)


def test_not_a_model_object(workdir: Path) -> None:
    with pytest.raises(ModelLoadError, match="dict"):
        quantize_static({"graph": None}, "out.onnx", feeds())  # type: ignore[arg-type]


def test_opset_9_is_refused_with_a_way_out(workdir: Path) -> None:
    model = zoo.old_opset_model()
    with pytest.raises(UnsupportedModelError) as info:
        quantize_static(model, "out.onnx", zoo.random_feeds(model, 2))
    message = str(info.value)
    assert "opset 9" in message and "opset 10" in message
    assert "convert_version" in message and "upgrade_opset=True" in message
    assert_nothing_written(workdir)


def test_opset_9_with_upgrade_opset(workdir: Path) -> None:
    model = zoo.old_opset_model()
    result = quantize_static(model, "out.onnx", zoo.random_feeds(model, 16, seed=1),
                             StaticQuantConfig(upgrade_opset=True))
    out = onnx.load("out.onnx")
    onnx.checker.check_model(out, full_check=True)
    assert [o.version for o in out.opset_import if o.domain in ("", "ai.onnx")] == [13]
    assert result.plan.nodes["conv"].action == "quantize"
    weights = {t.name: t.data_type for t in out.graph.initializer}
    assert weights["conv_W_quantized"] == onnx.TensorProto.INT8
    feeds_ = zoo.random_feeds(model, 4, seed=2)
    expected = np.concatenate([r[0].ravel() for r in zoo.run(model, feeds_)])
    got = np.concatenate([r[0].ravel() for r in zoo.run(out, feeds_)])
    assert zoo.sqnr_db(expected, got) > 33  # measured 36.6 dB


# -- the output path -------------------------------------------------------------------------
@pytest.mark.parametrize("spelling", ["same", "absolute", "dotdot"])
def test_output_equal_to_input(workdir: Path, cnn_path: Path, spelling: str) -> None:
    (workdir / "sub").mkdir()
    output = {"same": "cnn.onnx", "absolute": str(cnn_path), "dotdot": "sub/../cnn.onnx"}[spelling]
    before = cnn_path.read_bytes()
    reader = CountingReader(feeds())
    with pytest.raises(OutputPathError, match="cnn.onnx"):
        quantize_static("cnn.onnx", output, reader)
    assert cnn_path.read_bytes() == before
    assert reader.calls == 0  # refused before any calibration work
    assert_nothing_written(workdir, "cnn.onnx", "sub")


def test_output_is_a_link_to_the_input(workdir: Path, cnn_path: Path) -> None:
    os.symlink(cnn_path, workdir / "link.onnx")
    before = cnn_path.read_bytes()
    with pytest.raises(OutputPathError, match="link.onnx|cnn.onnx"):
        quantize_static(cnn_path, "link.onnx", feeds())
    assert cnn_path.read_bytes() == before
    assert (workdir / "link.onnx").is_symlink()
    assert_nothing_written(workdir, "cnn.onnx", "link.onnx")


def test_output_folder_missing(workdir: Path, cnn_path: Path) -> None:
    reader = CountingReader(feeds())
    with pytest.raises(OutputPathError, match="missing"):
        quantize_static(cnn_path, workdir / "missing" / "out.onnx", reader)
    assert reader.calls == 0
    assert_nothing_written(workdir, "cnn.onnx")


def test_output_is_a_folder(workdir: Path, cnn_path: Path) -> None:
    (workdir / "folder").mkdir()
    with pytest.raises(OutputPathError, match="folder"):
        quantize_static(cnn_path, "folder", feeds())
    assert list((workdir / "folder").iterdir()) == []
    assert_nothing_written(workdir, "cnn.onnx", "folder")


# -- the calibration data --------------------------------------------------------------------
def _bad_feed(kind: str) -> dict[str, np.ndarray]:
    image = feeds(1)[0]["image"]
    return {
        "name": {"imag": image},
        "dtype": {"image": image.astype(np.float64)},
        "rank": {"image": image[0]},
        "size": {"image": image[:, :, :16]},
        "missing": {},
    }[kind]


@pytest.mark.parametrize(("kind", "words"), [
    ("name", ["'imag'", "'image'"]),  # the unknown name, and the model's input
    ("dtype", ["'image'", "float64", "float32"]),
    ("rank", ["'image'", "rank 3", "rank 4"]),
    ("size", ["'image'", "axis 2", "32"]),
    ("missing", ["'image'", "missing"]),
])
def test_bad_feed(workdir: Path, cnn_path: Path, kind: str, words: list[str]) -> None:
    data = [*feeds(2), _bad_feed(kind), *feeds(1)]
    with pytest.raises(FeedError) as info:
        quantize_static(cnn_path, "out.onnx", data)
    message = str(info.value)
    assert "Feed 2" in message
    for word in words:
        assert word in message
    assert_nothing_written(workdir, "cnn.onnx")


def test_feed_error_is_a_calibration_error() -> None:
    assert issubclass(FeedError, CalibrationError)
    assert issubclass(CalibrationError, QuantizationError)


@pytest.mark.parametrize("source", ["empty_list", "empty_reader", "empty_generator"])
def test_no_calibration_feeds(workdir: Path, cnn_path: Path, source: str) -> None:
    data = {"empty_list": [], "empty_reader": CountingReader([]),
            "empty_generator": (f for f in ())}[source]
    with pytest.raises(CalibrationError, match="no feeds"):
        quantize_static(cnn_path, "out.onnx", data)
    assert_nothing_written(workdir, "cnn.onnx")


def test_unusable_calibration_source(workdir: Path, cnn_path: Path) -> None:
    with pytest.raises(FeedError, match="int"):
        quantize_static(cnn_path, "out.onnx", 42)
    assert_nothing_written(workdir, "cnn.onnx")


def test_failure_keeps_an_existing_output(workdir: Path, cnn_path: Path) -> None:
    (workdir / "out.onnx").write_bytes(b"previous")
    with pytest.raises(FeedError):
        quantize_static(cnn_path, "out.onnx", [*feeds(1), _bad_feed("dtype")])
    assert (workdir / "out.onnx").read_bytes() == b"previous"
    assert_nothing_written(workdir, "cnn.onnx", "out.onnx")


def test_success_leaves_only_the_output(workdir: Path, cnn_path: Path) -> None:
    result = quantize_static(cnn_path, "out.onnx", feeds())
    assert result.output_files == [workdir / "out.onnx"]
    assert_nothing_written(workdir, "cnn.onnx", "out.onnx")


# -- NaN / Inf in the calibration data -------------------------------------------------------
def _ranges(result: onnxquant.QuantizationResult) -> dict[str, tuple[float, float] | None]:
    return {name: t.range for name, t in result.plan.tensors.items() if t.role == "activation"}


@pytest.fixture
def clean_result(workdir: Path, cnn_path: Path) -> onnxquant.QuantizationResult:
    """Quantized with the 4 finite feeds that the NaN tests add broken feeds to."""
    return quantize_static(cnn_path, "clean.onnx", feeds())


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_whole_nonfinite_batches_are_left_out(workdir, cnn_path, clean_result, value,
                                              caplog) -> None:
    data = feeds()
    bad = [{"image": np.full_like(data[0]["image"], value)} for _ in range(2)]
    result = quantize_static(cnn_path, "out.onnx", [bad[0], *data[:2], bad[1], *data[2:]])
    assert result.calibration_samples == 6
    assert result.unobserved == []
    assert _ranges(result) == _ranges(clean_result)  # exactly the ranges of the finite feeds
    assert "NaN/Inf" in caplog.text and "'image' (2 batches)" in caplog.text
    out = onnx.load("out.onnx")
    onnx.checker.check_model(out, full_check=True)
    assert sum(n.op_type == "QuantizeLinear" for n in out.graph.node) == 10


def test_inf_inside_a_batch_is_left_out(workdir, cnn_path, clean_result) -> None:
    data = feeds()
    broken = {"image": data[0]["image"].copy()}
    broken["image"][1, 2, 17, 5] = np.inf
    result = quantize_static(cnn_path, "out.onnx", [*data, broken])
    assert _ranges(result)["image"] == _ranges(clean_result)["image"]


def test_nan_inside_a_batch_is_left_out(workdir, cnn_path, clean_result) -> None:
    data = feeds()
    broken = {"image": (data[0]["image"] * 1.5).astype(np.float32)}  # a wider range
    broken["image"][1, 2, 17, 5] = np.nan
    result = quantize_static(cnn_path, "out.onnx", [*data, broken])
    assert _ranges(result)["image"] == _ranges(clean_result)["image"]


def test_all_batches_nan_is_an_error(workdir, cnn_path) -> None:
    data = [{"image": np.full_like(f["image"], np.nan)} for f in feeds(2)]
    with pytest.raises(CalibrationError, match="image"):
        quantize_static(cnn_path, "out.onnx", data)
    assert_nothing_written(workdir, "cnn.onnx")


# -- calibration data that raises ------------------------------------------------------------
class _RaisingReader:
    def __init__(self) -> None:
        self.calls = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        self.calls += 1
        if self.calls > 2:
            raise ZeroDivisionError("bug in the user's reader")
        return feeds(1)[0]


def _raising_generator():
    yield from feeds(1)
    raise KeyError("bug in the user's generator")


@pytest.mark.parametrize("source", ["reader", "generator"])
def test_calibration_data_that_raises(workdir: Path, cnn_path: Path, source: str) -> None:
    data = _RaisingReader() if source == "reader" else _raising_generator()
    with pytest.raises(FeedError, match=r"(ZeroDivisionError|KeyError).*feed (2|1)") as info:
        quantize_static(cnn_path, "out.onnx", data)
    assert isinstance(info.value.__cause__, (ZeroDivisionError, KeyError))
    assert_nothing_written(workdir, "cnn.onnx")
