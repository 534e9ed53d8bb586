"""Tests of the calibration data layer: readers, feed sources, validation and feed folders."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxquant.calibration import readers
from onnxquant.calibration.readers import (
    CalibrationDataReader,
    FolderDataReader,
    InputSpec,
    count_feeds,
    iter_feeds,
    load_feed_folder,
    validate_feed,
)
from onnxquant.core.errors import CalibrationError, FeedError, UnsupportedModelError

IMAGE = InputSpec("image", np.dtype(np.float32), ("N", 3, 4, 4))
IDS = InputSpec("ids", np.dtype(np.int64), (None, 5))
SPECS = (IMAGE, IDS)


def _image(seed: float = 0.0) -> np.ndarray:
    return np.full((2, 3, 4, 4), seed, dtype=np.float32)


def _ids(seed: int = 0) -> np.ndarray:
    return np.full((2, 5), seed, dtype=np.int64)


class DuckReader:
    """An ORT-style reader that does not subclass anything."""

    def __init__(self, feeds):
        self._feeds = iter(feeds)

    def get_next(self):
        return next(self._feeds, None)


def test_public_api():
    assert set(readers.__all__) == {
        "CalibrationDataReader",
        "InputSpec",
        "FolderDataReader",
        "iter_feeds",
        "validate_feed",
        "load_feed_folder",
        "count_feeds",
    }
    for name in readers.__all__:
        assert getattr(readers, name).__doc__


# --- readers and sources ---------------------------------------------------------------------


def test_duck_typed_reader_is_a_reader_and_is_drained_until_none():
    feeds = [{"image": _image(1)}, {"image": _image(2)}]
    reader = DuckReader(feeds)
    assert isinstance(reader, CalibrationDataReader)
    got = list(iter_feeds(reader))
    assert [f["image"][0, 0, 0, 0] for f in got] == [1.0, 2.0]
    assert got[0] is feeds[0]
    assert reader.get_next() is None
    assert count_feeds(DuckReader(feeds)) is None  # no __len__


def test_objects_without_callable_get_next_are_not_readers():
    class NotCallable:
        get_next = 3

    assert not isinstance(NotCallable(), CalibrationDataReader)
    assert not isinstance({"image": 1}, CalibrationDataReader)
    assert not issubclass(list, CalibrationDataReader)


def test_subclass_iterates_and_stops_at_none_like_ort():
    class Two(CalibrationDataReader):
        def __init__(self):
            self.left = 2

        def get_next(self):
            if not self.left:
                return None
            self.left -= 1
            return {"ids": _ids(self.left)}

    reader = Two()
    assert [f["ids"][0, 0] for f in reader] == [1, 0]
    with pytest.raises(StopIteration):
        next(reader)
    with pytest.raises(NotImplementedError):
        len(reader)
    with pytest.raises(NotImplementedError):
        reader.set_range(0, 1)
    assert count_feeds(Two()) is None
    with pytest.raises(TypeError):
        CalibrationDataReader()  # abstract


def test_stops_at_first_none_even_if_reader_has_more():
    reader = DuckReader([{"ids": _ids(1)}, None, {"ids": _ids(2)}])
    assert [f["ids"][0, 0] for f in iter_feeds(reader)] == [1]


def test_ort_reader_subclass_is_accepted():
    ort_q = pytest.importorskip("onnxruntime.quantization")

    class OrtReader(ort_q.CalibrationDataReader):
        def __init__(self):
            self.feeds = iter([{"ids": _ids(7)}])

        def get_next(self):
            return next(self.feeds, None)

    reader = OrtReader()
    assert isinstance(reader, CalibrationDataReader)
    assert [f["ids"][0, 0] for f in iter_feeds(reader)] == [7]


def test_iterables_generators_and_single_dict():
    feeds = [{"ids": _ids(i)} for i in range(3)]
    assert [f["ids"][0, 0] for f in iter_feeds(feeds)] == [0, 1, 2]
    assert [f["ids"][0, 0] for f in iter_feeds(tuple(feeds))] == [0, 1, 2]
    gen = ({"ids": _ids(i)} for i in range(4))
    assert [f["ids"][0, 0] for f in iter_feeds(gen)] == [0, 1, 2, 3]
    single = {"image": _image(3), "ids": _ids(3)}
    assert list(iter_feeds(single)) == [single]
    assert count_feeds(feeds) == 3
    assert count_feeds(single) == 1  # one feed, not len(dict) == 2 inputs
    assert count_feeds(x for x in feeds) is None


@pytest.mark.parametrize("bad", [None, 42, b"bytes", np.zeros(3), object()])
def test_unsupported_source_is_rejected_with_accepted_kinds(bad):
    with pytest.raises(
        FeedError, match=r"Cannot read calibration feeds from a .*Accepted: .*get_next"
    ):
        iter_feeds(bad)


def test_reader_class_instead_of_instance_is_rejected():
    with pytest.raises(FeedError, match=r"class DuckReader; pass an instance"):
        iter_feeds(DuckReader)


# --- InputSpec -------------------------------------------------------------------------------


def test_input_spec_from_value_info():
    vi = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, None])
    assert InputSpec.from_value_info(vi) == InputSpec("x", np.dtype(np.float32), ("batch", 3, None))
    no_shape = helper.make_tensor_value_info("y", TensorProto.INT64, None)
    assert InputSpec.from_value_info(no_shape) == InputSpec("y", np.dtype(np.int64), None)
    scalar = helper.make_tensor_value_info("s", TensorProto.UINT8, [])
    assert InputSpec.from_value_info(scalar).shape == ()
    zero = helper.make_tensor_value_info("z", TensorProto.FLOAT16, [0, 2])
    assert InputSpec.from_value_info(zero).shape == (0, 2)
    assert InputSpec.from_value_info(zero).dtype == np.float16


def test_input_spec_rejects_non_tensor_inputs():
    seq = helper.make_tensor_sequence_value_info("seq", TensorProto.FLOAT, [2])
    with pytest.raises(UnsupportedModelError, match=r"Model input 'seq' is not a tensor"):
        InputSpec.from_value_info(seq)
    untyped = helper.make_tensor_value_info("u", TensorProto.UNDEFINED, [1])
    with pytest.raises(UnsupportedModelError, match=r"Model input 'u' has no usable element type"):
        InputSpec.from_value_info(untyped)


# --- validate_feed ---------------------------------------------------------------------------


def test_valid_feed_returns_new_dict_of_arrays_in_spec_order():
    image, ids = _image(1), _ids(2)
    feed = {"ids": ids, "image": image}
    out = validate_feed(feed, SPECS, index=0)
    assert list(out) == ["image", "ids"]
    assert out is not feed
    assert out["image"] is image  # already right: no copy
    np.testing.assert_array_equal(out["ids"], ids)


def test_dynamic_dims_accept_any_size_and_unknown_rank_accepts_any_rank():
    out = validate_feed(
        {"image": np.zeros((7, 3, 4, 4), np.float32), "ids": _ids()}, SPECS, index=0
    )
    assert out["image"].shape == (7, 3, 4, 4)
    free = InputSpec("free", np.dtype(np.float32), None)
    out = validate_feed({"free": np.zeros((1, 2, 3, 4, 5), np.float32)}, [free], index=0)
    assert out["free"].shape == (1, 2, 3, 4, 5)


def test_python_values_are_converted_when_lossless():
    out = validate_feed({"ids": [[1, 2, 3, 4, 2**40]], "image": _image()}, SPECS, index=0)
    assert out["ids"].dtype == np.int64
    assert out["ids"][0, 4] == 2**40
    spec = InputSpec("x", np.dtype(np.float32), (2,))
    out = validate_feed({"x": [0.5, 1]}, [spec], index=0)
    assert out["x"].dtype == np.float32
    np.testing.assert_array_equal(out["x"], np.array([0.5, 1.0], np.float32))
    u8 = InputSpec("u", np.dtype(np.uint8), ())
    assert validate_feed({"u": 255}, [u8], index=0)["u"].dtype == np.uint8


@pytest.mark.parametrize(
    ("spec", "value", "got"),
    [
        (InputSpec("u", np.dtype(np.uint8), ()), 256, "int64"),  # out of range
        (InputSpec("u", np.dtype(np.uint8), (1,)), [-1], "int64"),
        (InputSpec("i", np.dtype(np.int64), (1,)), [1.5], "float64"),  # float -> int
        (InputSpec("h", np.dtype(np.float16), (1,)), [1e6], "float64"),  # overflows to inf
        (InputSpec("b", np.dtype(np.bool_), (1,)), [1], "int64"),
    ],
)
def test_python_values_that_would_lose_information_are_rejected(spec, value, got):
    pattern = rf"Feed 2: input '{spec.name}' is a \w+ of {got} values .*{spec.dtype.name}"
    with pytest.raises(FeedError, match=pattern):
        validate_feed({spec.name: value}, [spec], index=2)


def test_float64_array_is_never_cast_to_float32():
    feed = {"image": np.zeros((2, 3, 4, 4)), "ids": _ids()}
    with pytest.raises(
        FeedError,
        match=r"Feed 5: input 'image' has dtype float64, but the model expects float32, "
        r"shape \[N, 3, 4, 4\].*astype\(np\.float32\)",
    ):
        validate_feed(feed, SPECS, index=5)


def test_int32_array_for_int64_input_is_a_dtype_error():
    with pytest.raises(FeedError, match=r"Feed 0: input 'ids' has dtype int32.*expects int64"):
        validate_feed({"image": _image(), "ids": _ids().astype(np.int32)}, SPECS, index=0)


def test_wrong_rank_names_both_ranks():
    feed = {"image": np.zeros((3, 4, 4), np.float32), "ids": _ids()}
    with pytest.raises(
        FeedError,
        match=r"Feed 1: input 'image' has shape \[3, 4, 4\] \(rank 3\), but the model expects "
        r"rank 4 \(float32, shape \[N, 3, 4, 4\]\)",
    ):
        validate_feed(feed, SPECS, index=1)


def test_fixed_dim_mismatch_names_axis_and_expected_size():
    feed = {"image": np.zeros((2, 1, 4, 4), np.float32), "ids": _ids()}
    with pytest.raises(
        FeedError,
        match=r"Feed 3: input 'image' has shape \[2, 1, 4, 4\], but the model fixes axis 1 to 3",
    ):
        validate_feed(feed, SPECS, index=3)
    with pytest.raises(FeedError, match=r"Feed 4: input 'ids' .* fixes axis 1 to 5"):
        validate_feed({"image": _image(), "ids": np.zeros((9, 4), np.int64)}, SPECS, index=4)


def test_unknown_name_lists_inputs_and_suggests_close_match():
    with pytest.raises(FeedError) as info:
        validate_feed({"imgae": _image(), "ids": _ids()}, SPECS, index=7)
    message = str(info.value)
    assert "Feed 7: unknown input name 'imgae'" in message
    assert "Did you mean 'image'?" in message
    assert "The model's inputs are: 'image', 'ids'." in message
    with pytest.raises(FeedError, match=r"unknown input name 'zzz'\. The model's inputs"):
        validate_feed({"zzz": 1}, SPECS, index=0)


def test_missing_required_input_and_optional_inputs():
    with pytest.raises(
        FeedError,
        match=r"Feed 6: required input 'ids' \(int64, shape \[\?, 5\]\) is missing\. "
        r"The feed has: 'image'\.",
    ):
        validate_feed({"image": _image()}, SPECS, index=6)
    out = validate_feed({"image": _image()}, SPECS, index=6, optional={"ids"})
    assert list(out) == ["image"]
    with pytest.raises(FeedError, match=r"Feed 0: required input 'ids' .* is None"):
        validate_feed({"image": _image(), "ids": None}, SPECS, index=0)


@pytest.mark.parametrize("feed", [[_image()], (_image(),), _image(), "image"])
def test_feed_that_is_not_a_dict(feed):
    with pytest.raises(FeedError, match=r"Feed 9 is a \w+, not a dict mapping input names"):
        validate_feed(feed, SPECS, index=9)


def test_feed_error_is_a_calibration_error():
    with pytest.raises(CalibrationError):
        validate_feed([], SPECS, index=0)


# --- folders ---------------------------------------------------------------------------------


def _write_pb(path, array, name=""):
    tensor = numpy_helper.from_array(array, name=name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tensor.SerializeToString())


def _write_sets(root, count, *, named=True):
    for i in range(count):
        folder = root / f"test_data_set_{i}"
        _write_pb(folder / "input_0.pb", _image(i), "image" if named else "")
        _write_pb(folder / "input_1.pb", _ids(i), "ids" if named else "")


def test_npz_folder_one_feed_per_file_in_natural_order(tmp_path):
    for i in (10, 2, 1):
        np.savez(tmp_path / f"feed_{i}.npz", image=_image(i), ids=_ids(i))
    (tmp_path / "notes.txt").write_text("ignored")
    feeds = list(load_feed_folder(tmp_path))
    assert [f["ids"][0, 0] for f in feeds] == [1, 2, 10]
    assert set(feeds[0]) == {"image", "ids"}
    np.testing.assert_array_equal(feeds[2]["image"], _image(10))
    assert validate_feed(feeds[0], SPECS, index=0)["image"].dtype == np.float32
    assert count_feeds(tmp_path) == 3
    assert count_feeds(str(tmp_path)) == 3
    assert [f["ids"][0, 0] for f in iter_feeds(str(tmp_path))] == [1, 2, 10]


def test_single_npz_file(tmp_path):
    np.savez(tmp_path / "one.npz", ids=_ids(4))
    feeds = list(load_feed_folder(tmp_path / "one.npz"))
    assert len(feeds) == 1
    np.testing.assert_array_equal(feeds[0]["ids"], _ids(4))


def test_test_data_set_folders_with_names(tmp_path):
    _write_sets(tmp_path, 3)
    (tmp_path / "model.onnx").write_bytes(b"")  # a model zoo folder also holds the model
    feeds = list(load_feed_folder(tmp_path))
    assert [f["ids"][0, 0] for f in feeds] == [0, 1, 2]
    np.testing.assert_array_equal(feeds[1]["image"], _image(1))
    assert feeds[1]["image"].dtype == np.float32
    assert count_feeds(tmp_path) == 3


def test_test_data_set_folders_without_names_map_by_position(tmp_path):
    _write_sets(tmp_path, 2, named=False)
    feeds = list(load_feed_folder(tmp_path, SPECS))
    assert list(feeds[1]) == ["image", "ids"]
    np.testing.assert_array_equal(feeds[1]["ids"], _ids(1))
    assert [f["ids"][0, 0] for f in iter_feeds(tmp_path, specs=SPECS)] == [0, 1]
    with pytest.raises(FeedError, match=r"input_0\.pb holds an unnamed tensor.*no specs"):
        next(load_feed_folder(tmp_path))
    with pytest.raises(FeedError, match=r"input_1\.pb holds an unnamed tensor.*has 1 inputs"):
        next(load_feed_folder(tmp_path, [IMAGE]))


def test_single_test_data_set_folder(tmp_path):
    _write_sets(tmp_path, 1)
    one = tmp_path / "test_data_set_0"
    feeds = list(load_feed_folder(one))
    assert len(feeds) == 1
    np.testing.assert_array_equal(feeds[0]["image"], _image(0))
    np.testing.assert_array_equal(feeds[0]["ids"], _ids(0))


def test_folder_reader_len_range_and_rewind(tmp_path):
    for i in range(5):
        np.savez(tmp_path / f"{i}.npz", ids=_ids(i))
    reader = FolderDataReader(tmp_path)
    assert isinstance(reader, CalibrationDataReader)
    assert len(reader) == 5 and count_feeds(reader) == 5
    assert [f["ids"][0, 0] for f in reader] == [0, 1, 2, 3, 4]
    assert reader.get_next() is None
    reader.set_range(start_index=3, end_index=10)
    assert [f["ids"][0, 0] for f in iter_feeds(reader)] == [3, 4]
    reader.rewind()
    assert reader.get_next()["ids"][0, 0] == 3
    with pytest.raises(CalibrationError, match=r"Invalid feed range \[4, 2\)"):
        reader.set_range(4, 2)


def test_folder_is_read_lazily_one_file_per_feed(tmp_path):
    for i in range(3):
        np.savez(tmp_path / f"{i}.npz", ids=_ids(i))
    feeds = load_feed_folder(tmp_path)
    assert next(feeds)["ids"][0, 0] == 0
    # Files 1 and 2 are read only when asked for: what is on disk *then* is what we get.
    np.savez(tmp_path / "1.npz", ids=_ids(41))
    (tmp_path / "2.npz").unlink()
    assert next(feeds)["ids"][0, 0] == 41
    with pytest.raises(FeedError, match=r"Cannot read calibration feed .*2\.npz"):
        next(feeds)


def test_test_data_sets_are_read_lazily(tmp_path):
    _write_sets(tmp_path, 2)
    feeds = load_feed_folder(tmp_path)
    assert next(feeds)["ids"][0, 0] == 0
    _write_pb(tmp_path / "test_data_set_1" / "input_1.pb", _ids(99), "ids")
    assert next(feeds)["ids"][0, 0] == 99


def test_bad_paths_name_the_path_and_accepted_layouts(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(
        FeedError,
        match=rf"{re.escape(str(missing))} does not exist\. Accepted: .*npz.*test_data_set",
    ):
        load_feed_folder(missing)  # fails at the call, not at the first next()
    with pytest.raises(
        FeedError, match=rf"No calibration data found in {re.escape(str(tmp_path))}\. Accepted"
    ):
        iter_feeds(tmp_path)
    assert count_feeds(tmp_path) is None
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(FeedError, match=r"x\.txt is not an \.npz file"):
        FolderDataReader(tmp_path / "x.txt")


def test_mixed_layouts_and_broken_files_are_errors(tmp_path):
    _write_sets(tmp_path, 1)
    np.savez(tmp_path / "a.npz", ids=_ids())
    with pytest.raises(FeedError, match=r"mixes layouts \(test_data_set_\*, \.npz\)"):
        load_feed_folder(tmp_path)
    empty_set = tmp_path / "b"
    (empty_set / "test_data_set_0").mkdir(parents=True)
    with pytest.raises(FeedError, match=r"test_data_set_0 has no input_<i>\.pb files"):
        load_feed_folder(empty_set)
    bad = tmp_path / "c" / "test_data_set_0" / "input_0.pb"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"\xff\xff\xff not a tensor")
    with pytest.raises(FeedError, match=r"Cannot read TensorProto file .*input_0\.pb"):
        list(load_feed_folder(bad.parent))
    broken = tmp_path / "d" / "0.npz"
    broken.parent.mkdir()
    broken.write_bytes(b"PK not a zip")
    with pytest.raises(FeedError, match=r"Cannot read calibration feed .*0\.npz"):
        list(load_feed_folder(broken.parent))


def test_duplicate_names_in_one_test_data_set(tmp_path):
    folder = tmp_path / "test_data_set_0"
    _write_pb(folder / "input_0.pb", _ids(1), "ids")
    _write_pb(folder / "input_1.pb", _ids(2), "ids")
    with pytest.raises(FeedError, match=r"input 'ids' appears twice"):
        list(load_feed_folder(folder))


def test_specs_from_a_real_model_validate_a_test_data_set(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Identity", ["image"], ["out"])],
        "g",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 4, 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 3, 4, 4])],
    )
    model = helper.make_model(graph)
    onnx.checker.check_model(model)
    specs = [InputSpec.from_value_info(vi) for vi in model.graph.input]
    _write_pb(tmp_path / "test_data_set_0" / "input_0.pb", _image(5))
    feeds = [
        validate_feed(f, specs, index=i) for i, f in enumerate(iter_feeds(tmp_path, specs=specs))
    ]
    assert len(feeds) == 1
    np.testing.assert_array_equal(feeds[0]["image"], _image(5))
