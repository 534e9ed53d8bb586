"""The one place where onnxruntime-style arguments become an :class:`onnxquant.StaticQuantConfig`.

:func:`_to_native_config` takes every option of ``onnxruntime.quantization.quantize_static``
(except the model paths and the reader) and returns one typed native config, or raises.

``extra_options`` policy (each key is handled in exactly one of these ways):

* **Mapped** to a native field (see ``_MAPPED``): ``ActivationSymmetric``, ``WeightSymmetric``,
  ``QuantizeBias``, ``MinimumRealRange``, ``QDQKeepRemovableActivations``, ``EnableSubgraph``,
  ``CalibMovingAverage``, ``CalibMovingAverageConstant``, ``CalibTensorRangeSymmetric``,
  ``CalibPercentile``, ``UseQDQContribOps``, ``DedicatedQDQPair``,
  ``OpTypesToExcludeOutputQuantization``, ``ForceQuantizeNoInputCheck``, ``MatMulConstBOnly``
  (QOperator only, as in onnxruntime), ``AddQDQPairToWeight``,
  ``ActivationRestrictedAsymmetric``, ``BlockSize``, and onnxquant's own ``Objective``
  (default ``"size"``: quantize what onnxruntime would; ``"balanced"`` / ``"speed"`` let
  onnxquant's measured cost model keep float the nodes that would run slower). Values are
  type-checked: a bad value raises :class:`~onnxquant.ort._errors.InvalidOptionError` (a
  ``ValueError``).
  ``CalibMovingAverage``: onnxquant keeps an exponential moving average (weight
  ``CalibMovingAverageConstant`` for the newest feed); onnxruntime's ``quantize_static`` takes the
  plain mean of the per-feed ranges, so a WARNING says that the ranges differ.
  ``EnableSubgraph``: onnxruntime's QDQ quantizer never quantizes If/Loop/Scan bodies, whatever
  this key says; onnxquant quantizes them by default and turns that off only when the key is given
  explicitly as ``False``.
* **Accepted, no effect** (``_NO_EFFECT``; logged at INFO): keys that onnxruntime's static QDQ
  path ignores too, or whose job onnxquant does another way with the same result.
* **Off values accepted** (``_OFF_ONLY``): keys of features not implemented yet. A value that
  means "off" (``False``, ``0``, ``{}``, ``[]``, ``None``) is what onnxquant does anyway and is
  accepted silently. Any other value logs one WARNING (the model is still of the kind asked
  for, numerics or layout differ a little: ``QDQOpTypePerChannelSupportToAxis``,
  ``QDQDisableWeightAdjustForInt32Bias``); an entry marked fatal would raise instead.
* ``TensorQuantOverrides`` becomes ``StaticQuantConfig.tensors``
  (:func:`onnxquant.ort.tensor_quant_overrides.to_tensor_overrides`): every entry is checked
  (an invalid one raises :class:`~onnxquant.ort._errors.InvalidOptionError`, listing all of
  them), ``convert`` / ``recv_nodes`` included. Checks that need the model (an activation
  with ``reduce_range`` or per-channel overrides, a per-channel count that does not match, a
  name that is not in the model) raise :class:`~onnxquant.QuantizationError` while planning.
* ``SmoothQuant`` / ``SmoothQuantAlpha`` run onnxquant's own SmoothQuant
  (``StaticQuantConfig.smooth_quant``; no neural-compressor), which always folds the scales into
  the producing node (``SmoothQuantFolding`` has no effect).
* **Unknown keys** log one WARNING each (with the closest known key, for typos) and are ignored.

Calibration methods map one to one (``MinMax``, ``Entropy``, ``Percentile``, ``Distribution``);
as in onnxruntime, Percentile ranges are symmetric unless ``CalibTensorRangeSymmetric`` says
otherwise. ``calibration_cache_path`` is onnxquant's own JSON cache of the collected statistics
(not onnxruntime's format): reused when it exists with the same settings, written otherwise.

``QuantFormat.QOperator`` selects onnxquant's QOperator emitter (QLinearConv, QGemm, ...).
``QFLOAT8E4M3FN`` follows onnxruntime's rules (Distribution calibration only, on both
activations and weights, scale ``std / std(float8 grid)``, zero point 0, opset 19, float biases
behind a Cast); with ``QuantFormat.QOperator`` only MatMuls are quantized (com.microsoft
QLinearMatMul, as onnxruntime writes it; no CPU kernel runs it), with a WARNING.
"""

