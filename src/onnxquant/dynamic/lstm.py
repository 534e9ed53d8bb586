"""LSTM → DynamicQuantizeLSTM (com.microsoft) with int8/uint8 W and R.

DynamicQuantizeLSTM takes the ONNX LSTM inputs in the same order, with W and R transposed to
``[num_directions, input_size | hidden_size, 4*hidden_size]``, followed by
``W_scale, W_zero_point, R_scale, R_zero_point``: one value per direction (per tensor) or
``[num_directions, 4*hidden_size]`` (per output channel). The input X is quantized by the
kernel itself at run time. It has no ``layout`` attribute, so a batch-first LSTM
(``layout=1``) gets Transpose nodes around it.

What onnxruntime 1.32 (CPU) refuses (probed): W and R of different types; per-channel int8
weights with a non-zero zero point ("InputWeight zero point must be zero"); per-channel uint8
weights whose zero points differ between channels ("InputWeight point must be constant").
Per-channel weights are therefore symmetric (int8 zero point 0, uint8 128; also for uint8 when
``weight_symmetric`` is left at None); per-direction weights may be asymmetric, with any zero
point per direction, for int8 and uint8.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from onnxquant.core import numerics
from onnxquant.dynamic._contrib_common import (
    MS_DOMAIN,
    NameFn,
    constant_weight,
    float_input,
    input_name,
    quantized_initializers,
    replace_node,
    weight_type_ok,
)
from onnxquant.dynamic.config import DynamicQuantConfig

__all__ = ["rewrite_lstm"]

logger = logging.getLogger(__name__)

_KEPT_ATTRIBUTES = frozenset(
    {"activation_alpha", "activation_beta", "activations", "clip", "direction", "hidden_size",
     "input_forget"}
)


def _symmetric(config: DynamicQuantConfig) -> bool:
    """Weight symmetry; per-channel weights default to symmetric (onnxruntime needs it)."""
    if config.weight_symmetric is None:
        return config.weight_type.signed or config.per_channel
    return config.weight_symmetric


def _quantize(w: np.ndarray, config: DynamicQuantConfig, name: str
              ) -> tuple[numerics.QuantizedTensor, np.ndarray, tuple[int, ...]]:
    """Quantize an ONNX ``[dirs, 4H, K]`` weight; return it with its ``[dirs, K, 4H]`` data."""
    dirs, rows, cols = w.shape
    param_shape: tuple[int, ...]
    if config.per_channel:
        q = numerics.quantize_weight(
            w.reshape(dirs * rows, cols), config.weight_type, axis=0,
            symmetric=_symmetric(config), reduce_range=config.reduce_range, name=name)
        data, param_shape = q.data.reshape(dirs, rows, cols), (dirs, rows)
    else:
        q = numerics.quantize_weight(
            w, config.weight_type, axis=0, symmetric=_symmetric(config),
            reduce_range=config.reduce_range, name=name)
        data, param_shape = q.data, (dirs,)
    return q, np.ascontiguousarray(data.transpose(0, 2, 1)), param_shape


def _check(node: ir.Node, config: DynamicQuantConfig) -> str:
    unknown = set(node.attributes) - _KEPT_ATTRIBUTES - {"layout"}
    if unknown:
        return f"attribute(s) {sorted(unknown)} are not supported by DynamicQuantizeLSTM"
    if node.attributes.get_int("layout", 0) not in (0, 1):
        return f"layout={node.attributes.get_int('layout')} is not a valid LSTM layout"
    if len(node.inputs) < 3 or not float_input(node, 0):
        return "input X is not float32 (DynamicQuantizeLSTM takes float32 only)"
    reason = weight_type_ok(config.weight_type)
    if reason:
        return reason
    if config.per_channel and not _symmetric(config):
        return ("per-channel DynamicQuantizeLSTM weights need one zero point for all channels "
                "(onnxruntime); use symmetric weights or per_channel=False")
    return ""


def _transpose(unique_name: NameFn, value: ir.Value, perm: list[int],
               stem: str) -> tuple[ir.Node, ir.Value]:
    node = ir.node("Transpose", [value], {"perm": perm}, name=unique_name(f"{stem}_Transpose"))
    out = node.outputs[0]
    out.name = unique_name(f"{stem}_transposed")
    out.type = value.type
    return node, out


def rewrite_lstm(graph: ir.Graph, node: ir.Node, config: DynamicQuantConfig,
                 unique_name: NameFn) -> tuple[bool, str]:
    """Replace an ONNX LSTM by DynamicQuantizeLSTM with quantized W and R.

    Args:
        graph: The graph that holds ``node``; new initializers are added to it.
        node: The LSTM node.
        config: Weight type, per-channel, symmetry and reduce-range settings.
        unique_name: Returns an unused name for a stem.

    Returns:
        ``(True, note)`` after the rewrite, or ``(False, reason)`` with the graph untouched.
    """
    reason = _check(node, config)
    if reason:
        return False, reason
    w, reason = constant_weight(node, 1, "W")
    if w is None:
        return False, reason
    r, reason = constant_weight(node, 2, "R")
    if r is None:
        return False, reason
    if w.ndim != 3 or r.ndim != 3 or w.shape[:2] != r.shape[:2] or r.shape[1] != 4 * r.shape[2]:
        return False, f"W {w.shape} / R {r.shape} do not have LSTM shapes [dirs, 4H, K]"
    direction = node.attributes.get_string("direction", "forward")
    if w.shape[0] != (2 if direction == "bidirectional" else 1):
        return False, f"W has {w.shape[0]} direction(s) but direction is {direction!r}"
    stem = node.name or "lstm"
    w_name, r_name = input_name(node, 1, f"{stem}_W"), input_name(node, 2, f"{stem}_R")
    wq, w_data, w_param_shape = _quantize(w, config, w_name)
    rq, r_data, r_param_shape = _quantize(r, config, r_name)
    w_values = quantized_initializers(graph, unique_name, w_name, wq, w_data, w_param_shape)
    r_values = quantized_initializers(graph, unique_name, r_name, rq, r_data, r_param_shape)
    inputs: list[ir.Value | None] = list(node.inputs) + [None] * (8 - len(node.inputs))
    inputs[1], inputs[2] = w_values[0], r_values[0]
    batch_first = node.attributes.get_int("layout", 0) == 1
    new_nodes: list[ir.Node] = []
    if batch_first:  # X [B, S, K] -> [S, B, K]; initial_h/c [B, dirs, H] -> [dirs, B, H]
        for index in (0, 5, 6):
            value = inputs[index]
            if value is not None:
                t, inputs[index] = _transpose(unique_name, value, [1, 0, 2], f"{stem}_in{index}")
                new_nodes.append(t)
    attributes = [a for name, a in node.attributes.items() if name in _KEPT_ATTRIBUTES]
    lstm = ir.Node(
        MS_DOMAIN, "DynamicQuantizeLSTM",
        [*inputs, w_values[1], w_values[2], r_values[1], r_values[2]],
        attributes, num_outputs=len(node.outputs), name=unique_name(f"{stem}_quant"))
    new_nodes.append(lstm)
    outputs: list[ir.Value | None] = []
    for i, out in enumerate(node.outputs):
        if not out.uses() and not out.is_graph_output():
            outputs.append(None)  # unused output: no transpose, name dropped
            continue
        new = lstm.outputs[i]
        if batch_first:  # Y [S,dirs,B,H] -> [B,S,dirs,H]; Y_h/Y_c [dirs,B,H] -> [B,dirs,H]
            new.name = unique_name(f"{out.name or stem}_seq_first")
            perm = [2, 0, 1, 3] if i == 0 else [1, 0, 2]
            t, new = _transpose(unique_name, new, perm, f"{stem}_out{i}")
            new_nodes.append(t)
        outputs.append(new)
    replace_node(graph, node, new_nodes, outputs)
    graph.opset_imports.setdefault(MS_DOMAIN, 1)
    granularity = "per channel" if config.per_channel else "per direction"
    note = f"DynamicQuantizeLSTM, {config.weight_type} W/R {granularity}"
    if batch_first:
        note += ", layout=1 via Transpose"
    logger.debug("%s: %s", node.name, note)
    return True, note
