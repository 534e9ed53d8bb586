"""One onnxruntime session over a calibration model, and one inference through it: shared by
the single-process runner, the process shards and GPTQ's Hessian collection."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from onnxquant.calibration._validate import InputSpec, feed_name
from onnxquant.calibration.settings import Observer
from onnxquant.core.errors import (
    CalibrationError,
    EvaluationError,
    ModelLoadError,
    UnsupportedModelError,
)
from onnxquant.core.model_io import PROTOBUF_LIMIT, model_size_bytes
from onnxquant.core.validate import runtime_reason

__all__ = ["input_specs", "make_session", "run_batch", "update_observers", "check_loads",
           "model_input_specs", "session_from_path"]

logger = logging.getLogger(__name__)


def input_specs(model: ir.Model) -> tuple[list[InputSpec], set[str]]:
    """The model's feedable inputs, and the names of those that may be omitted.

    Inputs that also have an initializer (IR < 4 style defaults) are optional.
    """
    specs, optional = [], set()
    for value in model.graph.inputs:
        name = value.name or ""
        dtype = np.dtype(value.dtype.numpy()) if value.dtype is not None else np.dtype(np.float32)
        shape = None
        if value.shape is not None:
            shape = tuple(d if isinstance(d, int) else (str(d) if d is not None else None)
                          for d in value.shape)
        specs.append(InputSpec(name=name, dtype=dtype, shape=shape))
        if name in model.graph.initializers:
            optional.add(name)
    return specs, optional


def make_session(
    model: ir.Model, providers: Sequence[str], workdir: Path, *, optimize: bool = False
) -> ort.InferenceSession:
    """An onnxruntime session for ``model``.

    Built from bytes; external data is read where it is (one base folder, no copy). A model
    whose in-memory tensors are too large for protobuf, or whose external data onnxruntime
    cannot open in place, is saved to ``workdir`` first. Graph optimizations are off (the
    exposed tensors must stay what they are) unless ``optimize``.
    """
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    external = [t for t in _initializer_tensors(model) if isinstance(t, ir.ExternalTensor)]
    folders = {str(Path(t.base_dir or ".").resolve()) for t in external}
    in_memory = model_size_bytes(model) - sum(t.nbytes for t in external)
    try:
        if len(folders) <= 1 and in_memory <= PROTOBUF_LIMIT - (64 << 20):
            try:
                return _session_from_bytes(model, providers, options, folders)
            except Exception as err:  # e.g. an onnxruntime without the external-folder option
                if not external:
                    raise
                logger.debug("loading the model from bytes failed (%s); saving a copy", err)
        path = workdir / "augmented.onnx"
        ir.save(model, path, external_data="augmented.onnx.data")
        return ort.InferenceSession(str(path), options, providers=list(providers))
    except Exception as err:
        raise CalibrationError(
            f"onnxruntime could not load the model for calibration: {err}. Check that the "
            "float model runs in onnxruntime with these providers"
        ) from err


def _initializer_tensors(model: ir.Model) -> list[ir.TensorProtocol]:
    return [v.const_value for g in (model.graph, *model.graph.subgraphs())
            for v in g.initializers.values() if v.const_value is not None]


def _session_from_bytes(model: ir.Model, providers: Sequence[str],
                        options: ort.SessionOptions, folders: set[str]) -> ort.InferenceSession:
    if folders:  # external data stays in its files, found relative to this folder
        options.add_session_config_entry(
            "session.model_external_initializers_file_folder_path", next(iter(folders)))
    proto = ir.serde.serialize_model(model)
    data = proto.SerializeToString()
    del proto  # keep one serialized copy alive while onnxruntime builds its own
    return ort.InferenceSession(data, options, providers=list(providers))


def update_observers(observers: dict[str, Observer], keys: list[str], results: list) -> None:
    """Fold one batch's outputs into the observers (same order as ``keys``)."""
    for key, array in zip(keys, results, strict=True):
        observers[key].update(array)


def run_batch(session: ort.InferenceSession, output_names: list[str], feed: dict,
              index: int) -> list:
    """One inference; onnxruntime errors become a CalibrationError naming the feed (and its
    file, for data folders)."""
    try:
        return session.run(output_names, feed) if output_names else []
    except Exception as err:
        raise CalibrationError(
            f"onnxruntime failed on calibration {feed_name(feed, index)}: {err}") from err


def check_loads(model: ir.Model, providers: Sequence[str], workdir: Path, where: str) -> None:
    """Refuse a float model that onnxruntime cannot load, with onnxruntime's reason.

    Raises:
        UnsupportedModelError: onnxruntime refuses the model (an op's attribute it rejects, a
            kernel it lacks for these types or providers, ...).
    """
    try:
        session = make_session(model, providers, workdir)
    except CalibrationError as err:
        reason = runtime_reason(err.__cause__ or err)
        raise UnsupportedModelError(
            f"onnxruntime cannot load {where}: {reason}. Quantization needs a model that "
            f"onnxruntime runs (checked with the providers {list(providers)}); fix the model "
            "or choose other providers") from err
    del session


def model_input_specs(model: Any) -> tuple[list[InputSpec], set[str]]:
    """The feedable inputs of a model given as a path (its weights are not read),
    ``onnx.ModelProto`` or ``onnx_ir.Model``, and the names of those that may be omitted.

    Raises:
        ModelLoadError: ``model`` is none of these.
        UnsupportedModelError: An input is not a tensor or has no element type.
    """
    if isinstance(model, ir.Model):
        return input_specs(model)
    if isinstance(model, (str, os.PathLike)):
        model = onnx.load(os.fspath(model), load_external_data=False)
    if not isinstance(model, onnx.ModelProto):
        raise ModelLoadError(f"cannot read a model from a {type(model).__name__}; pass a path, "
                             "an onnx.ModelProto or an onnx_ir.Model")
    specs = [InputSpec.from_value_info(v) for v in model.graph.input]
    return specs, {t.name for t in model.graph.initializer}


def session_from_path(path: str | os.PathLike, providers: Sequence[str],
                      which: str) -> ort.InferenceSession:
    """A session over a model file, with onnxruntime's default graph optimizations (as the
    model will be run); ``which`` names the model in the error.

    Raises:
        EvaluationError: onnxruntime cannot load it.
    """
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(os.fspath(path), options, providers=list(providers))
    except Exception as err:  # onnxruntime raises its own exception types
        raise EvaluationError(f"onnxruntime cannot load {which} '{path}': {err}") from err