from __future__ import annotations

import difflib
import enum
import logging
import math
import numbers
from collections.abc import Callable, Collection, Mapping
from typing import Any, TypeVar

import numpy as np

from onnxquant.core.errors import QuantizationError
from onnxquant.ort._errors import InvalidOptionError
from onnxquant.ort.calibrate import CalibrationMethod
from onnxquant.ort.quant_utils import QuantFormat, QuantType
from onnxquant.ort.tensor_quant_overrides import to_tensor_overrides
from onnxquant.static.config import CalibrationMethod as NativeCalibrationMethod
from onnxquant.static.config import QuantFormat as NativeQuantFormat
from onnxquant.static.config import StaticQuantConfig as NativeStaticQuantConfig

__all__: list[str] = []

logger = logging.getLogger(__name__)

_E = TypeVar("_E", bound=enum.Enum)


def _bool(key: str, value: Any) -> bool:
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, int) and value in (0, 1)):
        return bool(value)
    raise InvalidOptionError(f"extra_options[{key!r}] must be True or False, got {value!r}")


def _optional_bool(key: str, value: Any) -> bool | None:
    return None if value is None else _bool(key, value)


def _real(key: str, value: Any, what: str, ok: Callable[[float], bool]) -> float:
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):
        number = float(value)
        if math.isfinite(number) and ok(number):
            return number
    raise InvalidOptionError(f"extra_options[{key!r}] must be {what}, got {value!r}")


def _min_real_range(key: str, value: Any) -> float | None:
    if value is None:
        return None
    return _real(key, value, "None or a finite number >= 0", lambda x: x >= 0)


def _op_type_list(key: str, value: Any) -> frozenset[str]:
    if isinstance(value, str) or not isinstance(value, Collection) or not all(
            isinstance(v, str) for v in value):
        raise InvalidOptionError(f"extra_options[{key!r}] must be a list of op types, "
                                 f"got {value!r}")
    return frozenset(value)


def _objective(key: str, value: Any) -> str:
    """onnxquant's own key: ``"size"`` (the default here: quantize what onnxruntime would,
    whatever it costs on this CPU), ``"balanced"`` or ``"speed"``."""
    choices = ("size", "balanced", "speed")
    if not isinstance(value, str) or value.strip().lower() not in choices:
        raise InvalidOptionError(f"extra_options[{key!r}] must be one of {choices}, "
                                 f"got {value!r}")
    return value.strip().lower()


def _block_size(key: str, value: Any) -> int | None:
    """0 or None: no blocks (onnxruntime's default); otherwise a positive block size."""
    if value is None or (isinstance(value, numbers.Integral) and not isinstance(value, bool)
                         and int(value) == 0):
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 1:
        raise InvalidOptionError(f"extra_options[{key!r}] must be a positive int (or 0 for "
                                 f"none), got {value!r}")
    return int(value)


def _fraction(key: str, value: Any) -> float:
    return _real(key, value, "a number in (0, 1]", lambda x: 0 < x <= 1)


def _alpha(key: str, value: Any) -> float:
    return _real(key, value, "a number in [0, 1]", lambda x: 0 <= x <= 1)


def _percentile(key: str, value: Any) -> float:
    return _real(key, value, "a number in (0, 100]", lambda x: 0 < x <= 100)


