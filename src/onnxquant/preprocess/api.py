"""``onnxquant.preprocess(model_in, model_out, PreprocessConfig())``: the user-facing step.

The model comes in through the same front door as every mode (loaded, validated, a private
copy: the input is never modified), then goes through the passes the config asks for, in
onnxruntime's order: symbolic shape inference, graph optimization, ONNX shape inference. The
intermediate files live in a private folder next to the output that is always removed; the
output is written atomically (a temporary file in the destination folder, then a rename).
Nothing is written anywhere else.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from onnxquant.core import front_door, model_io, tempdirs
from onnxquant.core.errors import OutputPathError
from onnxquant.preprocess.config import PreprocessConfig
from onnxquant.preprocess.onnx_shapes import infer_onnx_shapes
from onnxquant.preprocess.optimize import optimize_graph
from onnxquant.preprocess.report import StepReport, explain_unknown, op_counts, shape_census
from onnxquant.preprocess.result import PreprocessResult
from onnxquant.preprocess.symbolic_shapes import infer_symbolic_shapes
from onnxquant.preprocess.transformers import fuse_transformer_model

__all__ = ["preprocess", "PREPROCESSED_KEY"]

logger = logging.getLogger(__name__)

PREPROCESSED_KEY = "onnx.quant.pre_process"
"""Metadata key marking a pre-processed model (the key onnxruntime's tool writes and reads)."""


def preprocess(
    model_input: model_io.ModelInput,
    model_output: str | os.PathLike,
    config: PreprocessConfig | None = None,
) -> PreprocessResult:
    """Prepare a float model for quantization: shapes inferred, graph optimized.

    Args:
        model_input: Path, ``onnx.ModelProto`` or ``onnx_ir.Model`` (never modified).
        model_output: Where to write the result (atomically; never the input path).
        config: The steps and options; defaults to ``PreprocessConfig()`` (every step).

    Returns:
        What changed; ``result.summary()`` is the text ``onnxquant preprocess`` prints.

    Raises:
        ModelLoadError, UnsupportedModelError: The model cannot be read or is invalid.
        OutputPathError: The output cannot be written, or would overwrite an input file.

    A step that cannot do its work does not fail the run: the model goes on as it was and
    the step's problem is in the result (``result.warnings()``).
    """
    config = config or PreprocessConfig()
    start = time.perf_counter()
    entry = front_door.enter(model_input, model_output, upgrade_opset=config.upgrade_opset)
    data_name = config.external_data_name or entry.output.name + model_io.DATA_SUFFIX
    _check_data_file(entry, data_name)
    model = entry.model
    ops_before, shapes_before = op_counts(model), shape_census(model)
    size_before = entry.source.float_bytes(model)
    steps: list[StepReport] = []
    with tempdirs.private_dir(entry.output.parent, model_io.TEMP_PREFIX) as workdir:
        if config.symbolic_shapes:
            steps.append(infer_symbolic_shapes(
                model, auto_merge=config.auto_merge, int_max=config.int_max,
                guess_output_rank=config.guess_output_rank))
        if config.model_type is not None:  # on the exporter's graph, before optimization
            model, fused = fuse_transformer_model(model, config.model_type, config.num_heads,
                                                  config.hidden_size)
            steps.append(fused)
        if config.optimize:
            optimized = optimize_graph(model, workdir=workdir)
            model = optimized.model
            steps.append(optimized.report)
        if config.onnx_shapes:
            steps.append(infer_onnx_shapes(model))
        for step in steps:
            if step.problem:
                logger.info("%s: %s", step.step, step.problem)
        notes = {s.node: f"{s.step} stopped here: {s.problem}" for s in steps if s.node}
        unknown = explain_unknown(model, notes)
        ops_after, shapes_after = op_counts(model), shape_census(model)
        model.metadata_props[PREPROCESSED_KEY] = "onnxquant"
        external = config.external_data
        if external is None:
            external = model_io.model_size_bytes(model) > model_io.PROTOBUF_LIMIT - (64 << 20)
        if not external:  # one file: no reference to the input's or the work folder's data
            model_io.load_external_tensors(model)
        files = model_io.save_model(
            model, entry.output, external_data=external, data_name=data_name,
            size_threshold=config.external_data_threshold)
    return PreprocessResult(
        source=entry.source.description, output=entry.output, files=files, steps=steps,
        ops_before=ops_before, ops_after=ops_after, shapes_before=shapes_before,
        shapes_after=shapes_after, unknown=unknown, size_before=size_before,
        size_after=sum(p.stat().st_size for p in files),
        seconds=time.perf_counter() - start)


def _check_data_file(entry: front_door.Entry, data_name: str) -> None:
    """Refuse an external-data file name that is one of the input's files."""
    target = entry.output.parent / data_name
    for existing in entry.source.files:
        if Path(os.path.realpath(target)) == Path(os.path.realpath(existing)):
            raise OutputPathError(
                f"writing the external data to '{target}' would overwrite '{existing}', a file "
                "of the input model; choose another external-data name or output folder")
