"""Capture the MatMul inputs GPTQ needs while running the float model, into Hessian accumulators:
the pieces one process (``calib``) and every Ray worker (``_ray``) run alike."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxquant.calibration.session import run_batch
from onnxquant.core.errors import CalibrationError
from onnxquant.core.model_io import clone_model
from onnxquant.weight_only._hessian import HessianAccumulator

__all__ = ["expose_activations", "capture", "accumulate"]


def expose_activations(model: ir.Model, names: Iterable[str]) -> tuple[ir.Model, list[str]]:
    """A copy of ``model`` (weights shared) that also outputs each activation in ``names``
    that is not a graph input, and the names of those outputs."""
    graph_inputs = {v.name for v in model.graph.inputs}
    exposed = [name for name in names if name not in graph_inputs]
    augmented = clone_model(model)
    values = _values_by_name(augmented.graph)
    existing = {v.name for v in augmented.graph.outputs}
    for name in exposed:
        if name not in existing:
            value = values[name]
            if value.type is None:
                value.type = ir.TensorType(ir.DataType.FLOAT)
            augmented.graph.outputs.append(value)
    return augmented, exposed


def capture(session: Any, names: Sequence[str], exposed: Sequence[str],
            items: Iterable[tuple[int, dict]], update: Callable[[str, np.ndarray], None]) -> int:
    """Run ``(index, feed)`` items through ``session`` (built over :func:`expose_activations`'
    model) and pass every activation in ``names`` to ``update``; returns how many feeds ran."""
    shown = set(exposed)
    fed = [name for name in names if name not in shown]
    samples = 0
    for index, feed in items:
        results = run_batch(session, list(exposed), feed, index)
        for name, array in zip(exposed, results, strict=True):
            update(name, array)
        del results
        for name in fed:
            update(name, feed[name])
        samples += 1
    return samples


def accumulate(activations: dict[str, int]
               ) -> tuple[dict[str, HessianAccumulator], Callable[[str, np.ndarray], None]]:
    """Empty accumulators for ``activations`` (name -> K), and the update that fills them
    (checking each activation's last dimension)."""
    accumulators = {name: HessianAccumulator(k) for name, k in activations.items()}

    def update(name: str, array: np.ndarray) -> None:
        if name in accumulators:
            _update(accumulators[name], name, array, activations[name])

    return accumulators, update


def _update(accumulator: HessianAccumulator, name: str, array: np.ndarray, k: int) -> None:
    array = np.asarray(array)
    if array.ndim == 0 or array.shape[-1] != k:
        raise CalibrationError(
            f"activation '{name}' has shape {list(array.shape)}; GPTQ expected its last "
            f"dimension to be K = {k}")
    accumulator.update(array)


def _values_by_name(graph: ir.Graph) -> dict[str, ir.Value]:
    values = {v.name: v for v in graph.inputs if v.name}
    for node in graph:
        values.update({v.name: v for v in node.outputs if v.name})
    return values