_METHODS = {
    CalibrationMethod.MinMax: NativeCalibrationMethod.MINMAX,
    CalibrationMethod.Entropy: NativeCalibrationMethod.ENTROPY,
    CalibrationMethod.Percentile: NativeCalibrationMethod.PERCENTILE,
    CalibrationMethod.Distribution: NativeCalibrationMethod.DISTRIBUTION,
}

# extra_options key -> (native StaticQuantConfig field, parser)
_MAPPED: dict[str, tuple[str, Callable[[str, Any], Any]]] = {
    "ActivationSymmetric": ("activation_symmetric", _bool),
    "WeightSymmetric": ("weight_symmetric", _optional_bool),
    "QuantizeBias": ("quantize_bias", _bool),
    "MinimumRealRange": ("min_real_range", _min_real_range),
    "QDQKeepRemovableActivations": ("keep_removable_activations", _bool),
    "EnableSubgraph": ("subgraphs", _bool),
    "CalibMovingAverage": ("moving_average", _bool),
    "CalibMovingAverageConstant": ("averaging_constant", _fraction),
    "CalibTensorRangeSymmetric": ("symmetric_ranges", _bool),
    "CalibPercentile": ("percentile", _percentile),
    "SmoothQuant": ("smooth_quant", _bool),
    "SmoothQuantAlpha": ("smooth_quant_alpha", _alpha),
    "UseQDQContribOps": ("contrib_qdq_ops", _bool),
    "DedicatedQDQPair": ("dedicated_qdq_pairs", _bool),
    "OpTypesToExcludeOutputQuantization": ("float_output_op_types", _op_type_list),
    "ForceQuantizeNoInputCheck": ("force_quantize", _bool),
    "MatMulConstBOnly": ("matmul_const_b_only", _bool),
    "AddQDQPairToWeight": ("weight_qdq_pairs", _bool),
    "ActivationRestrictedAsymmetric": ("restricted_zero_points", _bool),
    "BlockSize": ("weight_block_size", _block_size),
    "Objective": ("objective", _objective),
}

# extra_options key -> why it has no effect here
_NO_EFFECT: dict[str, str] = {
    "CalibMaxIntermediateOutputs": "calibration streams one feed at a time, so memory does not "
    "grow with the number of feeds",
    "CalibStridedMinMax": "calibration streams one feed at a time, so memory does not grow with "
    "the number of feeds",
    "SmoothQuantFolding": "onnxquant always folds the smoothing scales into the node that "
    "produces the activation (a LayerNorm or linear layer) and leaves activations it cannot "
    "fold into unsmoothed",
    "extra.Sigmoid.nnapi": "QLinearSigmoid outputs use their calibrated range (NNAPI's fixed "
    "1/256 scale is for Android NNAPI only)",
    "DefaultTensorType": "element types come from onnxquant's own shape inference",
}

# extra_options key -> (raise instead of warn, advice) for values other than "off"
_OFF_ONLY: dict[str, tuple[bool, str]] = {
    "QDQOpTypePerChannelSupportToAxis": (False, "per-channel weights use each op's output-"
                                         "channel axis"),
    "QDQDisableWeightAdjustForInt32Bias": (False, "weight scales are handled as by default"),
}

_KNOWN = (*_MAPPED, *_NO_EFFECT, *_OFF_ONLY, "TensorQuantOverrides")


