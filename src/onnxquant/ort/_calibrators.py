"""onnxruntime's calibrator classes, over onnxquant's calibration machinery.

MinMax's augmented model has onnxruntime's ``<t>_ReduceMin``/``<t>_ReduceMax`` outputs
(:mod:`onnxquant.ort._minmax_augment`); the histogram calibrators' augmented model comes from
:func:`onnxquant.calibration.augment.expose_tensors`. Feeds are read and validated by
:func:`onnxquant.calibration.runner.calibration_feeds`, and histogram statistics are kept in
streaming observers, so memory does not grow with the number of batches (onnxruntime keeps every
activation of a ``collect_data`` call in RAM).

Differences from onnxruntime, on purpose:

* Histograms are onnxquant's exactly mergeable power-of-two histograms with at most ``num_bins``
  bins (their edges differ from onnxruntime's ``np.histogram`` edges), so Entropy and Percentile
  thresholds agree with onnxruntime's to within a bin, not bit for bit. Distribution's
  ``avg``/``std`` (scenario ``"same"``) are the exact moments of the values, not those of the bin
  centres.
* ``max_intermediate_outputs=N`` folds every N batches into the ranges instead of discarding
  them (onnxruntime drops all but the last ``n mod N`` batches).
"""

from __future__ import annotations

import itertools
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from onnxquant.calibration.augment import expose_tensors
from onnxquant.calibration.runner import calibration_feeds
from onnxquant.calibration.session import input_specs, run_batch, update_observers
from onnxquant.core.errors import CalibrationError
from onnxquant.ort._calib_enum import CalibrationMethod
from onnxquant.ort._minmax_augment import add_reduce_outputs
from onnxquant.ort._tensors_data import TensorData, TensorsData

__all__ = ["CalibraterBase", "MinMaxCalibrater"]

logger = logging.getLogger(__name__)

_CALIBRATED_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}


def _load(model_path: Any) -> onnx.ModelProto:
    from onnxquant.ort.quant_utils import load_model_with_shape_infer

    if isinstance(model_path, onnx.ModelProto):
        return onnx.shape_inference.infer_shapes(model_path)
    if isinstance(model_path, (str, os.PathLike)):
        return load_model_with_shape_infer(Path(model_path))
    raise ValueError(f"model_path must be a path or an onnx.ModelProto, got {type(model_path)}")


