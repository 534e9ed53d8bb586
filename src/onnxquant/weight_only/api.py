"""The native entry point of weight-only quantization: ``quantize_weights``.

load (external data stays on disk) → opset 21 for QDQ → select → [GPTQ: stream calibration
data through onnxruntime (segment by segment for large models), keeping one Hessian accumulator
per distinct A input] → per weight: read in slabs, quantize, emit, release → save (atomic;
external data when asked or above 2 GB).

Peak memory is one weight slab (or one whole weight for GPTQ / channel-wise blocks) plus the
quantized tensors written so far (about ``bits / 32`` of the float weights) — not the model.
GPTQ adds its calibration rows (or dense Hessians, whichever is smaller), one onnxruntime
segment's weights while calibrating, and one float64 ``K x K`` Hessian while factorising.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
from tqdm.auto import tqdm

from onnxquant.calibration.evaluation import HoldBack, evaluate_quantized
from onnxquant.core import front_door, model_io
from onnxquant.core.errors import CalibrationError, NumericsError, QuantizationError
from onnxquant.core.graph import iter_nodes
from onnxquant.core.qtypes import QuantFormat
from onnxquant.weight_only._hessian import HessianAccumulator, HessianStore
from onnxquant.weight_only._progress import SaveProgress
from onnxquant.weight_only._select import Target, WeightDecision, select_targets
from onnxquant.weight_only._weights import quantize_slabs, release
from onnxquant.weight_only.blocks import BlockQuantized
from onnxquant.weight_only.config import WeightOnlyAlgorithm, WeightOnlyConfig
from onnxquant.weight_only.emit import WeightEmitter
from onnxquant.weight_only.gptq import inverse_factor, quantize_gptq
from onnxquant.weight_only.hqq import quantize_hqq
from onnxquant.weight_only.result import WeightOnlyResult
from onnxquant.weight_only.rtn import quantize_rtn

__all__ = ["WeightOnlyResult", "quantize_weights", "quantize_model_weights", "QDQ_OPSET"]

logger = logging.getLogger(__name__)

QDQ_OPSET = 21  # blocked DequantizeLinear and int4/uint4 types


def _needs_qdq_opset(model: ir.Model, config: WeightOnlyConfig) -> bool:
    if config.format is not QuantFormat.QDQ or model_io.default_opset(model) >= QDQ_OPSET:
        return False
    return any(n.op_type == "MatMul" and n.domain in ("", "ai.onnx")
               for n in iter_nodes(model, subgraphs=config.subgraphs))


def _input_name(node: ir.Node) -> str:
    """The name of the node's activation input ("" when it has none)."""
    a = node.inputs[0]
    return a.name or "" if a is not None else ""


def _key(target: Target, config: WeightOnlyConfig) -> Hashable:
    """Targets with equal keys store the same quantized tensors."""
    a = target.node.inputs[0]
    a_name = a.name if a is not None and target.settings.algorithm is WeightOnlyAlgorithm.GPTQ \
        else None
    return (id(target.weight), target.op_type, target.settings, target.axis, target.block_size,
            target.packed_uint8, config.format, a_name)


def _quantizer(target: Target, config: WeightOnlyConfig, hessian: HessianAccumulator | None
               ) -> tuple[Callable[[np.ndarray], BlockQuantized], int, bool]:
    """(quantize function on a [rows, cols] float32 matrix, its block size, splittable)."""
    s = target.settings
    k = target.shape[target.axis]
    block = s.block_size if s.block_size is not None else k
    if s.algorithm is WeightOnlyAlgorithm.GPTQ and hessian is not None:
        # Factorise before the weight is read: the float64 Hessian is gone by then.
        factor = inverse_factor(hessian, k, config.gptq.percdamp, config.gptq.act_order)
        return functools.partial(
            _call_gptq, quantize_gptq, hessian=factor, bits=s.bits, block_size=block,
            symmetric=s.symmetric, act_order=config.gptq.act_order), block, False
    if s.algorithm is WeightOnlyAlgorithm.HQQ:
        float_zp = target.op_type == "MatMul" and config.format is QuantFormat.QOPERATOR
        return functools.partial(
            quantize_hqq, bits=s.bits, block_size=block, iterations=config.hqq_iterations,
            integer_zero_point=not float_zp), block, True
    return functools.partial(quantize_rtn, bits=s.bits, block_size=block,
                             symmetric=s.symmetric), block, True


def _call_gptq(fn: Callable[..., BlockQuantized], m: np.ndarray, **kwargs: Any) -> BlockQuantized:
    hessian = kwargs.pop("hessian")
    bits, block, symmetric = kwargs.pop("bits"), kwargs.pop("block_size"), kwargs.pop("symmetric")
    return fn(m, hessian, bits, block, symmetric, **kwargs)


