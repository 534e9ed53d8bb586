"""onnxruntime's ``matmul_4bits_quantizer`` / ``matmul_nbits_quantizer`` API over
:mod:`onnxquant.weight_only`.

``MatMul4BitsQuantizer(model, algo_config=DefaultWeightOnlyQuantConfig(...)).process()`` and
``.model.save_model_to_file(path, True)`` work as in onnxruntime; the configs keep their names,
arguments and attributes. Every option is translated into one
:class:`~onnxquant.weight_only.config.WeightOnlyConfig` by :func:`native_config`.

Differences from onnxruntime, on purpose:

* ``DEFAULT`` and ``RTN`` are the same round-to-nearest numerics (onnxquant's); RTN uses the
  quantizer's ``block_size``/``is_symmetric`` and ``customized_weight_config`` (bits, group_size,
  scheme; ``"fp32"`` keeps a node float) like onnxruntime.
* HQQ and GPTQ need no torch. GPTQ's own ``block_size`` (a column batch that only changes
  speed) is ignored; its group size is the quantizer's ``block_size``; the quantized grid is
  GPTQ's own (onnxruntime re-quantizes GPTQ's output with a different grid).
* QDQ format converts the model to opset 21 with the ONNX version converter instead of only
  relabelling the opset; channel-wise blocks also work in QOperator format (one block per
  column, block size = next power of two >= K).
* Not supported (raise :class:`~onnxquant.ort._errors.UnsupportedConfigError`): ``ratios``
  (RTN clip ratios), GPTQ ``mse=True`` / ``perchannel=False``, HQQ ``axis`` other than 1,
  k-quant and NVIDIA AWQ configs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from onnxquant.core import front_door, model_io
from onnxquant.ort._errors import InvalidOptionError, UnsupportedConfigError
from onnxquant.ort.quant_utils import QuantFormat
from onnxquant.static.config import QuantFormat as NativeFormat
from onnxquant.weight_only.api import WeightOnlyResult, quantize_model_weights, quantize_weights
from onnxquant.weight_only.config import (
    GPTQSettings,
    WeightOnlyAlgorithm,
    WeightOnlyConfig,
)

__all__ = [
    "WeightOnlyQuantConfig",
    "DefaultWeightOnlyQuantConfig",
    "RTNWeightOnlyQuantConfig",
    "HQQWeightOnlyQuantConfig",
    "GPTQWeightOnlyQuantConfig",
    "MatMulNBitsQuantizer",
    "MatMul4BitsQuantizer",
    "native_config",
    "is_weight_only_config",
    "quantize_weight_only",
]

logger = logging.getLogger(__name__)


def _op_types(op_types: Iterable[str] | None) -> set[str]:
    return set(op_types) if op_types else {"MatMul"}


def _axes(quant_axes: Iterable[tuple[str, int]] | Mapping[str, int] | None) -> dict[str, int]:
    axes = {"MatMul": 0, "Gather": 1}
    if quant_axes:
        axes.update(dict(quant_axes))
    return axes


class WeightOnlyQuantConfig:
    """Base of the weight-only configs (onnxruntime's attribute names)."""

    def __init__(self, algorithm: str, quant_format: QuantFormat = QuantFormat.QOperator,
                 op_types_to_quantize: Iterable[str] | None = None,
                 quant_axes: Iterable[tuple[str, int]] | Mapping[str, int] | None = None,
                 customized_weight_config: Mapping[str, Any] | None = None) -> None:
        self.algorithm = algorithm
        self.quant_format = quant_format
        self.op_types_to_quantize = _op_types(op_types_to_quantize)
        self.quant_axes = _axes(quant_axes)
        self.customized_weight_config = dict(customized_weight_config or {})


class DefaultWeightOnlyQuantConfig(WeightOnlyQuantConfig):
    """Round-to-nearest blocks (onnxruntime's ``DEFAULT``)."""

    def __init__(self, block_size: int = 128, is_symmetric: bool = False,
                 accuracy_level: int | None = None,
                 quant_format: QuantFormat = QuantFormat.QOperator,
                 op_types_to_quantize: Iterable[str] | None = None,
                 quant_axes: Iterable[tuple[str, int]] | Mapping[str, int] | None = None,
                 bits: int = 4, channel_wised_quantize: bool = False) -> None:
        super().__init__("DEFAULT", quant_format, op_types_to_quantize, quant_axes)
        if bits not in (2, 4, 8):
            raise InvalidOptionError(f"bits must be 2, 4 or 8, got {bits!r}")
        self.block_size = block_size
        self.is_symmetric = is_symmetric
        self.bits = bits
        self.accuracy_level = accuracy_level
        self.channel_wised_quantize = channel_wised_quantize


class RTNWeightOnlyQuantConfig(WeightOnlyQuantConfig):
    """Round-to-nearest with per-node settings (onnxruntime's ``RTN``)."""

    def __init__(self, ratios: Mapping[str, float] | None = None,
                 quant_format: QuantFormat = QuantFormat.QOperator,
                 op_types_to_quantize: Iterable[str] | None = None,
                 customized_weight_config: Mapping[str, Any] | None = None) -> None:
        super().__init__("RTN", quant_format, op_types_to_quantize,
                         customized_weight_config=customized_weight_config)
        self.ratios = dict(ratios or {})


class HQQWeightOnlyQuantConfig(WeightOnlyQuantConfig):
    """Half-quadratic quantization of the zero points (onnxruntime's ``HQQ``; no torch)."""

    def __init__(self, block_size: int = 128, bits: int = 4, axis: int = 1,
                 quant_format: QuantFormat = QuantFormat.QOperator,
                 op_types_to_quantize: Iterable[str] | None = None,
                 quant_axes: Iterable[tuple[str, int]] | Mapping[str, int] | None = None) -> None:
        super().__init__("HQQ", quant_format, op_types_to_quantize, quant_axes)
        self.block_size = block_size
        self.bits = bits
        self.axis = axis


class GPTQWeightOnlyQuantConfig(WeightOnlyQuantConfig):
    """GPTQ with calibration data (onnxruntime's ``GPTQ``; no torch)."""

    def __init__(self, calibration_data_reader: Any = None, percdamp: float = 0.01,
                 block_size: int = 128, actorder: bool = False, mse: bool = False,
                 perchannel: bool = True, quant_format: QuantFormat = QuantFormat.QOperator,
                 op_types_to_quantize: Iterable[str] | None = None) -> None:
        super().__init__("GPTQ", quant_format, op_types_to_quantize)
        self.calibration_data_reader = calibration_data_reader
        self.percdamp = percdamp
        self.block_size = block_size
        self.actorder = actorder
        self.mse = mse
        self.perchannel = perchannel


def _format(fmt: Any) -> NativeFormat:
    name = getattr(fmt, "name", str(fmt)).lower()
    if name in ("qoperator", "0"):
        return NativeFormat.QOPERATOR
    if name in ("qdq", "1"):
        return NativeFormat.QDQ
    raise InvalidOptionError(f"unknown quant_format {fmt!r}; use QuantFormat.QOperator or QDQ")


def _customized(custom: Mapping[str, Any]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """onnxruntime's ``customized_weight_config`` as overrides and excluded names."""
    overrides: dict[str, dict[str, Any]] = {}
    excluded = []
    for name, spec in custom.items():
        if spec == "fp32" or (isinstance(spec, Mapping) and spec.get("bits") == 32):
            excluded.append(name)
            continue
        if not isinstance(spec, Mapping):
            raise InvalidOptionError(f"customized_weight_config[{name!r}] must be a dict or "
                                     f"'fp32', got {spec!r}")
        override: dict[str, Any] = {}
        if "bits" in spec:
            override["bits"] = int(spec["bits"])
        if "group_size" in spec:
            group = int(spec["group_size"])
            override["block_size"] = None if group == -1 else group
        if "scheme" in spec:
            override["symmetric"] = spec["scheme"] == "sym"
        overrides[name] = override
    return overrides, excluded


def native_config(
    algo_config: Any, *, block_size: int = 128, is_symmetric: bool = False,
    accuracy_level: int | None = None, nodes_to_exclude: Collection[str] | None = None,
    nodes_to_include: Collection[str] | None = None, model: ir.Model | None = None,
    external_data: bool | None = None,
) -> tuple[WeightOnlyConfig, Any]:
    """Translate an onnxruntime weight-only config (this module's or onnxruntime's own) and
    the quantizer's arguments into ``(WeightOnlyConfig, calibration reader or None)``.

    onnxruntime quantizes a node when its name is in ``nodes_to_include`` *or* its op type is
    selected; with a ``model`` that union is turned into an explicit node list.
    """
    algorithm = str(getattr(algo_config, "algorithm", "DEFAULT")).upper()
    fmt = _format(getattr(algo_config, "quant_format", QuantFormat.QOperator))
    op_types = set(getattr(algo_config, "op_types_to_quantize", None) or {"MatMul"})
    axes = _axes(getattr(algo_config, "quant_axes", None))
    overrides, excluded = _customized(getattr(algo_config, "customized_weight_config", {}) or {})
    data = None
    fields: dict[str, Any] = {}
    if algorithm == "DEFAULT":
        channel_wise = getattr(algo_config, "channel_wised_quantize", False)
        fields = dict(bits=algo_config.bits, symmetric=bool(algo_config.is_symmetric),
                      block_size=None if channel_wise else algo_config.block_size,
                      accuracy_level=algo_config.accuracy_level or accuracy_level)
    elif algorithm == "RTN":
        if getattr(algo_config, "ratios", None):
            raise UnsupportedConfigError("RTN clip ratios are not supported; remove `ratios`")
        fields = dict(bits=4, block_size=block_size, symmetric=bool(is_symmetric),
                      accuracy_level=accuracy_level)
    elif algorithm == "HQQ":
        if getattr(algo_config, "axis", 1) != 1:
            raise UnsupportedConfigError("HQQ quantizes along K only (axis=1)")
        fields = dict(bits=algo_config.bits, block_size=algo_config.block_size, symmetric=False,
                      algorithm=WeightOnlyAlgorithm.HQQ, accuracy_level=accuracy_level)
    elif algorithm == "GPTQ":
        if getattr(algo_config, "mse", False) or not getattr(algo_config, "perchannel", True):
            raise UnsupportedConfigError("GPTQ mse=True and perchannel=False are not supported")
        data = algo_config.calibration_data_reader
        fields = dict(bits=4, block_size=block_size, symmetric=bool(is_symmetric),
                      algorithm=WeightOnlyAlgorithm.GPTQ, accuracy_level=accuracy_level,
                      gptq=GPTQSettings(percdamp=algo_config.percdamp,
                                        act_order=bool(algo_config.actorder)))
    else:
        raise UnsupportedConfigError(
            f"weight-only algorithm {algorithm!r} is not supported; use DEFAULT, RTN, HQQ or "
            "GPTQ")
    include = None
    if nodes_to_include:
        names = set(nodes_to_include)
        if model is not None:
            from onnxquant.core.graph import iter_nodes

            names |= {n.name or "" for n in iter_nodes(model) if n.op_type in op_types}
        include = sorted(names)
    if axes.get("MatMul", 0) != 0:
        raise UnsupportedConfigError(
            f"quant_axes MatMul={axes['MatMul']}: MatMul weights are blocked along K (axis 0)")
    config = WeightOnlyConfig(
        format=fmt, op_types=tuple(sorted(op_types)), quant_axes={"Gather": axes["Gather"]},
        nodes_to_include=include, nodes_to_exclude=tuple(nodes_to_exclude or ()) + tuple(excluded),
        overrides=overrides, external_data=external_data, evaluate=False,
        reshape_unit_dims=True, **fields)
    return config, data


class _Model:
    """The ``.model`` of a quantizer, like onnxruntime's ``ONNXModel``: ``.model``
    (ModelProto), ``opset_import()``, ``graph()``, ``nodes()``, ``initializer()`` and
    ``save_model_to_file``."""

    def __init__(self, model: ir.Model, source: front_door.ModelSource) -> None:
        self._ir = model
        self._proto: onnx.ModelProto | None = None
        self._source = source

    def _set(self, model: ir.Model) -> None:
        self._ir, self._proto = model, None

    @property
    def model(self) -> onnx.ModelProto:
        """The model as an ``onnx.ModelProto`` (changes to it are saved)."""
        if self._proto is None:
            self._proto = ir.serde.serialize_model(self._ir)
        return self._proto

    def opset_import(self) -> Any:
        """The model's opset imports (``ONNXModel.opset_import()``)."""
        return self.model.opset_import

    def graph(self) -> onnx.GraphProto:
        """The main graph (``ONNXModel.graph()``)."""
        return self.model.graph

    def nodes(self) -> Any:
        """The main graph's nodes (``ONNXModel.nodes()``)."""
        return self.model.graph.node

    def initializer(self) -> Any:
        """The main graph's initializers (``ONNXModel.initializer()``)."""
        return self.model.graph.initializer

    def save_model_to_file(self, output_path: str | os.PathLike,
                           use_external_data_format: bool = False) -> list[Path]:
        """Save atomically; ``use_external_data_format`` puts tensors in ``<name>.data``
        (False: decide by size). Returns the paths written."""
        model = ir.serde.deserialize_model(self._proto) if self._proto is not None else self._ir
        output = front_door.check_output(self._source.path, output_path)
        front_door.check_output_files(output, self._source)
        return model_io.save_model(model, output,
                                   external_data=True if use_external_data_format else None)


class MatMulNBitsQuantizer:
    """Quantize MatMul (and Gather) weights to 2/4/8-bit blocks, onnxruntime's signature.

    Args:
        model: ``onnx.ModelProto`` or a path (external data stays memory-light).
        bits: Bits per weight (DEFAULT config built from these arguments).
        block_size: Block size (also the group size of RTN and GPTQ configs).
        is_symmetric: Symmetric blocks (also for RTN and GPTQ configs).
        accuracy_level: MatMulNBits accuracy level.
        nodes_to_exclude: Node names kept float.
        nodes_to_include: Node names quantized in addition to the selected op types.
        quant_format: ``QuantFormat.QOperator`` (MatMulNBits) or ``QDQ``.
        op_types_to_quantize: Op types (``MatMul``, ``Gather``).
        quant_axes: ``(("MatMul", 0), ("Gather", 1))`` style axes.
        channel_wised_quantize: One block per output column.
        algo_config: A weight-only config; None builds a DEFAULT one from the arguments.
    """

    def __init__(self, model: onnx.ModelProto | str | os.PathLike, bits: int = 4,
                 block_size: int = 128, is_symmetric: bool = False,
                 accuracy_level: int | None = None,
                 nodes_to_exclude: Collection[str] | None = None,
                 nodes_to_include: Collection[str] | None = None,
                 quant_format: QuantFormat = QuantFormat.QOperator,
                 op_types_to_quantize: Iterable[str] | None = None,
                 quant_axes: Iterable[tuple[str, int]] | Mapping[str, int] | None = None,
                 channel_wised_quantize: bool = False, algo_config: Any = None) -> None:
        self.model = _Model(*front_door.open_model(model))
        self.bits = bits
        self.block_size = block_size
        self.is_symmetric = is_symmetric
        self.accuracy_level = accuracy_level
        self.nodes_to_exclude = set(nodes_to_exclude or ())
        self.nodes_to_include = list(nodes_to_include or ())
        if algo_config is None:
            algo_config = DefaultWeightOnlyQuantConfig(
                block_size=block_size, is_symmetric=is_symmetric, accuracy_level=accuracy_level,
                quant_format=quant_format, op_types_to_quantize=op_types_to_quantize,
                quant_axes=quant_axes, bits=bits, channel_wised_quantize=channel_wised_quantize)
        self.algo_config = algo_config
        self.result: list = []

    def process(self) -> None:
        """Quantize the model in memory (``self.model``); decisions go to ``self.result``."""
        config, data = native_config(
            self.algo_config, block_size=self.block_size, is_symmetric=self.is_symmetric,
            accuracy_level=self.accuracy_level, nodes_to_exclude=self.nodes_to_exclude,
            nodes_to_include=self.nodes_to_include, model=self.model._ir)
        model, self.result, _ = quantize_model_weights(self.model._ir, config, data)
        self.model._set(model)


class MatMul4BitsQuantizer(MatMulNBitsQuantizer):
    """The older 4-bit name, with its argument order (no ``bits``)."""

    def __init__(self, model: onnx.ModelProto | str | os.PathLike, block_size: int = 128,
                 is_symmetric: bool = False, accuracy_level: int | None = None,
                 nodes_to_exclude: Collection[str] | None = None,
                 nodes_to_include: Collection[str] | None = None,
                 quant_format: QuantFormat = QuantFormat.QOperator,
                 op_types_to_quantize: Iterable[str] | None = None,
                 quant_axes: Iterable[tuple[str, int]] | Mapping[str, int] | None = None,
                 algo_config: Any = None) -> None:
        super().__init__(model, 4, block_size, is_symmetric, accuracy_level, nodes_to_exclude,
                         nodes_to_include, quant_format, op_types_to_quantize, quant_axes,
                         algo_config=algo_config)


def is_weight_only_config(config: Any) -> bool:
    """Whether ``config`` is a weight-only config (this module's or onnxruntime's)."""
    return isinstance(config, WeightOnlyQuantConfig) or (
        type(config).__name__.endswith("WeightOnlyQuantConfig")
        and hasattr(config, "algorithm"))


def quantize_weight_only(model_input: model_io.ModelInput, model_output: str | os.PathLike,
                         algo_config: Any) -> WeightOnlyResult:
    """``quantize(model_in, model_out, <WeightOnlyQuantConfig>)``: always external data, as
    onnxruntime; weights are quantized while saving (memory-light)."""
    config, data = native_config(algo_config, external_data=True)
    return quantize_weights(model_input, model_output, config, data)
