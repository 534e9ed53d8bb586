"""onnxruntime's ``qdq_loss_debug`` API: save intermediate tensors, pair each quantized
activation's values before and after its QuantizeLinear → DequantizeLinear, match weights to
their float originals, and compute SQNR.

Same names, signatures and return shapes as onnxruntime's module; on QDQ models made by
onnxruntime the keys and values are the same. Differences, on purpose:

- pairs and weights are found from the graph's structure (:mod:`onnxquant.debug.matching`),
  not from onnxruntime's tensor-name suffixes, so models made by onnxquant or other tools
  match too, and so do per-channel, blockwise, 4/16-bit and QOperator weights
  (``create_weight_matching``); the augmented model records its pairs in its metadata, and
  :func:`collect_activations` returns them with the values;
- integer arithmetic is done in a wide type (onnxruntime's wraps around for uint8 weights);
- :func:`compute_activation_error` works without float activations (``xmodel_err`` omitted);
- the models are loaded and checked by onnxquant's front door, and nothing is written when
  the output path is unusable.

For a complete per-layer comparison (accumulated and isolated error, sensitivity, an HTML
report), use :func:`onnxquant.compare` or ``onnxquant report``.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import onnxruntime

from onnxquant.calibration.readers import iter_feeds
from onnxquant.core import front_door, model_io
from onnxquant.core.errors import CalibrationError
from onnxquant.debug.matching import match_models
from onnxquant.preprocess import infer_types

__all__ = [
    "modify_model_output_intermediate_tensors",
    "collect_activations",
    "create_activation_matching",
    "create_weight_matching",
    "compute_signal_to_quantization_noice_ratio",
    "compute_weight_error",
    "compute_activation_error",
    "ActivationDict",
    "QUANT_INPUT_SUFFIX",
]

_TENSOR_SAVE_POSTFIX = "_ReshapedSavedOutput"
PAIRS_KEY = "onnxquant.qdq_pairs"
"""Metadata key of the augmented model: JSON ``{activation: [pre tensor, post tensor]}``."""
STANDS_FOR_KEY = "onnxquant.stands_for"
"""Metadata key onnxquant's quantizers write: JSON ``{tensor: float tensor it stands for}``
(a Conv output that carries a folded BatchNormalization or a fused Relu)."""

QUANT_INPUT_SUFFIX = "_QuantizeLinear_Input"
"""Suffix onnxruntime gives the tensor before the QuantizeLinear of a graph output."""
_QUANT_INPUT_SUFFIX = QUANT_INPUT_SUFFIX
_DEQUANT_OUTPUT_SUFFIX = "_DequantizeLinear_Output"
_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16)


class ActivationDict(dict):
    """``{tensor name: [flattened array per batch]}`` with the augmented model's
    ``pairs`` (``{activation: (pre tensor, post tensor)}``), found from its structure."""

    pairs: dict[str, tuple[str, str]]

    def __init__(self, *args: Any, pairs: dict[str, tuple[str, str]] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pairs = dict(pairs or {})


def _qdq_pairs(model: ir.Model) -> dict[str, tuple[str, str]]:
    """``{activation: (tensor before QuantizeLinear, tensor after DequantizeLinear)}`` for every
    QuantizeLinear → DequantizeLinear pair of the main graph (weights held in Constant nodes
    and quantized at run time included, as onnxruntime's naming rules pair them)."""
    stands_for = json.loads(model.metadata_props.get(STANDS_FOR_KEY, "{}"))
    outputs = {id(v) for v in model.graph.outputs}
    pairs: dict[str, tuple[str, str]] = {}
    for node in model.graph:
        pre = node.inputs[0] if node.op_type == "QuantizeLinear" and node.inputs else None
        if pre is None or pre.name is None or pre.is_initializer():
            continue
        for reader, _ in node.outputs[0].uses():
            if reader.op_type != "DequantizeLinear" or reader.inputs[0] is not node.outputs[0]:
                continue
            post = reader.outputs[0]
            key = post.name if id(post) in outputs else stands_for.get(pre.name, pre.name)
            pairs.setdefault(key or "", (pre.name, post.name or ""))
    return pairs


def modify_model_output_intermediate_tensors(
    input_model_path: str | Path,
    output_model_path: str | Path,
    op_types_for_saving: Sequence[str] | None = None,
    save_as_external_data: bool = False,
) -> None:
    """Write a copy of the model whose outputs also carry every float/float16 input and output
    of the nodes of ``op_types_for_saving`` (all nodes when None or empty), flattened, as
    ``<tensor>_ReshapedSavedOutput``."""
    entry = front_door.enter(input_model_path, output_model_path)
    model = entry.model
    infer_types(model)
    pairs = _qdq_pairs(model)
    wanted = set(op_types_for_saving or [])
    selected: dict[str, ir.Value] = {}
    for node in model.graph:
        if wanted and node.op_type not in wanted:
            continue
        for value in (*node.inputs, *node.outputs):
            if value is not None and value.name and value.dtype in _FLOAT_TYPES and \
                    value.const_value is None and not value.is_initializer():
                selected.setdefault(value.name, value)
    shape = ir.Value(name=f"LinearReshape_{time.time()}",
                     const_value=ir.tensor(np.array([-1], np.int64)))
    model.graph.register_initializer(shape)
    for name, value in selected.items():
        node = ir.node("Reshape", [value, shape], name=f"{name}{_TENSOR_SAVE_POSTFIX}")
        out = node.outputs[0]
        out.name = f"{name}{_TENSOR_SAVE_POSTFIX}"
        out.type = ir.TensorType(value.dtype)  # type: ignore[arg-type]
        out.shape = ir.Shape([None])
        model.graph.append(node)
        model.graph.outputs.append(out)
    model.metadata_props[PAIRS_KEY] = json.dumps(pairs)
    model_io.save_model(model, entry.output, external_data=bool(save_as_external_data) or None)


def collect_activations(
    augmented_model: str | Path,
    input_reader: Any,
    session_options: onnxruntime.SessionOptions | None = None,
    execution_providers: Sequence[str] | None = None,
) -> ActivationDict:
    """Run the augmented model on every batch of ``input_reader`` (a reader, an iterable of
    feed dicts or a data folder) and return ``{tensor: [flattened array per batch]}``.

    Raises:
        RuntimeError: No batch was run (onnxruntime's contract).
    """
    if session_options is None:
        session_options = onnxruntime.SessionOptions()
        session_options.graph_optimization_level = \
            onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    providers = list(execution_providers or ["CPUExecutionProvider"])
    session = onnxruntime.InferenceSession(os.fspath(augmented_model), sess_options=session_options,
                                           providers=providers)
    meta = session.get_modelmeta().custom_metadata_map
    pairs = {k: (v[0], v[1]) for k, v in json.loads(meta.get(PAIRS_KEY, "{}")).items()}
    names = [o.name for o in session.get_outputs() if o.name.endswith(_TENSOR_SAVE_POSTFIX)]
    result = ActivationDict(pairs=pairs)
    for index, feed in enumerate(iter_feeds(input_reader)):
        try:
            values = session.run(names, dict(feed))
        except Exception as err:
            raise CalibrationError(f"onnxruntime failed on batch {index}: {err}") from err
        for name, value in zip(names, values, strict=True):
            result.setdefault(name[: -len(_TENSOR_SAVE_POSTFIX)], []).append(value)
    if not result and not names:
        raise RuntimeError("No data is collected while running augmented model!")
    if not any(result.values()):
        raise RuntimeError("No data is collected while running augmented model!")
    return result


def _by_suffix(activations: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """onnxruntime's naming rules, for activations collected without structure."""
    pairs: dict[str, tuple[str, str]] = {}
    for name in activations:
        if name.endswith(_QUANT_INPUT_SUFFIX):
            key = name[: -len(_QUANT_INPUT_SUFFIX)]
            pairs[key] = (name, key)
        for suffix in (_DEQUANT_OUTPUT_SUFFIX, _DEQUANT_OUTPUT_SUFFIX + "_1"):
            if name.endswith(suffix):
                key = name[: -len(suffix)]
                pairs[key] = (key, name)
    return pairs


def create_activation_matching(
    qdq_activations: dict[str, Sequence[np.ndarray]],
    float_activations: dict[str, Sequence[np.ndarray]] | None = None,
) -> dict[str, dict[str, Sequence[np.ndarray]]]:
    """``{activation: {"pre_qdq": [...], "post_qdq": [...], ["float": [...]]}}``: the values
    before and after each QuantizeLinear → DequantizeLinear pair, and the float model's."""
    pairs = getattr(qdq_activations, "pairs", None) or _by_suffix(qdq_activations)
    matched: dict[str, dict[str, Sequence[np.ndarray]]] = {}
    for key, (pre, post) in pairs.items():
        if pre in qdq_activations and post in qdq_activations:
            matched[key] = {"pre_qdq": qdq_activations[pre], "post_qdq": qdq_activations[post]}
    for key, values in matched.items():
        if float_activations and key in float_activations:
            values["float"] = float_activations[key]
    return matched


def create_weight_matching(float_model_path: str | Path, qdq_model_path: str | Path
                           ) -> dict[str, dict[str, np.ndarray]]:
    """``{float weight: {"float": array, "dequantized": array}}`` for every quantized weight
    of the quantized model (DequantizeLinear, QOperator and MatMulNBits forms); ``dequantized``
    is float64."""
    float_model, _ = front_door.open_model(float_model_path)
    quant_model, _ = front_door.open_model(qdq_model_path)
    matching = match_models(float_model, quant_model)
    result = {}
    for name, match in matching.weights.items():
        dtype = match.original.dtype if match.original.dtype.kind == "f" else np.float32
        reference = float_model.graph.initializers.get(name)
        original = reference.const_value.numpy() if reference is not None and \
            reference.const_value is not None else match.original.astype(dtype)
        # float64, as computed: rounding it to float32 moves the SQNR of high-precision
        # weights (int32 biases at 70-90 dB) by up to ~1e-3 dB.
        result[name] = {"float": original, "dequantized": match.dequantized}
    return result


def _flat(values: np.ndarray | Iterable[np.ndarray]) -> np.ndarray:
    """One flat float64 array of an array, a scalar or a list of them."""
    if isinstance(values, (np.ndarray, np.generic, int, float)):
        return np.asarray(values, np.float64).ravel()
    arrays = list(values)
    if not arrays:
        return np.zeros(0)
    return np.concatenate([np.asarray(a, np.float64).ravel() for a in arrays])


def compute_signal_to_quantization_noice_ratio(
    x: Sequence[np.ndarray] | np.ndarray, y: Sequence[np.ndarray] | np.ndarray
) -> float:
    """SQNR in dB of ``y`` against ``x`` (lists are concatenated):
    ``20·log10(max(‖x‖, eps) / max(‖x − y‖, eps))`` (the name keeps onnxruntime's spelling)."""
    left, right = _flat(x), _flat(y)
    eps = float(np.finfo(float).eps)
    norm = max(float(np.linalg.norm(left)), eps)
    noise = max(float(np.linalg.norm(left - right)), eps)
    return 20 * math.log10(norm / noise)


ErrorFunction = Callable[[Any, Any], float]


def compute_weight_error(
    weights_match: dict[str, dict[str, np.ndarray]],
    err_func: ErrorFunction = compute_signal_to_quantization_noice_ratio,
) -> dict[str, float]:
    """``{weight: err_func(float, dequantized)}``."""
    return {name: err_func(m["float"], m["dequantized"]) for name, m in weights_match.items()}


def compute_activation_error(
    activations_match: dict[str, dict[str, Sequence[np.ndarray]]],
    err_func: ErrorFunction = compute_signal_to_quantization_noice_ratio,
) -> dict[str, dict[str, float]]:
    """``{activation: {"qdq_err": err_func(pre_qdq, post_qdq), "xmodel_err":
    err_func(float, post_qdq)}}``; ``xmodel_err`` only where float values were matched."""
    result: dict[str, dict[str, float]] = {}
    for name, match in activations_match.items():
        errors = {"qdq_err": err_func(match["pre_qdq"], match["post_qdq"])}
        if "float" in match:
            errors["xmodel_err"] = err_func(match["float"], match["post_qdq"])
        result[name] = errors
    return result