def _quantize(target: Target, config: WeightOnlyConfig, hessian: HessianAccumulator | None
              ) -> BlockQuantized:
    tensor = target.weight.const_value
    assert tensor is not None
    try:
        quantize, block, splittable = _quantizer(target, config, hessian)
        blocks = quantize_slabs(tensor, target.axis, quantize, block_size=block,
                                splittable=splittable and target.settings.block_size is not None)
    except ValueError as err:
        raise NumericsError(
            f"cannot quantize weight '{target.weight.name}' of node '{target.node.name}': "
            f"{err}. Exclude the node (nodes_to_exclude) or fix the weight") from err
    finally:
        release(tensor)
    if blocks.block_size != target.block_size:  # channel-wise: one block, node-legal size
        blocks = dataclasses.replace(blocks, block_size=target.block_size)
    return blocks


def _gptq_hessians(model: ir.Model, targets: list[Target], data: Any,
                   config: WeightOnlyConfig, hold_back: HoldBack | None = None
                   ) -> tuple[HessianStore, int]:
    """Hessians per A input of every main-graph GPTQ target; other GPTQ targets fall back."""
    wanted: dict[str, int] = {}
    for target in targets:
        if target.settings.algorithm is not WeightOnlyAlgorithm.GPTQ:
            continue
        a = target.node.inputs[0]
        if target.node.graph is not model.graph or a is None or not a.name:
            target.settings = dataclasses.replace(target.settings,
                                                  algorithm=WeightOnlyAlgorithm.RTN)
            target.decision.reason = "GPTQ inside a subgraph is not supported; used RTN"
            continue
        wanted[a.name] = target.shape[target.axis]
    if not wanted:
        return HessianStore({}, []), 0
    if data is None:
        raise CalibrationError(
            "GPTQ needs calibration data: pass calibration_data (a reader, an iterable of "
            "{input_name: array} dicts or a data folder), or use algorithm RTN/HQQ")
    from onnxquant.weight_only.calib import collect_hessians

    accumulators, samples = collect_hessians(
        model, wanted, data, providers=config.gptq.providers,
        max_samples=config.gptq.max_calibration_samples, progress=config.progress,
        hold_back=hold_back, backend=config.calibration_backend,
        ray_address=config.ray_address, workers=config.calibration_workers)
    users = [_input_name(t.node) for t in targets
             if t.settings.algorithm is WeightOnlyAlgorithm.GPTQ]
    return HessianStore(accumulators, users), samples


def quantize_model_weights(
    model: ir.Model, config: WeightOnlyConfig | None = None, calibration_data: Any = None,
    *, lazy: bool = False, hold_back: HoldBack | None = None,
    saving: SaveProgress | None = None,
) -> tuple[ir.Model, list[WeightDecision], int]:
    """Quantize the weights of ``model`` in place (no file is written).

    Args:
        model: The model (changed in place unless the opset is converted for QDQ).
        config: Settings.
        calibration_data: Feeds for GPTQ.
        lazy: Quantize RTN/HQQ weights only when the model is serialised (one weight in
            memory at a time while saving; the float weights must stay readable until then).
        hold_back: Sets GPTQ calibration feeds aside for measuring the accuracy.
        saving: Counts the weights left for serialisation (lazy mode), for a progress bar.

    Returns:
        (the quantized model — a new object when the opset had to be converted for QDQ —,
        a decision per candidate node, calibration samples used by GPTQ).
    """
    config = config or WeightOnlyConfig()
    config.validate()
    if _needs_qdq_opset(model, config):
        model = model_io.convert_opset(model, QDQ_OPSET)
    targets, decisions = select_targets(model, config)
    hessians, samples = _gptq_hessians(model, targets, calibration_data, config, hold_back)
    emitter = WeightEmitter(model, config.format, lazy=lazy,
                            reshape_unit_dims=config.reshape_unit_dims)
    gptq = sum(t.settings.algorithm is WeightOnlyAlgorithm.GPTQ for t in targets)
    desc = "GPTQ: quantizing weights" if gptq else "quantizing weights"
    for target in tqdm(targets, desc=desc, unit="weight",
                       disable=not config.progress or (lazy and not gptq)):
        key = _key(target, config)
        rows = None  # GPTQ: the calibration rows of the node's input
        if target.settings.algorithm is WeightOnlyAlgorithm.GPTQ:
            rows = hessians.take(_input_name(target.node))
        # GPTQ quantizes now, so that the rows of each input are freed after their last use.
        make_blocks: Callable[[], BlockQuantized] = functools.partial(_quantize, target,
                                                                      config, rows)
        now, rows = rows is not None, None
        if lazy and not now and saving is not None and not emitter.has(key):
            make_blocks = saving.wrap(make_blocks)
        if target.op_type == "MatMul":
            emitted = emitter.matmul(target, make_blocks, key, now=now)
        else:
            emitted = emitter.gather(target, make_blocks, key)
        del make_blocks
        d, s = target.decision, target.settings
        d.action, d.emitted, d.bits, d.block_size = "weights", emitted, s.bits, target.block_size
        d.symmetric, d.algorithm = s.symmetric, s.algorithm.value
    hessians.clear()
    removed = emitter.finish()
    logger.info("quantized %d weights (%d float initializers removed)", len(targets),
                len(removed))
    return model, decisions, samples


