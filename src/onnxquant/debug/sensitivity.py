"""How much the output SQNR rises when quantized layers go back to float: one layer at a time
for the most suspicious layers, and every layer of one op type at once.

Each variant is the quantized model's protobuf with :mod:`onnxquant.debug.float_layer` edits,
run with onnxruntime's default optimizations on the kept samples, against the unedited model
on the same samples (the mean over outputs of the SQNR in dB, each capped at 200 dB).
"""

from __future__ import annotations

import collections
import logging
import math
from collections.abc import Sequence

import numpy as np
import onnx
import onnx_ir as ir
from tqdm import tqdm

from onnxquant.core.errors import CalibrationError
from onnxquant.core.metrics import ErrorAccumulator
from onnxquant.debug._runs import Sessions
from onnxquant.debug.float_layer import LayerEdit, apply_edits, float_layer_edit
from onnxquant.debug.matching import Matching

__all__ = ["Sensitivity", "measure_sensitivity", "MAX_OP_TYPES"]

logger = logging.getLogger(__name__)

MAX_OP_TYPES = 6
"""Op types (the most frequent among the quantized layers) measured as a group."""

Kept = Sequence[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]


class Sensitivity:
    """Output SQNR gains (dB): ``layers`` by layer index, ``op_types`` by op type."""

    def __init__(self) -> None:
        self.layers: dict[int, float] = {}
        self.op_types: dict[str, float] = {}


def _mean_sqnr(session, kept: Kept, output_names: list[str]) -> float:
    accs = {name: ErrorAccumulator() for name in output_names}
    for feed, reference in kept:
        results = session.run(output_names, feed)
        for name, value in zip(output_names, results, strict=True):
            accs[name].update(reference[name], value)
    values = [min(acc.sqnr_db, 200.0) for acc in accs.values()]
    return float(np.mean(values)) if values else math.nan


class _Runner:
    def __init__(self, sessions: Sessions, kept: Kept, quant_ir: ir.Model) -> None:
        self.sessions = sessions
        self.kept = kept
        self.names = sessions.output_names
        self.proto: onnx.ModelProto = ir.serde.serialize_model(quant_ir)
        self.baseline = _mean_sqnr(sessions.plain, kept, self.names)

    def gain(self, edits: list[LayerEdit], tag: str) -> float | None:
        try:
            session = self.sessions.from_proto(apply_edits(self.proto, edits), tag)
        except CalibrationError as err:
            logger.warning("could not run %s in float: %s", tag, err)
            return None
        return _mean_sqnr(session, self.kept, self.names) - self.baseline


def measure_sensitivity(matching: Matching, quant_ir: ir.Model, sessions: Sessions, kept: Kept,
                        ranked: list[int], *, layers: int, op_types: int = MAX_OP_TYPES,
                        progress: bool = False) -> Sensitivity:
    """Gains of keeping each of the first ``layers`` of ``ranked`` (layer indices, most
    suspicious first) float, and of keeping every layer of each of the ``op_types`` most
    frequent op types float."""
    result = Sensitivity()
    if not kept or not (layers or op_types):
        return result
    runner = _Runner(sessions, kept, quant_ir)
    edits: dict[int, LayerEdit] = {}
    for i, layer in enumerate(matching.layers):
        edit = float_layer_edit(quant_ir, matching, layer.layer.node.name or "")
        if edit is not None:
            edits[i] = edit
    chosen = [i for i in ranked if i in edits][:layers]
    groups = collections.defaultdict(list)
    for i in edits:
        groups[matching.layers[i].op_type].append(i)
    frequent = sorted(groups, key=lambda op: -len(groups[op]))[:op_types]
    steps = [(f"layer {matching.layers[i].name}", [i]) for i in chosen]
    steps += [(f"every {op}", groups[op]) for op in frequent]
    for tag, members in tqdm(steps, desc="sensitivity", unit="variant", disable=not progress):
        gain = runner.gain([edits[i] for i in members], tag)
        if gain is None:
            continue
        if tag.startswith("layer "):
            result.layers[members[0]] = gain
        else:
            result.op_types[tag[len("every "):]] = gain
    return result
