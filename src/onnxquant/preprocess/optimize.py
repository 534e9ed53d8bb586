"""Graph optimization with onnxruntime's basic-level optimizer.

Contract: :func:`optimize_graph` returns a model that computes the same function with the same
graph inputs and outputs (names, order, types), or the model it was given, unchanged, with the
reason in the report when onnxruntime cannot load it. The model it is given is never modified.

What the basic level does (all rewrites are plain ONNX, for every execution provider):
constant folding (also inside If/Loop bodies: silero_vad's LSTM weights, computed by
Concat/Unsqueeze from constants, become initializers that dynamic quantization can quantize),
Identity/Dropout/no-op Slice/Unsqueeze/Cast elimination, Conv+BatchNormalization,
Conv+Add and Conv+Mul folding, MatMul+Add → Gemm, Relu+Clip fusion and common-subexpression
elimination.

Why onnxruntime's optimizer and not onnxscript's (``onnxscript.optimizer.optimize``): both were
run on the seven models of our corpus and compared on real inputs (outputs within rtol 1e-3).
onnxruntime's basic level was correct on all seven. onnxscript's 0.7.2 optimizer wrote an
invalid model for ddddocr_common (a Reshape with ``allowzero`` in an opset-12 graph, refused by
onnxruntime), left the 35 BatchNormalization nodes of rapidocr_cls_v2 unfolded (its weights are
Constant nodes, which onnxscript lifts to initializers only after its rewrite rules ran), has no
Conv+Add folding, and by default folds no node with an input above 8192 elements. The quantized
model runs on onnxruntime anyway, so a model onnxruntime cannot load gains nothing from another
optimizer.

Models of any size: the model is written with external data into a private folder, onnxruntime
reads it and writes the optimized model with external initializers next to it, and the result
is loaded lazily (weights stay memory-mapped). The folder must outlive the returned model; pass
``workdir`` for that, or leave it out and the weights are read into memory before the private
folder is removed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
from pathlib import Path

import onnx_ir as ir
from onnx_ir.passes.common import (
    DeduplicateHashedInitializersPass,
    LiftSubgraphInitializersToMainGraphPass,
)

from onnxquant.core import model_io, tempdirs
from onnxquant.preprocess.report import StepReport, op_counts

__all__ = ["optimize_graph", "OptimizeResult", "STEP"]

logger = logging.getLogger(__name__)

STEP = "optimize"
_EXTERNAL_MIN_BYTES = 1024
_TEMP_PREFIX = ".onnxquant-optimize-"


@dataclasses.dataclass(frozen=True)
class OptimizeResult:
    """The optimized model and what changed.

    Attributes:
        model: The optimized model (the given model itself when nothing could be done).
        report: What changed: removed and added nodes per op type, or the problem.
    """

    model: ir.Model
    report: StepReport


def optimize_graph(model: ir.Model, *, workdir: str | os.PathLike | None = None
                   ) -> OptimizeResult:
    """Optimize ``model`` with onnxruntime's basic graph optimizations.

    Args:
        model: The model (not modified).
        workdir: A folder for the intermediate files that stays until the returned model has
            been saved (its weights are memory-mapped from there). None: a private temporary
            folder, removed before returning, and the weights are read into memory.

    Returns:
        The optimized model and the report; on failure the given model and the reason.
    """
    with contextlib.ExitStack() as stack:
        if workdir is None:
            folder = stack.enter_context(tempdirs.private_dir(None, _TEMP_PREFIX))
        else:
            folder = Path(tempfile.mkdtemp(prefix="optimize-", dir=workdir))
        try:
            optimized = _run_onnxruntime(model, folder)
        except Exception as err:  # noqa: BLE001 - onnxruntime refuses what it cannot run
            logger.debug("onnxruntime graph optimization failed", exc_info=True)
            return OptimizeResult(model, StepReport(
                STEP, False, problem=f"onnxruntime could not optimize the model, left as it "
                f"was: {_first_line(err)}"))
        problem = _signature_problem(model, optimized)
        if problem is not None:
            return OptimizeResult(model, StepReport(STEP, False, problem=problem))
        if workdir is None:
            model_io.load_external_tensors(optimized)
        _keep_model_properties(model, optimized)
        _share_duplicates(optimized)
        return OptimizeResult(optimized, _report(model, optimized))


def _share_duplicates(model: ir.Model) -> None:
    """Store identical constants once. onnxruntime folds a computation inside each If/Loop
    body separately, so a weight read by two bodies comes back as two equal initializers (the
    LSTM weights of silero_vad: 2.3 -> 3.3 MB); lifting body initializers to the main graph
    and deduplicating them (onnx_ir's passes) stores each once, read from the outer scope."""
    if not any(True for _ in model.graph.subgraphs()):
        return
    LiftSubgraphInitializersToMainGraphPass()(model)
    DeduplicateHashedInitializersPass()(model)


def _run_onnxruntime(model: ir.Model, folder: Path) -> ir.Model:
    import onnxruntime as ort

    source = folder / "model.onnx"
    target = folder / "optimized.onnx"
    ir.save(model, source, external_data=source.name + ".data",
            size_threshold_bytes=_EXTERNAL_MIN_BYTES)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(target)
    options.add_session_config_entry(
        "session.optimized_model_external_initializers_file_name", target.name + ".data")
    options.add_session_config_entry(
        "session.optimized_model_external_initializers_min_size_in_bytes",
        str(_EXTERNAL_MIN_BYTES))
    options.log_severity_level = 3
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    return ir.load(target)


def _signature(model: ir.Model) -> list[tuple[str, str]]:
    values = [*model.graph.inputs, *model.graph.outputs]
    return [(v.name or "", str(v.dtype)) for v in values]


def _signature_problem(before: ir.Model, after: ir.Model) -> str | None:
    if _signature(before) != _signature(after):
        return ("onnxruntime's optimized model has other graph inputs or outputs than the "
                "model; left as it was")
    return None


def _keep_model_properties(before: ir.Model, after: ir.Model) -> None:
    """What onnxruntime does not carry over: the producer, doc string and metadata."""
    after.producer_name = before.producer_name
    after.producer_version = before.producer_version
    after.doc_string = before.doc_string
    after.model_version = before.model_version
    after.graph.name = before.graph.name
    for key, value in before.metadata_props.items():
        after.metadata_props.setdefault(key, value)


def _report(before: ir.Model, after: ir.Model) -> StepReport:
    old, new = op_counts(before), op_counts(after)
    removed = {op: old[op] - new[op] for op in old if old[op] > new[op]}
    added = {op: new[op] - old[op] for op in new if new[op] > old[op]}
    details = [f"onnxruntime basic level: {sum(old.values())} -> {sum(new.values())} nodes"]
    if removed:
        details.append("removed: " + _counts(removed))
    if added:
        details.append("added: " + _counts(added))
    return StepReport(STEP, bool(removed or added), tuple(details))


def _counts(counts: dict[str, int]) -> str:
    ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return ", ".join(f"{op} {n}" for op, n in ordered)


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