class CalibraterBase:
    """Base of the calibrators: tensor selection, augmented model, inference session.

    Args:
        model_path: Path of the float model (or an ``onnx.ModelProto``); shape inference runs.
        op_types_to_calibrate: Calibrate inputs/outputs of these op types (all when empty).
        augmented_model_path: Where :meth:`augment_graph` saves the augmented model.
        symmetric: Report ranges symmetric around 0.
        use_external_data_format: Save the augmented model's weights as external data.
        per_channel: MinMax only: ranges per index of axis 1.
    """

    def __init__(self, model_path: Any, op_types_to_calibrate: Any = None,
                 augmented_model_path: str | os.PathLike = "augmented_model.onnx",
                 symmetric: bool = False, use_external_data_format: bool = False,
                 per_channel: bool = False) -> None:
        self.model = _load(model_path)
        self.op_types_to_calibrate = op_types_to_calibrate
        self.augmented_model_path = augmented_model_path
        self.symmetric = symmetric
        self.use_external_data_format = use_external_data_format
        self.per_channel = per_channel
        self.augment_model: onnx.ModelProto | None = None
        self.infer_session: ort.InferenceSession | None = None
        self.execution_providers = ["CPUExecutionProvider"]
        self._ir_model = ir.from_proto(self.model)
        self._outputs: dict[str, tuple[str, str]] = {}
        self._observers: dict[str, Any] = {}

    def set_execution_providers(self, execution_providers: Any = None) -> None:
        """Use these providers and (re)create the session."""
        self.execution_providers = list(execution_providers or ["CPUExecutionProvider"])
        self.create_inference_session()

    def create_inference_session(self) -> None:
        """An onnxruntime session over the saved augmented model (graph optimizations off)."""
        if self.augment_model is None:
            raise CalibrationError("call augment_graph() before create_inference_session()")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.log_severity_level = 3  # the augmentation's unused helper initializers
        self.infer_session = ort.InferenceSession(
            str(self.augmented_model_path), sess_options=options,
            providers=self.execution_providers)

    def select_tensors_to_calibrate(self, model: onnx.ModelProto
                                    ) -> tuple[set[str], dict[str, onnx.ValueInfoProto]]:
        """Float/float16 non-initializer inputs and outputs of the selected nodes that have
        type information; returns ``(names, value_infos)`` as onnxruntime does."""
        value_infos = {vi.name: vi for vi in model.graph.value_info}
        value_infos.update({vi.name: vi for vi in model.graph.output})
        value_infos.update({vi.name: vi for vi in model.graph.input})
        initializers = {init.name for init in model.graph.initializer}
        selected: set[str] = set()
        for node in model.graph.node:
            if self.op_types_to_calibrate and node.op_type not in self.op_types_to_calibrate:
                continue
            for name in itertools.chain(node.input, node.output):
                vi = value_infos.get(name)
                if (vi is not None and vi.type.HasField("tensor_type")
                        and vi.type.tensor_type.elem_type in _CALIBRATED_TYPES
                        and name not in initializers):
                    selected.add(name)
        return selected, value_infos

    def get_augment_model(self) -> onnx.ModelProto:
        """The augmented model (after :meth:`augment_graph`)."""
        if self.augment_model is None:
            raise CalibrationError("call augment_graph() first")
        return self.augment_model

    def _wants_values(self) -> bool:
        return True

    def augment_graph(self) -> None:
        """Add outputs carrying the selected tensors' statistics; save the model to
        ``augmented_model_path``."""
        names, _ = self.select_tensors_to_calibrate(self.model)
        augmented = ir.from_proto(self.model)
        self._outputs = expose_tensors(augmented, sorted(names), values=self._wants_values())
        self.augment_model = ir.to_proto(augmented)
        self._save_augmented()

    def _save_augmented(self) -> None:
        """Write :attr:`augment_model` to ``augmented_model_path``."""
        assert self.augment_model is not None
        path = Path(self.augmented_model_path)
        onnx.save(self.augment_model, str(path),
                  save_as_external_data=self.use_external_data_format,
                  location=path.name + ".data" if self.use_external_data_format else None)

    def _new_observer(self, kind: str) -> Any:
        """The observer a subclass keeps per exposed tensor (abstract, as in onnxruntime)."""
        raise NotImplementedError(f"{type(self).__name__} does not define its observers; "
                                  "use MinMaxCalibrater or a histogram calibrator")

    def collect_data(self, data_reader: Any) -> None:
        """Run every feed of ``data_reader`` and fold its statistics in.

        Raises:
            CalibrationError: No session yet, or the reader gave no feeds and nothing was
                collected before.
        """
        if self.infer_session is None:
            raise CalibrationError("call augment_graph() and create_inference_session() first")
        specs, optional = input_specs(self._ir_model)
        names = self._fetched_outputs()
        batches = 0
        for index, feed in enumerate(calibration_feeds(data_reader, specs, optional, None)):
            results = run_batch(self.infer_session, names, feed, index)
            self._update(dict(zip(names, results, strict=True)))
            batches += 1
            self._after_batch()
        if batches == 0 and not self._has_data():
            raise CalibrationError("No data is collected: the data reader gave no feeds.")
        self._end_collection()

    def _fetched_outputs(self) -> list[str]:
        """The augmented model's outputs that one batch fetches."""
        return [self._outputs[key][0] for key in self._outputs]

    def _update(self, results: dict[str, Any]) -> None:
        """Fold one batch's fetched outputs (by output name) into the observers."""
        keys = list(self._outputs)
        for key in keys:
            if key not in self._observers:
                self._observers[key] = self._new_observer(self._outputs[key][1])
        update_observers(self._observers, keys, [results[self._outputs[k][0]] for k in keys])

    def _after_batch(self) -> None:
        pass

    def _end_collection(self) -> None:
        pass

    def _has_data(self) -> bool:
        return bool(self._observers)

    def clear_collected_data(self) -> None:
        """Forget the statistics collected since the last fold."""
        self._observers = {}

    def compute_data(self) -> TensorsData:
        """The calibrated statistics per tensor (abstract: each calibrator defines it, as in
        onnxruntime's CalibraterBase)."""
        raise NotImplementedError(f"{type(self).__name__} does not compute ranges; use "
                                  "MinMaxCalibrater or a histogram calibrator")


class _BatchRanges:
    """(min, max) of each batch: one value each, or one per channel (index of axis 1)."""

    def __init__(self) -> None:
        self.lows: list[np.ndarray] = []
        self.highs: list[np.ndarray] = []

    def update(self, low: np.ndarray, high: np.ndarray) -> None:
        """Keep one batch's reduced min and max (an empty tensor's ``(+inf, -inf)`` is no
        data)."""
        low = np.asarray(low, np.float32).reshape(-1)
        high = np.asarray(high, np.float32).reshape(-1)
        if low.size == 0 or (np.all(low == np.inf) and np.all(high == -np.inf)):
            return
        self.lows.append(low)
        self.highs.append(high)