def _quantization_error(err: BaseException) -> QuantizationError | None:
    """The QuantizationError a serialiser wrapped, if any."""
    seen = 0
    current: BaseException | None = err
    while current is not None and seen < 20:
        if isinstance(current, QuantizationError):
            return current
        current, seen = current.__cause__ or current.__context__, seen + 1
    return None


def quantize_weights(
    model_input: model_io.ModelInput,
    model_output: str | os.PathLike,
    config: WeightOnlyConfig | None = None,
    calibration_data: Any = None,
    *,
    eval_data: Any = None,
) -> WeightOnlyResult:
    """Quantize the MatMul (and optionally Gather) weights of a model block-wise to 2/4/8 bits.

    Activations stay float. Weights are read lazily (external data stays on disk until its
    turn) and quantized one at a time, so memory stays far below the model's size.

    After writing, the quantized model's outputs are compared with the float model's
    (``result.fidelity``) on ``eval_data`` when given; else, for GPTQ, on every 10th
    calibration feed (at most 16), held back from calibration; else on 4 random feeds when
    every model input is a float tensor. Without ``eval_data`` this is skipped for models
    above 2 GB (both models are loaded into onnxruntime); ``config.evaluate=False`` turns it
    off. ``config.progress=True`` shows progress bars (GPTQ calibration, GPTQ quantization,
    weights quantized while writing, evaluation); ``result.summary()`` returns the text
    ``onnxquant weights`` prints.

    Args:
        model_input: Path, ``onnx.ModelProto`` or ``onnx_ir.Model`` (never modified).
        model_output: Where to write the quantized model (atomically; never the input path).
        config: Settings; defaults to ``WeightOnlyConfig()`` (4 bits, blocks of 128,
            asymmetric RTN, MatMulNBits).
        calibration_data: Feeds for GPTQ: a reader with ``get_next()``, an iterable of
            ``{input_name: array}`` dicts, or a folder of ``.npz`` files / ONNX test-data sets.
        eval_data: Feeds to measure the accuracy on (same kinds as ``calibration_data``);
            when given, no calibration feed is held back.

    Returns:
        A :class:`WeightOnlyResult` with a decision per node, the files written and the
        fidelity.

    Raises:
        onnxquant.core.errors.QuantizationError: With a message naming the file, node or tensor at
            fault. Nothing is written on failure — except that a FeedError or EvaluationError
            from ``eval_data`` comes after the model was written.
    """
    config = config or WeightOnlyConfig()
    config.validate()
    start = time.perf_counter()
    entry = front_door.enter(model_input, model_output, upgrade_opset=config.upgrade_opset)
    model = entry.model
    float_bytes = entry.source.float_bytes(model)
    hold_back = HoldBack() if config.evaluate and eval_data is None else None
    saving = SaveProgress()
    model, decisions, samples = quantize_model_weights(
        model, config, calibration_data, lazy=True, hold_back=hold_back, saving=saving)
    written = _save(model, entry.output, config, saving)
    del model
    fidelity = None
    if config.evaluate or eval_data is not None:
        fidelity = evaluate_quantized(
            model_input, written[0], eval_data=eval_data, hold_back=hold_back,
            data_path=calibration_data, float_bytes=float_bytes,
            providers=config.gptq.providers, progress=config.progress)
    return WeightOnlyResult(
        decisions=decisions,
        output_files=written,
        float_bytes=float_bytes,
        quantized_bytes=sum(p.stat().st_size for p in written),
        calibration_samples=samples,
        seconds=time.perf_counter() - start,
        fidelity=fidelity,
    )


def _save(model: ir.Model, output: Path, config: WeightOnlyConfig,
          saving: SaveProgress) -> list[Path]:
    """Write the model, quantizing the deferred weights on the way."""
    try:
        with saving.saving(output, config.progress):
            return model_io.save_model(model, output, external_data=config.external_data)
    except Exception as err:  # weights are quantized while saving: surface our own error
        cause = _quantization_error(err)
        if cause is None:
            raise
        raise cause from cause.__cause__