def _enum(value: Any, cls: type[_E], arg: str) -> _E:
    """Accepts our member, a member of onnxruntime's same-named enum, a name or the int value
    (for QuantType: an ONNX ``TensorProto`` element type, as onnxruntime reads ints)."""
    if isinstance(value, cls):
        return value
    if cls is QuantType and isinstance(value, int) and not isinstance(value, bool):
        # onnxruntime hands a plain int on as an ONNX element type (TensorProto.UINT8 = 2).
        by_tensor_type = {member.tensor_type: member for member in QuantType}
        if value in by_tensor_type:
            return by_tensor_type[value]  # type: ignore[return-value]
        raise InvalidOptionError(
            f"{arg}={value!r} is not an ONNX element type onnxquant quantizes to; use a "
            "QuantType member or TensorProto.INT8/UINT8/INT16/UINT16/INT4/UINT4/FLOAT8E4M3FN")
    if isinstance(value, enum.Enum) and value.name in cls.__members__:
        return cls[value.name]
    if isinstance(value, str):
        folded = {name.lower(): member for name, member in cls.__members__.items()}
        if value.strip().lower() in folded:
            return folded[value.strip().lower()]
    elif isinstance(value, int) and not isinstance(value, bool):
        try:
            return cls(value)
        except ValueError:
            pass
    raise InvalidOptionError(
        f"{arg}={value!r} is not a {cls.__name__}; use one of "
        + ", ".join(f"{cls.__name__}.{name}" for name in cls.__members__)
    )


def _names(value: Collection[str] | None, arg: str) -> frozenset[str] | None:
    """``None`` or empty means "no restriction", as in onnxruntime."""
    if value is None:
        return None
    if isinstance(value, str):
        raise InvalidOptionError(f"{arg} must be a list of names, got the string {value!r}")
    return frozenset(value) or None


