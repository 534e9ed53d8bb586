"""``quant_pre_process`` of ``onnxruntime.quantization.shape_inference``, backed by
:func:`onnxquant.preprocess`.

The signature is onnxruntime 1.32's (every argument may be positional; the older keyword
``input_model_path`` is accepted for ``input_model``). The arguments become one
:class:`~onnxquant.preprocess.config.PreprocessConfig` in :func:`pre_process_config`.

Differences from onnxruntime, on purpose:

* Returns the :class:`~onnxquant.preprocess.result.PreprocessResult` (onnxruntime returns
  ``None``).
* Symbolic shape inference that cannot finish keeps what it inferred and the run goes on
  (onnxruntime raises "Incomplete symbolic shape inference" or a bare ``AssertionError``, and
  leaves ``sym_shape_infer_temp.onnx`` in the working directory). Nothing is written outside
  the output's folder, and there only the output (and its external data).
* Optimization works on models above 2 GB and with ``save_as_external_data``.
* ``all_tensors_to_one_file`` is accepted and has no effect: external data always goes to one
  file, ``external_data_location`` (a file name next to the output; default
  ``<output name>.data``).
* ``verbose`` is accepted for compatibility; onnxquant logs through the ``onnxquant`` logger.
* The output path may not be the input path.

As in onnxruntime, a model at opset 10 or below is first converted to opset 11 with ONNX's version
converter, its ``Upsample`` nodes becoming ``Resize``
(:func:`onnxquant.preprocess.legacy_opset.upgrade_legacy_opset`; onnxquant's Resize keeps
Upsample's ``asymmetric`` coordinates).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from onnxquant.core import front_door
from onnxquant.core.errors import QuantizationError
from onnxquant.core.model_io import ModelInput
from onnxquant.ort._errors import InvalidOptionError
from onnxquant.preprocess.api import preprocess
from onnxquant.preprocess.config import PreprocessConfig
from onnxquant.preprocess.legacy_opset import (
    LEGACY_TARGET_OPSET,
    default_opset,
    upgrade_legacy_opset,
)
from onnxquant.preprocess.result import PreprocessResult

__all__ = ["quant_pre_process", "pre_process_config"]

logger = logging.getLogger(__name__)


def pre_process_config(
    *,
    skip_optimization: bool = False,
    skip_onnx_shape: bool = False,
    skip_symbolic_shape: bool = False,
    auto_merge: bool = False,
    int_max: int = 2**31 - 1,
    guess_output_rank: bool = False,
    save_as_external_data: bool = False,
    external_data_location: str | None = None,
    external_data_size_threshold: int = 1024,
) -> PreprocessConfig:
    """onnxruntime's ``quant_pre_process`` options as a :class:`PreprocessConfig` (the one
    place where they are translated)."""
    return PreprocessConfig(
        symbolic_shapes=not skip_symbolic_shape,
        optimize=not skip_optimization,
        onnx_shapes=not skip_onnx_shape,
        auto_merge=bool(auto_merge),
        int_max=int(int_max),
        guess_output_rank=bool(guess_output_rank),
        external_data=True if save_as_external_data else None,
        external_data_name=external_data_location,
        external_data_threshold=int(external_data_size_threshold),
        upgrade_opset=True,  # onnxruntime converts old opsets too
    )


def quant_pre_process(
    input_model: ModelInput | None = None,
    output_model_path: str | os.PathLike | None = None,
    skip_optimization: bool = False,
    skip_onnx_shape: bool = False,
    skip_symbolic_shape: bool = False,
    auto_merge: bool = False,
    int_max: int = 2**31 - 1,
    guess_output_rank: bool = False,
    verbose: int = 0,
    save_as_external_data: bool = False,
    all_tensors_to_one_file: bool = False,
    external_data_location: str | None = None,
    external_data_size_threshold: int = 1024,
    **deprecated_kwargs: Any,
) -> PreprocessResult:
    """Shape inference and optimization before quantization, as onnxruntime's tool does it.

    Args:
        input_model: Path, ``onnx.ModelProto`` or ``onnx_ir.Model`` (never modified).
        output_model_path: Where to write the result.
        skip_optimization: Skip onnxruntime's basic graph optimization.
        skip_onnx_shape: Skip ONNX shape inference.
        skip_symbolic_shape: Skip symbolic shape inference.
        auto_merge: Merge conflicting symbolic dimensions instead of stopping at them.
        int_max: The integer treated as unbounded by symbolic inference (Slice ends).
        guess_output_rank: Give outputs of unknown ops the rank of their first input.
        verbose: Accepted for compatibility (see the module docstring).
        save_as_external_data: Write weights to an external-data file.
        all_tensors_to_one_file: Accepted; external data is always one file.
        external_data_location: The external-data file name, next to the output.
        external_data_size_threshold: Bytes from which a tensor goes to external data.
        **deprecated_kwargs: ``input_model_path``, the old name of ``input_model``.

    Returns:
        What changed (``result.summary()``).

    Raises:
        InvalidOptionError: No input or output given, an unknown keyword or an invalid value
            (also a ``ValueError``).
        ModelLoadError, UnsupportedModelError, OutputPathError: As
            :func:`onnxquant.preprocess`.
    """
    del verbose, all_tensors_to_one_file  # accepted for compatibility only
    if "input_model_path" in deprecated_kwargs:
        if input_model is not None:
            raise InvalidOptionError("give the model as input_model or input_model_path, "
                                     "not both")
        input_model = deprecated_kwargs.pop("input_model_path")
    if deprecated_kwargs:
        raise InvalidOptionError(
            f"quant_pre_process() got unexpected keyword arguments: "
            f"{', '.join(sorted(deprecated_kwargs))}")
    if input_model is None or output_model_path is None:
        raise InvalidOptionError("quant_pre_process needs input_model and output_model_path")
    try:
        config = pre_process_config(
            skip_optimization=skip_optimization, skip_onnx_shape=skip_onnx_shape,
            skip_symbolic_shape=skip_symbolic_shape, auto_merge=auto_merge, int_max=int_max,
            guess_output_rank=guess_output_rank, save_as_external_data=save_as_external_data,
            external_data_location=external_data_location,
            external_data_size_threshold=external_data_size_threshold)
    except QuantizationError as err:
        raise InvalidOptionError(str(err)) from err
    return preprocess(_at_opset_11(input_model, output_model_path), output_model_path, config)


def _legacy_proto(model_input: ModelInput, model_output: str | os.PathLike
                  ) -> onnx.ModelProto | None:
    """The model as a ModelProto when it is below opset 11 (None otherwise)."""
    if isinstance(model_input, ir.Model):
        opset = model_input.opset_imports.get("", model_input.opset_imports.get("ai.onnx", 1))
        return ir.serde.serialize_model(model_input) if opset < LEGACY_TARGET_OPSET else None
    if isinstance(model_input, onnx.ModelProto):
        return model_input if default_opset(model_input) < LEGACY_TARGET_OPSET else None
    try:
        proto = onnx.load(str(model_input), load_external_data=False)
    except Exception:  # noqa: BLE001 - missing or not ONNX: the front door says so properly
        return None
    if default_opset(proto) >= LEGACY_TARGET_OPSET:
        return None
    front_door.check_output(model_input, model_output)  # the proto no longer names the file
    onnx.load_external_data_for_model(proto, str(Path(model_input).absolute().parent))
    return proto


def _at_opset_11(model_input: ModelInput, model_output: str | os.PathLike) -> ModelInput:
    """``model_input``, converted to opset 11 first when it is older (as onnxruntime does).

    A model the converter cannot handle goes on unchanged (onnxquant's own checks then say
    what is wrong with it).
    """
    proto = _legacy_proto(model_input, model_output)
    if proto is None:
        return model_input
    try:
        return upgrade_legacy_opset(proto)
    except Exception as err:  # the converter raises several kinds of errors
        logger.warning("converting the model from opset %d to %d failed (%s); preprocessing "
                       "it as it is", default_opset(proto), LEGACY_TARGET_OPSET, err)
        return model_input
