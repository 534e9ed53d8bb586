"""Where calibration feeds come from, and how each feed is checked against the model's inputs.

A *feed* is one ``{input_name: array}`` dict, the same thing ``InferenceSession.run`` takes.
Feeds come from an ORT-style reader (``get_next()`` until ``None``), any iterable of dicts,
a single dict, or a folder on disk (see :func:`load_feed_folder`). :func:`validate_feed` turns one
feed into clean ``np.ndarray`` values or raises a :class:`~onnxquant.errors.FeedError` that names
the feed index, the input and what the model expects.
"""

from __future__ import annotations

import abc
import dataclasses
import difflib
import logging
import os
import re
import warnings
import zipfile
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from onnxquant.errors import CalibrationError, FeedError, UnsupportedModelError

__all__ = [
    "CalibrationDataReader",
    "InputSpec",
    "FolderDataReader",
    "iter_feeds",
    "validate_feed",
    "load_feed_folder",
    "count_feeds",
]

logger = logging.getLogger(__name__)

Dim = int | str | None
PathLike = str | os.PathLike[str]

_LAYOUTS = (
    "a folder of .npz files (one feed per file, keys = input names), a single .npz file, "
    "a folder holding ONNX test-data sets (test_data_set_*/input_<i>.pb), "
    "or one test_data_set folder (input_<i>.pb)"
)
_SOURCES = (
    "a reader with get_next() (e.g. an onnxruntime CalibrationDataReader), an iterable or "
    "generator of {input_name: array} dicts, a single such dict, or a path to " + _LAYOUTS
)
_INPUT_PB = re.compile(r"input_(\d+)\.pb")


