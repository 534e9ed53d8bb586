"""Where calibration feeds come from, and how each feed is checked against the model's inputs.

A *feed* is one ``{input_name: array}`` dict, the same thing ``InferenceSession.run`` takes.
Feeds come from an ORT-style reader (``get_next()`` until ``None``), any iterable of dicts,
a single dict, or a folder on disk (see :func:`load_feed_folder`). :func:`validate_feed` turns one
feed into clean ``np.ndarray`` values or raises a :class:`~onnxquant.FeedError` that names
the feed index, the input and what the model expects.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
import os
import re
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from onnxquant.calibration._validate import InputSpec, SourcedFeed, validate_feed
from onnxquant.core.errors import CalibrationError, FeedError

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
    iterator reaches it, so memory does not grow with the number of files. Each feed is a
    :class:`SourcedFeed` (a dict that knows its file), so that errors about it name the file.

    Raises:
        FeedError: The path is missing, holds no usable files, or a file cannot be read.
    """
    files = _discover(path)
    logger.debug("found %d calibration feeds in %s", len(files), path)
    return _generate(files, tuple(specs) if specs is not None else None)


def _generate(
    files: Sequence[_FeedFile], specs: Sequence[InputSpec] | None
) -> Iterator[dict[str, np.ndarray]]:
    """Each feed as a :class:`SourcedFeed`, so that messages about it name its file."""
    for feed_file in files:
        yield SourcedFeed(_load(feed_file, specs), str(feed_file.path))


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
        return _guarded(_drain(source), type(source).__name__)
    if isinstance(source, Iterable) and not isinstance(source, (bytes, bytearray, np.ndarray)):
        return _guarded(iter(source), type(source).__name__)
    raise FeedError(
        f"Cannot read calibration feeds from a {type(source).__name__}. Accepted: {_SOURCES}."
    )


def _guarded(feeds: Iterator[Mapping[str, Any]], kind: str) -> Iterator[Mapping[str, Any]]:
    """The user's reader or iterable, with its own exceptions turned into a FeedError that
    says which feed it was producing (the original is chained as ``__cause__``)."""
    index = 0
    while True:
        try:
            feed = next(feeds)
        except StopIteration:
            return
        except Exception as err:  # user code: anything can come out of it
            raise FeedError(
                f"the calibration data ({kind}) raised {type(err).__name__} while producing "
                f"feed {index}: {err}; fix the reader (the traceback is chained below)"
            ) from err
        yield feed
        index += 1


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
