"""Feed validation: does a calibration feed match the model's inputs (name, dtype, rank, size)?

Errors name the feed index (and the file it came from, for data folders), the input and what
was expected, and suggest close input names.
"""

from __future__ import annotations

import dataclasses
import difflib
import warnings
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

import ml_dtypes
import numpy as np
import onnx

from onnxquant.core.errors import FeedError, UnsupportedModelError

__all__ = ["InputSpec", "SourcedFeed", "feed_name", "validate_feed"]

Dim = int | str | None


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


class SourcedFeed(dict):
    """A feed dict that knows the file (or test-data folder) it was read from.

    Attributes:
        source: The path, as messages show it.
    """

    def __init__(self, values: Mapping[str, Any], source: str) -> None:
        super().__init__(values)
        self.source = source


def feed_name(feed: object, index: int) -> str:
    """``"feed 3"``, or ``"feed 3 ('calib/x.npz')"`` for a feed read from a file."""
    source = getattr(feed, "source", "") if isinstance(feed, SourcedFeed) else ""
    return f"feed {index} ('{source}')" if source else f"feed {index}"


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
        A new dict with one ``np.ndarray`` per given input, in the order of ``specs`` (a
        :class:`SourcedFeed` when ``feed`` is one, so that later messages can name its file).

    Raises:
        FeedError: The feed is not a dict, names an unknown input, misses a required input, or a
            value has the wrong dtype, rank or fixed dimension size.
    """
    label = "F" + feed_name(feed, index)[1:]
    if not isinstance(feed, Mapping):
        raise FeedError(
            f"{label} is a {type(feed).__name__}, not a dict mapping input names to arrays "
            f"(e.g. {{{specs[0].name if specs else 'input'!r}: array}})."
        )
    by_name = {spec.name: spec for spec in specs}
    for name in feed:
        if name not in by_name:
            close = difflib.get_close_matches(str(name), list(by_name), n=3)
            hint = f" Did you mean {_names(close)}?" if close else ""
            raise FeedError(
                f"{label}: unknown input name {name!r}.{hint} "
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
                f"{label}: required input {spec.name!r} ({_expect(spec)}) {state}. "
                f"The feed has: {_names(feed)}."
            )
        array = _to_array(value, spec, label)
        _check_shape(array, spec, label)
        result[spec.name] = array
    if isinstance(feed, SourcedFeed):
        return SourcedFeed(result, feed.source)
    return result


def _to_array(value: Any, spec: InputSpec, label: str) -> np.ndarray:
    where = f"{label}: input {spec.name!r}"
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


def _check_shape(array: np.ndarray, spec: InputSpec, label: str) -> None:
    if spec.shape is None:
        return
    where = f"{label}: input {spec.name!r} has shape {_shape_str(array.shape)}"
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