class CalibrationDataReader(abc.ABC):
    """ORT-compatible reader: ``get_next()`` returns a feed dict, or ``None`` when exhausted.

    Any object with a callable ``get_next`` counts as a reader, so ``isinstance`` is true for
    duck-typed readers and for ``onnxruntime.quantization.CalibrationDataReader`` subclasses.
    """

    @classmethod
    def __subclasshook__(cls, C: type) -> bool:  # noqa: N803 - the name abc uses
        if cls is CalibrationDataReader:
            return callable(getattr(C, "get_next", None)) or NotImplemented
        return NotImplemented

    @abc.abstractmethod
    def get_next(self) -> dict[str, np.ndarray] | None:
        """Returns the next feed, or ``None`` when there are no more."""

    def __iter__(self) -> CalibrationDataReader:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        feed = self.get_next()
        if feed is None:
            raise StopIteration
        return feed

    def __len__(self) -> int:
        raise NotImplementedError

    def set_range(self, start_index: int, end_index: int) -> None:
        """Restricts the reader to feeds ``[start_index, end_index)`` (strided calibration)."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """What the model expects for one input.

    Attributes:
        name: The graph input name.
        dtype: The numpy (or ml_dtypes) dtype of the input.
        shape: One entry per axis: an ``int`` for a fixed size, a ``str`` (symbolic) or ``None``
            for a dynamic size; ``None`` for the whole shape when the rank is unknown.
    """

    name: str
    dtype: np.dtype
    shape: tuple[Dim, ...] | None

    @classmethod
    def from_value_info(cls, value_info: onnx.ValueInfoProto) -> InputSpec:
        """Builds the spec of a graph input.

        Raises:
            UnsupportedModelError: The input is not a tensor or has no element type.
        """
        name = value_info.name
        if value_info.type.WhichOneof("value") != "tensor_type":
            raise UnsupportedModelError(
                f"Model input '{name}' is not a tensor "
                f"({value_info.type.WhichOneof('value')}); only tensor inputs can be calibrated."
            )
        tensor_type = value_info.type.tensor_type
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        except (KeyError, TypeError) as err:
            raise UnsupportedModelError(
                f"Model input '{name}' has no usable element type ({tensor_type.elem_type}); "
                "fix the model's input declaration."
            ) from err
        if not tensor_type.HasField("shape"):
            return cls(name, dtype, None)
        dims: list[Dim] = []
        for dim in tensor_type.shape.dim:
            if dim.HasField("dim_value"):
                dims.append(int(dim.dim_value))
            else:
                dims.append(dim.dim_param or None)
        return cls(name, dtype, tuple(dims))


def _shape_str(shape: tuple[Any, ...] | None) -> str:
    if shape is None:
        return "unknown shape"
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _expect(spec: InputSpec) -> str:
    return f"{spec.dtype.name}, shape {_shape_str(spec.shape)}"


def _names(names: Iterable[str]) -> str:
    return ", ".join(repr(n) for n in names) or "(none)"


def validate_feed(
    feed: Mapping[str, Any],
    specs: Sequence[InputSpec],
    *,
    index: int,
    optional: Collection[str] = (),
) -> dict[str, np.ndarray]:
    """Checks one feed against the model's inputs and returns it as ``np.ndarray`` values.

    Arrays (anything with a ``dtype``) must already have the model's dtype: a float64 array for a
    float32 input is an error, never a silent cast. Lists and Python scalars carry no dtype and
    are converted when nothing is lost: integers must round-trip exactly, Python floats may only
    go to float inputs (rounded to the input's precision, but never overflowing to inf).

    Args:
        feed: ``{input_name: value}``.
        specs: The model's inputs.
        index: Position of the feed in its source (0-based), used in error messages.
        optional: Input names that may be absent (e.g. inputs that have an initializer).

    Returns:
        A new dict with one ``np.ndarray`` per given input, in the order of ``specs``.

    Raises:
        FeedError: The feed is not a dict, names an unknown input, misses a required input, or a
            value has the wrong dtype, rank or fixed dimension size.
    """
    if not isinstance(feed, Mapping):
        raise FeedError(
            f"Feed {index} is a {type(feed).__name__}, not a dict mapping input names to arrays "
            f"(e.g. {{{specs[0].name if specs else 'input'!r}: array}})."
        )
    by_name = {spec.name: spec for spec in specs}
    for name in feed:
        if name not in by_name:
            close = difflib.get_close_matches(str(name), list(by_name), n=3)
            hint = f" Did you mean {_names(close)}?" if close else ""
            raise FeedError(
                f"Feed {index}: unknown input name {name!r}.{hint} "
                f"The model's inputs are: {_names(by_name)}."
            )
    result: dict[str, np.ndarray] = {}
    for spec in specs:
        value = feed.get(spec.name)
        if value is None:
            if spec.name in optional:
                continue
            state = "is None" if spec.name in feed else "is missing"
            raise FeedError(
                f"Feed {index}: required input {spec.name!r} ({_expect(spec)}) {state}. "
                f"The feed has: {_names(feed)}."
            )
        array = _to_array(value, spec, index)
        _check_shape(array, spec, index)
        result[spec.name] = array
    return result


def _to_array(value: Any, spec: InputSpec, index: int) -> np.ndarray:
    where = f"Feed {index}: input {spec.name!r}"
    if hasattr(value, "dtype"):  # ndarray, numpy scalar, or an array-like that declares a dtype
        array = np.asarray(value)
        if array.dtype == spec.dtype or (spec.dtype.kind == "O" and array.dtype.kind in "OUS"):
            return array.astype(object) if spec.dtype.kind == "O" else array
        raise FeedError(
            f"{where} has dtype {array.dtype.name}, but the model expects {_expect(spec)}. "
            f"Convert it first, e.g. value.astype(np.{spec.dtype.name})."
        )
    try:
        array = np.asarray(value)
    except (ValueError, TypeError) as err:
        raise FeedError(f"{where} cannot be turned into an array ({err}).") from err
    if array.dtype == spec.dtype:
        return array
    converted = _lossless_cast(array, spec.dtype)
    if converted is None:
        raise FeedError(
            f"{where} is a {type(value).__name__} of {array.dtype.name} values that cannot be "
            f"converted to {spec.dtype.name} without loss; the model expects {_expect(spec)}."
        )
    return converted


def _is_float(dtype: np.dtype) -> bool:
    try:
        ml_dtypes.finfo(dtype)
    except ValueError:
        return False
    return True


def _lossless_cast(array: np.ndarray, target: np.dtype) -> np.ndarray | None:
    kind = array.dtype.kind
    if target.kind == "O":
        return array.astype(object) if kind in "OUS" else None
    if array.size == 0 and kind in "iuf":
        return array.astype(target)
    if kind not in "iuf" or target.kind in "bOUS":
        return None
    if kind == "f" and not _is_float(target):
        return None
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        cast = array.astype(target)
        if kind == "f":
            ok = np.array_equal(np.isfinite(array), np.isfinite(cast.astype(np.float64)))
        else:
            ok = np.array_equal(cast.astype(array.dtype), array)
    return cast if ok else None


def _check_shape(array: np.ndarray, spec: InputSpec, index: int) -> None:
    if spec.shape is None:
        return
    where = f"Feed {index}: input {spec.name!r} has shape {_shape_str(array.shape)}"
    if array.ndim != len(spec.shape):
        raise FeedError(
            f"{where} (rank {array.ndim}), but the model expects rank {len(spec.shape)} "
            f"({_expect(spec)})."
        )
    for axis, (size, want) in enumerate(zip(array.shape, spec.shape, strict=True)):
        if isinstance(want, int) and want >= 0 and size != want:
            raise FeedError(
                f"{where}, but the model fixes axis {axis} to {want} ({_expect(spec)}); "
                "only dynamic axes ('?' or named) accept any size."
            )


@dataclasses.dataclass(frozen=True)
class _FeedFile:
    """One feed on disk: an .npz file, or a test-data folder with its (position, input_<i>.pb)."""

    path: Path
    inputs: tuple[tuple[int, Path], ...] = ()


def _natural_key(path: Path) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def _input_pbs(folder: Path) -> tuple[tuple[int, Path], ...]:
    found = []
    for child in folder.iterdir():
        match = _INPUT_PB.fullmatch(child.name)
        if match and child.is_file():
            found.append((int(match.group(1)), child))
    return tuple(sorted(found))


def _discover(path: PathLike) -> list[_FeedFile]:
    """Lists the feeds under ``path`` without loading any of them."""
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() == ".npz":
            return [_FeedFile(path)]
        raise FeedError(f"Calibration data file {path} is not an .npz file. Accepted: {_LAYOUTS}.")
    if not path.is_dir():
        raise FeedError(f"Calibration data path {path} does not exist. Accepted: {_LAYOUTS}.")
    children = sorted(path.iterdir(), key=_natural_key)
    sets = [c for c in children if c.name.startswith("test_data_set_") and c.is_dir()]
    npz = [c for c in children if c.suffix.lower() == ".npz" and c.is_file()]
    own = _input_pbs(path)
    layouts = [
        n for n, hit in (("test_data_set_*", sets), ("input_*.pb", own), (".npz", npz)) if hit
    ]
    if len(layouts) > 1:
        raise FeedError(
            f"Calibration data folder {path} mixes layouts ({', '.join(layouts)}); "
            "keep one kind of feed file per folder."
        )
    if sets:
        feeds = [_FeedFile(s, _input_pbs(s)) for s in sets]
        for feed in feeds:
            if not feed.inputs:
                raise FeedError(f"Test-data folder {feed.path} has no input_<i>.pb files.")
        return feeds
    if own:
        return [_FeedFile(path, own)]
    if npz:
        return [_FeedFile(f) for f in npz]
    raise FeedError(f"No calibration data found in {path}. Accepted: {_LAYOUTS}.")


def _load(feed_file: _FeedFile, specs: Sequence[InputSpec] | None) -> dict[str, np.ndarray]:
    logger.debug("loading calibration feed %s", feed_file.path)
    if not feed_file.inputs:
        try:
            with np.load(feed_file.path, allow_pickle=False) as data:
                return {key: data[key] for key in data.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
            raise FeedError(f"Cannot read calibration feed {feed_file.path}: {err}") from err
    feed: dict[str, np.ndarray] = {}
    for position, pb in feed_file.inputs:
        try:
            tensor = onnx.load_tensor(str(pb))
            array = numpy_helper.to_array(tensor, base_dir=str(pb.parent))
        except (OSError, ValueError, DecodeError) as err:
            raise FeedError(f"Cannot read TensorProto file {pb}: {err}") from err
        name = tensor.name
        if not name:
            if specs is None or position >= len(specs):
                known = f"the model has {len(specs)} inputs" if specs is not None else "no specs"
                raise FeedError(
                    f"{pb} holds an unnamed tensor and cannot be mapped by position ({known}). "
                    "Set TensorProto.name, or pass the model's input specs."
                )
            name = specs[position].name
        if name in feed:
            raise FeedError(f"{pb}: input {name!r} appears twice in {feed_file.path}.")
        feed[name] = array
    return feed


def load_feed_folder(
    path: PathLike, specs: Sequence[InputSpec] | None = None
) -> Iterator[dict[str, np.ndarray]]:
    """Reads feeds from disk, one file (or test-data set) per yielded feed.

    Accepted layouts: a folder of ``.npz`` files (keys = input names), a single ``.npz`` file,
    a folder of ``test_data_set_*`` folders, or one ``test_data_set`` folder, each holding
    ``input_<i>.pb`` TensorProto files. Files are taken in natural name order (``2`` before
    ``10``). An unnamed tensor in ``input_<i>.pb`` is the input ``specs[i].name``.

    The folder is listed now (so a bad path fails at once); each feed is loaded only when the
    iterator reaches it, so memory does not grow with the number of files.

    Raises:
        FeedError: The path is missing, holds no usable files, or a file cannot be read.
    """
    files = _discover(path)
    logger.debug("found %d calibration feeds in %s", len(files), path)
    return _generate(files, tuple(specs) if specs is not None else None)


def _generate(
    files: Sequence[_FeedFile], specs: Sequence[InputSpec] | None
) -> Iterator[dict[str, np.ndarray]]:
    for feed_file in files:
        yield _load(feed_file, specs)


class FolderDataReader(CalibrationDataReader):
    """A reader over :func:`load_feed_folder`; supports ``len``, ``set_range`` and ``rewind``.

    Args:
        path: Folder or ``.npz`` file, see :func:`load_feed_folder`.
        specs: The model's inputs, needed only for unnamed ``input_<i>.pb`` tensors.
    """

    def __init__(self, path: PathLike, specs: Sequence[InputSpec] | None = None) -> None:
        self._files = _discover(path)
        self._specs = tuple(specs) if specs is not None else None
        self._window = (0, len(self._files))
        self.rewind()

    def get_next(self) -> dict[str, np.ndarray] | None:
        """Returns the next feed of the current range, or ``None`` at its end."""
        return next(self._feeds, None)

    def __len__(self) -> int:
        return len(self._files)

    def set_range(self, start_index: int, end_index: int) -> None:
        """Restarts the reader over feeds ``[start_index, end_index)`` (end clamped)."""
        if not 0 <= start_index <= end_index:
            raise CalibrationError(
                f"Invalid feed range [{start_index}, {end_index}) for {len(self)} feeds."
            )
        self._window = (start_index, min(end_index, len(self._files)))
        self.rewind()

    def rewind(self) -> None:
        """Restarts the reader at the beginning of its current range."""
        start, end = self._window
        self._feeds = _generate(self._files[start:end], self._specs)


def iter_feeds(
    source: Any, *, specs: Sequence[InputSpec] | None = None
) -> Iterator[Mapping[str, Any]]:
    """Iterates over the feeds of any supported source (feeds are not validated here).

    Args:
        source: A reader with ``get_next()`` (read until it returns ``None``), an iterable or
            iterator of feed dicts, a single feed dict, or a path (see :func:`load_feed_folder`).
        specs: The model's inputs; only used to name unnamed tensors of test-data folders.

    Raises:
        FeedError: The source is none of the accepted kinds, or a path holds no usable data.
    """
    if isinstance(source, Mapping):
        return iter((source,))
    if isinstance(source, (str, os.PathLike)):
        return load_feed_folder(source, specs)
    if isinstance(source, type):
        raise FeedError(
            f"Got the class {source.__name__}; pass an instance, e.g. {source.__name__}(...)."
        )
    if isinstance(source, CalibrationDataReader):
        return _drain(source)
    if isinstance(source, Iterable) and not isinstance(source, (bytes, bytearray, np.ndarray)):
        return iter(source)
    raise FeedError(
        f"Cannot read calibration feeds from a {type(source).__name__}. Accepted: {_SOURCES}."
    )


def _drain(reader: Any) -> Iterator[Mapping[str, Any]]:
    while (feed := reader.get_next()) is not None:
        yield feed


def count_feeds(source: Any) -> int | None:
    """Number of feeds ``source`` will give, if known without reading them (for progress bars).

    Returns:
        ``1`` for a single dict, the number of feed files for a path, ``len(source)`` when the
        source supports it, else ``None``.
    """
    if isinstance(source, Mapping):
        return 1
    if isinstance(source, (str, os.PathLike)):
        try:
            return len(_discover(source))
        except FeedError:
            return None
    try:
        count = len(source)
    except (TypeError, ValueError, NotImplementedError):
        return None
    return count if isinstance(count, int) and count >= 0 else None