class MinMaxCalibrater(CalibraterBase):
    """Ranges from the observed minimum and maximum, as onnxruntime defines them.

    Within one :meth:`collect_data` call the range is ``(nanmin, nanmax)`` of the per-batch
    ranges, or with ``moving_average`` their ``nanmean``; successive calls (or every
    ``max_intermediate_outputs`` batches) are merged by min/max, or with ``moving_average`` by
    ``old + averaging_constant * (new - old)``.
    """

    def __init__(self, model_path: Any, op_types_to_calibrate: Any = None,
                 augmented_model_path: str | os.PathLike = "augmented_model.onnx",
                 symmetric: bool = False, use_external_data_format: bool = False,
                 moving_average: bool = False, averaging_constant: float = 0.01,
                 max_intermediate_outputs: int | None = None,
                 per_channel: bool = False) -> None:
        super().__init__(model_path, op_types_to_calibrate, augmented_model_path, symmetric,
                         use_external_data_format, per_channel)
        if moving_average and not 0 <= averaging_constant <= 1:
            raise ValueError(f"Invalid averaging constant {averaging_constant}, which should "
                             "be in [0, 1].")
        if max_intermediate_outputs is not None and max_intermediate_outputs <= 0:
            raise ValueError("max_intermediate_outputs must be a positive integer or None")
        self.moving_average = moving_average
        self.averaging_constant = averaging_constant
        self.max_intermediate_outputs = max_intermediate_outputs
        self.calibrate_tensors_range: TensorsData | None = None
        self._reduced: dict[str, tuple[str, str]] = {}
        self._pending = 0

    def augment_graph(self) -> None:
        """Add ``<t>_ReduceMin``/``<t>_ReduceMax`` outputs for the selected tensors (as
        onnxruntime names them); save the model to ``augmented_model_path``."""
        names, value_infos = self.select_tensors_to_calibrate(self.model)
        augmented = onnx.ModelProto()
        augmented.CopyFrom(self.model)
        self._reduced = add_reduce_outputs(augmented, sorted(names), value_infos,
                                           per_channel=self.per_channel)
        self.augment_model = augmented
        self._save_augmented()

    def _fetched_outputs(self) -> list[str]:
        return [output for pair in self._reduced.values() for output in pair]

    def _update(self, results: dict[str, Any]) -> None:
        for tensor, (low, high) in self._reduced.items():
            self._observers.setdefault(tensor, _BatchRanges()).update(results[low], results[high])

    def _after_batch(self) -> None:
        self._pending += 1
        if self.max_intermediate_outputs and self._pending >= self.max_intermediate_outputs:
            self._fold()

    def _end_collection(self) -> None:
        self._fold()

    def _has_data(self) -> bool:
        return bool(self._observers) or self.calibrate_tensors_range is not None

    def clear_collected_data(self) -> None:
        super().clear_collected_data()
        self._pending = 0

    def _fold(self) -> None:
        new = self._ranges_of_batches()
        if new:
            old = self.calibrate_tensors_range
            merged = {k: self._merge(old.data.get(k) if old else None, v) for k, v in new.items()}
            if old is not None:
                merged = {**{k: old[k].range_value for k in old if k not in merged}, **merged}
            self.calibrate_tensors_range = TensorsData(CalibrationMethod.MinMax, merged)
        self.clear_collected_data()

    def _ranges_of_batches(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        ranges = {}
        for name, obs in self._observers.items():
            if not obs.lows:
                continue
            lows, highs = np.stack(obs.lows), np.stack(obs.highs)
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN tensors stay NaN
                if self.moving_average:
                    low, high = np.nanmean(lows, axis=0), np.nanmean(highs, axis=0)
                else:
                    low, high = np.nanmin(lows, axis=0), np.nanmax(highs, axis=0)
            if self.symmetric:
                m = np.nanmax([np.abs(low), np.abs(high)], axis=0)
                low, high = -m, m
            ranges[name] = (low.astype(np.float32), high.astype(np.float32))
        return ranges

    def _merge(self, old: TensorData | None, new: tuple[np.ndarray, np.ndarray]
               ) -> tuple[np.ndarray, np.ndarray]:
        if old is None:
            return new
        old_low, old_high = old.range_value
        if self.moving_average:
            c = np.float32(self.averaging_constant)
            return old_low + c * (new[0] - old_low), old_high + c * (new[1] - old_high)
        return np.minimum(old_low, new[0]), np.maximum(old_high, new[1])

    def compute_data(self) -> TensorsData:
        """Ranges per tensor: ``lowest``/``highest`` float32 arrays of shape ``(1,)`` (or
        ``(channels,)`` per channel).

        Raises:
            CalibrationError: Nothing was collected.
        """
        if self._observers:
            self._fold()
        if self.calibrate_tensors_range is None:
            raise CalibrationError("No data is collected: call collect_data(reader) first.")
        return self.calibrate_tensors_range
