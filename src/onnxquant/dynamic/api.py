"""The native entry point of dynamic quantization: ``quantize_dynamic`` (load -> prepare ->
probe the runtime -> rewrite -> save)."""

from __future__ import annotations

import collections
import logging
import os
import re
import time
from typing import Any

import onnx_ir as ir

from onnxquant.calibration.evaluation import evaluate_quantized
from onnxquant.core import front_door, model_io
from onnxquant.core.errors import UnsupportedModelError
from onnxquant.core.objective import as_objective
from onnxquant.core.qtypes import QuantFormat
from onnxquant.dynamic._builder import Names, remove_unused_initializers
from onnxquant.dynamic._context import Context
from onnxquant.dynamic._latency_guard import feeds_timer, guard_dynamic, guard_enabled
from onnxquant.dynamic._rewrite import Decision, rewrite_model
from onnxquant.dynamic._weights import WeightStore
from onnxquant.dynamic.config import DynamicQuantConfig
from onnxquant.dynamic.result import DynamicQuantizationResult
from onnxquant.dynamic.runtime import assume_everything, probe_runtime
from onnxquant.preprocess import passes as preprocess
from onnxquant.preprocess.hints import preprocessing_hints

__all__ = ["DynamicQuantizationResult", "Decision", "quantize_dynamic"]

logger = logging.getLogger(__name__)

_MS = "com.microsoft"
_SHOWN_NODES = 5
_SQNR = re.compile(r"per-tensor SQNR [-\d.inf]+ dB < ([\d.e+-]+) dB")


def _enter(model_input: model_io.ModelInput, model_output: str | os.PathLike,
           config: DynamicQuantConfig) -> front_door.Entry:
    """Through the front door, at the opset the chosen form needs."""
    # DynamicQuantizeLinear and Round need opset 11; per-axis DequantizeLinear needs 13.
    qdq = config.format is QuantFormat.QDQ
    entry = front_door.enter(model_input, model_output, upgrade_opset=config.upgrade_opset,
                             min_opset=13 if qdq and config.per_channel else 11)
    if qdq and config.per_channel_fallback_db is not None and \
            model_io.default_opset(entry.model) < 13:
        try:  # per-channel fallback weights need opset 13 in QDQ form
            entry.model = model_io.convert_opset(entry.model, 13)
        except UnsupportedModelError as err:
            logger.warning("%s; weights stay per tensor", err)
    return entry


def _notes(ctx: Context, decisions: list[Decision]) -> list[str]:
    def listing(names: list[str]) -> str:
        shown = ", ".join(names[:_SHOWN_NODES]) + (", ..." if len(names) > _SHOWN_NODES else "")
        return f"{len(names)} node{'s' if len(names) != 1 else ''}: {shown}"

    forms: dict[str, list[str]] = collections.defaultdict(list)
    for d in decisions:
        if d.action == "quantized":
            reason = _SQNR.sub(r"per-tensor SQNR below \1 dB", d.reason)
            forms[f"{d.op_type} -> {reason}"].append(d.name)
    notes = [f"{form} ({listing(names)})" for form, names in forms.items()]
    notes += [f"{note} ({listing(names)})" for note, names in ctx.notes.items()]
    return notes


def _finish_model(model: ir.Model, annotated: set[int]) -> None:
    remove_unused_initializers(model)
    preprocess.drop_inferred_shapes(model, annotated)
    for graph in (model.graph, *model.graph.subgraphs()):
        graph.sort()
    uses_ms = any(n.domain == _MS for n in ir.traversal.RecursiveGraphIterator(model.graph))
    if uses_ms and _MS not in model.opset_imports:
        model.opset_imports[_MS] = 1


def _rewrite(model: ir.Model, config: DynamicQuantConfig, support: Any) -> Context:
    """A fresh rewrite context for ``model`` (names, weights and runtime support)."""
    names = Names(model)
    return Context(model=model, config=config, names=names, support=support,
                   weights=WeightStore(names), opset=model_io.default_opset(model))