def _extra_fields(extra_options: Mapping[str, Any]) -> dict[str, Any]:
    """Native config fields from ``extra_options``, applying the policy of the module docstring."""
    fields: dict[str, Any] = {}
    for key, value in extra_options.items():
        if key in _MAPPED:
            field, parse = _MAPPED[key]
            fields[field] = parse(key, value)
        elif key == "TensorQuantOverrides":
            fields["tensors"] = to_tensor_overrides(value)
        elif key in _NO_EFFECT:
            logger.info("extra_options[%r] has no effect: %s.", key, _NO_EFFECT[key])
        elif key in _OFF_ONLY:
            if value is None or (not isinstance(value, np.ndarray) and not value):
                continue
            fatal, advice = _OFF_ONLY[key]
            if fatal:
                raise QuantizationError(
                    f"extra_options[{key!r}]={value!r} is not supported yet by onnxquant, and "
                    f"ignoring it would change the model you asked for; {advice}."
                )
            logger.warning("extra_options[%r]=%r is not supported yet and is ignored: %s.",
                           key, value, advice)
        else:
            close = difflib.get_close_matches(str(key), _KNOWN, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            logger.warning("Unknown extra_options key %r is ignored.%s", key, hint)
    if fields.get("moving_average"):
        logger.warning(
            "extra_options['CalibMovingAverage']=True: onnxquant tracks an exponential moving "
            "average of the per-feed ranges with weight CalibMovingAverageConstant (%s) for the "
            "newest feed; onnxruntime's quantize_static averages all per-feed ranges equally, so "
            "the ranges differ.", fields.get("averaging_constant", 0.01))
    return fields


def _float8_checks(act: QuantType, wgt: QuantType, method: CalibrationMethod,
                   fmt: QuantFormat) -> QuantFormat:
    """onnxruntime's float8 rules: Distribution calibration only, float8 on both activations
    and weights or neither. QOperator with float8 logs a WARNING: its QLinearMatMul
    (com.microsoft, float8) has no CPU kernel."""
    float8 = [t is QuantType.QFLOAT8E4M3FN for t in (act, wgt)]
    if not any(float8):
        return fmt
    if method is not CalibrationMethod.Distribution:
        raise InvalidOptionError(
            "QuantType.QFLOAT8E4M3FN needs calibrate_method=CalibrationMethod.Distribution "
            f"(float8 scales come from standard deviations), got {method}")
    if not all(float8):
        raise InvalidOptionError(
            "QuantType.QFLOAT8E4M3FN must be used for both activation_type and weight_type "
            f"(got activation_type={act}, weight_type={wgt})")
    if fmt is QuantFormat.QOperator:
        logger.warning(
            "QuantType.QFLOAT8E4M3FN with QuantFormat.QOperator: only MatMul nodes are "
            "quantized (com.microsoft QLinearMatMul on float8), which onnxruntime's CPU "
            "provider cannot run; use QuantFormat.QDQ for a model that runs everywhere.")
    return fmt


def _to_native_config(
    *,
    quant_format: Any = QuantFormat.QDQ,
    op_types_to_quantize: Collection[str] | None = None,
    per_channel: bool = False,
    reduce_range: bool = False,
    activation_type: Any = QuantType.QInt8,
    weight_type: Any = QuantType.QInt8,
    nodes_to_quantize: Collection[str] | None = None,
    nodes_to_exclude: Collection[str] | None = None,
    use_external_data_format: bool = False,
    calibrate_method: Any = CalibrationMethod.MinMax,
    calibration_providers: Collection[str] | None = None,
    extra_options: Mapping[str, Any] | None = None,
    calibration_cache_path: Any = None,
) -> NativeStaticQuantConfig:
    """Translates onnxruntime's ``quantize_static`` options into one native config.

    Enum arguments may be members of these enums or of onnxruntime's, their names or int values.
    ``use_external_data_format=False`` means "decide by size" (a single file below 2 GB, where
    onnxruntime would fail above it).

    Raises:
        InvalidOptionError: A value is invalid, or activation QInt8 with weight QUInt8.
        QuantizationError: The options ask for something not supported yet.
    """
    fmt = _enum(quant_format, QuantFormat, "quant_format")
    method = _enum(calibrate_method, CalibrationMethod, "calibrate_method")
    act = _enum(activation_type, QuantType, "activation_type")
    wgt = _enum(weight_type, QuantType, "weight_type")
    fmt = _float8_checks(act, wgt, method, fmt)
    if act is QuantType.QInt8 and wgt is QuantType.QUInt8:
        raise InvalidOptionError(
            "activation_type=QuantType.QInt8 with weight_type=QuantType.QUInt8 is not supported "
            "(no kernel takes int8 activations with uint8 weights); use QInt8 weights (S8S8) or "
            "QUInt8 activations (U8U8 / U8S8)."
        )
    if isinstance(calibration_providers, str):
        raise InvalidOptionError(
            f"calibration_providers must be a list, got the string {calibration_providers!r}"
        )
    fields = _extra_fields(extra_options or {})
    if per_channel and "weight_symmetric" not in fields:
        fields["weight_symmetric"] = True  # onnxruntime: per-channel weights are symmetric
    if method is CalibrationMethod.Percentile and "symmetric_ranges" not in fields:
        fields["symmetric_ranges"] = True  # onnxruntime's Percentile calibrator default
    native = NativeStaticQuantConfig(
        activation_type=act.qtype,
        weight_type=wgt.qtype,
        per_channel=bool(per_channel),
        reduce_range=bool(reduce_range),
        format=(NativeQuantFormat.QOPERATOR if fmt is QuantFormat.QOperator
                else NativeQuantFormat.QDQ),
        calibration_method=_METHODS[method],
        calibration_cache=calibration_cache_path,
        op_types=_names(op_types_to_quantize, "op_types_to_quantize"),
        nodes_to_quantize=_names(nodes_to_quantize, "nodes_to_quantize"),
        nodes_to_exclude=_names(nodes_to_exclude, "nodes_to_exclude") or frozenset(),
        # What the user names is quantized as onnxruntime would; onnxquant's own selection
        # and speed rules decide only what was left open.
        force_op_types=_names(op_types_to_quantize, "op_types_to_quantize") or frozenset(),
        force_nodes=_names(nodes_to_quantize, "nodes_to_quantize") or frozenset(),
        external_data=True if use_external_data_format else None,
        evaluate=False,  # onnxruntime calibrates on every sample and measures nothing
        # onnxruntime keeps biases as they are, and quantizes what it is asked to whatever
        # that costs on the machine that quantizes (which need not be the one that deploys)
        **{"bias_correction": False, "objective": "size", **fields},
    )
    if calibration_providers:
        native.providers = tuple(calibration_providers)
    return native