def quantize_dynamic(
    model_input: model_io.ModelInput,
    model_output: str | os.PathLike,
    config: DynamicQuantConfig | None = None,
    *,
    eval_data: Any = None,
) -> DynamicQuantizationResult:
    """Quantize a float model dynamically: weights offline, activations at run time.

    No calibration data is needed. In QOperator form (default) MatMul/Gemm become
    DynamicQuantizeLinear + MatMulInteger (onnxruntime fuses them into DynamicQuantizeMatMul),
    Conv becomes ConvInteger, Gather reads an 8-bit table, and LSTM/Attention/
    EmbedLayerNormalization become their com.microsoft quantized ops. In QDQ form activations get
    QuantizeLinear/DequantizeLinear fed by the model-local ``ComputeQuantizationParameters``
    function. Only operator/type combinations the installed onnxruntime runs are emitted
    (``config.check_runtime``); the result's ``runtime_notes`` say where that changed the form.

    After writing, the quantized model's outputs are compared with the float model's
    (``result.fidelity``) on ``eval_data`` when given, else on 4 random feeds when every model
    input is a float tensor (``config.evaluate=False`` turns this off).
    ``config.progress=True`` shows a progress bar while measuring; ``result.summary()``
    returns the text ``onnxquant dynamic`` prints.

    Args:
        model_input: Path, ``onnx.ModelProto`` or ``onnx_ir.Model`` (never modified).
        model_output: Where to write the quantized model (atomically; never the input path).
        config: Settings; defaults to ``DynamicQuantConfig()`` (int8 per-tensor weights,
            QOperator form).
        eval_data: Feeds to measure the accuracy on: a reader with ``get_next()``, an
            iterable of ``{input_name: array}`` dicts, or a folder of ``.npz`` files / ONNX
            test-data sets.

    Returns:
        A :class:`DynamicQuantizationResult` with every decision, the files written and the
        fidelity.

    Raises:
        onnxquant.core.errors.QuantizationError: With a message naming the file, node or tensor at
            fault. Nothing is written on failure — except that a FeedError or EvaluationError
            from ``eval_data`` comes after the model was written.
    """
    config = config or DynamicQuantConfig()
    start = time.perf_counter()
    entry = _enter(model_input, model_output, config)
    model = entry.model
    annotated = preprocess.prepare_for_quantization(model, fold_bn=config.fold_batchnorm)
    float_bytes = entry.source.float_bytes(model)  # after Constant weights became initializers
    hints = preprocessing_hints(model)
    support = probe_runtime() if config.check_runtime else assume_everything()
    pristine = model_io.clone_model(model) if guard_enabled(config, model) else None
    ctx = _rewrite(model, config, support)
    decisions = rewrite_model(ctx)
    cost_estimate = ctx.cost_estimate
    guard: dict[str, Any] | None = None
    if pristine is not None:
        def rewrite(target: ir.Model, retry: DynamicQuantConfig) -> list[Decision]:
            return rewrite_model(_rewrite(target, retry, support))

        model, decisions, guard = guard_dynamic(pristine, model, decisions, config, rewrite,
                                                feeds_timer(pristine))
    _finish_model(model, annotated)
    written = model_io.save_model(model, entry.output, external_data=config.external_data)
    del model
    fidelity = None
    if config.evaluate or eval_data is not None:
        fidelity = evaluate_quantized(model_input, written[0], eval_data=eval_data,
                                      float_bytes=float_bytes, progress=config.progress)
    result = DynamicQuantizationResult(
        decisions=decisions,
        runtime_notes=_notes(ctx, decisions),
        output_files=written,
        float_bytes=float_bytes,
        quantized_bytes=sum(p.stat().st_size for p in written),
        seconds=time.perf_counter() - start,
        format=config.format,
        fidelity=fidelity,
        hints=hints,
        cost_model={**(cost_estimate or {"objective": as_objective(config.objective).value,
                                          "measured": False}),
                    **({"latency_guard": guard} if guard else {})},
    )
    logger.info("dynamic quantization: %d of %d candidate nodes quantized",
                len(result.quantized), len(decisions))
    return result
