"""Typed configuration of static quantization.

Every numeric choice is a visible field with one default, documented once here. The
ORT-compatible layer (``onnxquant.ort``) translates its option strings into these fields in one
place.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from collections.abc import Collection, Mapping, Sequence

from onnxquant.calibration.settings import CalibrationMethod, CalibrationSettings
from onnxquant.core.errors import QuantizationError
from onnxquant.core.qtypes import INT8, UINT8, QuantFormat, QuantType

__all__ = ["QuantFormat", "CalibrationMethod", "StaticQuantConfig", "TensorOverride"]


@dataclasses.dataclass(frozen=True)
class TensorOverride:
    """What one tensor gets instead of the config's defaults (``StaticQuantConfig.tensors``).

    Values left None follow the config. ``scale``, ``zero_point``, ``rmin`` and ``rmax`` may be
    sequences with one value per channel when ``axis`` is given (constant tensors only); a
    single value with ``axis`` applies to every channel.

    Attributes:
        quant_type: Its element type (e.g. ``UINT16`` for a sensitive activation next to 8-bit
            ones; QDQ format only when it differs from the config's types). A 16-bit activation
            takes its calibrated min/max range: histogram methods choose clip ranges for the
            config's 8-bit grid, which a 65536-level grid does not need.
        rmin: Lower end of its range instead of the calibrated (or the weight's) one.
        rmax: Upper end of its range instead of the calibrated (or the weight's) one.
        symmetric: Symmetric parameters (zero point at the midpoint) or not. A weight whose
            ``quant_type`` differs from the config's weight type defaults to symmetric when
            that type is signed (unless ``StaticQuantConfig.weight_symmetric`` is set).
        scale: Its quantization scale (> 0), given together with ``zero_point``: the range
            (calibrated or the weight's) is then not used, and a constant without ``axis`` is
            quantized per tensor.
        zero_point: Its zero point, an integer of ``quant_type``'s grid; with ``scale``.
        reduce_range: Constant tensors: one bit less (7-bit int8/uint8) instead of
            ``StaticQuantConfig.reduce_range``.
        axis: Constant tensors: one scale per slice along this axis (per channel), whatever
            ``StaticQuantConfig.per_channel`` says.
        per_channel: Constant tensors: True quantizes a weight per channel along its op's
            output-channel axis, False per tensor (no SQNR fallback to per channel); None
            follows the config. ``axis`` implies True.
    """

    quant_type: QuantType | None = None
    rmin: float | Sequence[float] | None = None
    rmax: float | Sequence[float] | None = None
    symmetric: bool | None = None
    scale: float | Sequence[float] | None = None
    zero_point: int | Sequence[int] | None = None
    reduce_range: bool | None = None
    axis: int | None = None
    per_channel: bool | None = None

    @property
    def fixes_params(self) -> bool:
        """Whether the override alone determines the parameters (no calibrated range needed)."""
        return self.scale is not None or (self.rmin is not None and self.rmax is not None)

    @property
    def decides_granularity(self) -> bool:
        """Whether the override, not the config, chooses per tensor or per channel."""
        return self.axis is not None or self.per_channel is not None or self.scale is not None

    def problems(self) -> list[str]:
        """What is wrong with this override on its own (empty when it is valid)."""
        found: list[str] = []
        if self.quant_type is not None and not isinstance(self.quant_type, QuantType):
            found.append(f"quant_type must be an onnxquant QuantType (INT8, UINT16, ...), "
                         f"got {self.quant_type!r}")
        for key in ("symmetric", "reduce_range", "per_channel"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, bool):
                found.append(f"{key} must be True, False or None, got {value!r}")
        if self.axis is not None and (isinstance(self.axis, bool)
                                      or not isinstance(self.axis, int)):
            found.append(f"axis must be an int, got {self.axis!r}")
        if self.axis is not None and self.per_channel is False:
            found.append("axis asks for per-channel parameters but per_channel is False")
        if (self.scale is None) != (self.zero_point is None):
            found.append("scale and zero_point must be given together")
        if self.scale is not None:
            clash = [k for k in ("rmin", "rmax", "symmetric", "reduce_range")
                     if getattr(self, k) is not None]
            if clash:
                found.append(f"scale/zero_point fix the parameters, so {', '.join(clash)} "
                             "cannot be given with them; remove one or the other")
        for key, kind in (("scale", "number"), ("zero_point", "int"), ("rmin", "number"),
                          ("rmax", "number")):
            found.extend(self._value_problems(key, kind))
        if not found:
            low, high = _values(self.rmin), _values(self.rmax)
            if low is not None and high is not None:
                low, high = low * (len(high) if len(low) == 1 else 1), high * (
                    len(low) if len(high) == 1 else 1)
            if low is not None and high is not None and len(low) == len(high) and any(
                    lo > hi for lo, hi in zip(low, high, strict=True)):
                found.append(f"rmin {self.rmin} is above rmax {self.rmax}")
        return found

    def _value_problems(self, key: str, kind: str) -> list[str]:
        value = getattr(self, key)
        if value is None:
            return []
        many = isinstance(value, Sequence) and not isinstance(value, str)
        if many and self.axis is None:
            return [f"{key} has one value per channel, which needs an axis"]
        items = list(value) if many else [value]
        if many and not items:
            return [f"{key} is empty"]
        for item in items:
            if kind == "int":
                if isinstance(item, bool) or not isinstance(item, numbers.Integral):
                    return [f"zero_point must be an integer, got {item!r}"]
            elif (isinstance(item, bool) or not isinstance(item, numbers.Real)
                  or not math.isfinite(float(item))):
                return [f"{key} must be a finite number, got {item!r}"]
            elif key == "scale" and not float(item) > 0:
                return [f"scale must be > 0, got {item!r}"]
        return []


def _values(value: object) -> list[float] | None:
    if value is None:
        return None
    if isinstance(value, Sequence):
        return [float(v) for v in value]
    return [float(value)]  # type: ignore[arg-type]


@dataclasses.dataclass
class StaticQuantConfig:
    """Settings of :func:`onnxquant.quantize_static`.

    Attributes:
        activation_type: Element type of quantized activations. uint8 by default (U8S8 with
            int8 weights): onnxruntime's fast x86-64 kernels take uint8 activations, and S8S8
            models measured 1.5-3.5x slower there in both formats at the same accuracy
            (``onnxquant.ort`` keeps onnxruntime's int8 default).
        weight_type: Element type of quantized weights.
        per_channel: One scale per output channel for Conv/ConvTranspose/Gemm/MatMul weights.
        per_channel_fallback_db: With per-tensor weights, a weight whose per-tensor quantization
            SQNR is below this many dB (outlier channels, e.g. depthwise convs) is quantized per
            channel instead, and so is every Conv weight with a BatchNormalization folded into
            it (its channels carry BatchNorm's scale); the plan records it. None disables it.
        reduce_range: Quantize weights to 7 bits (for CPUs without VNNI that overflow on u8s8).
        activation_symmetric: Symmetric activation ranges (zero point 0 / midpoint).
        weight_symmetric: Symmetric weights; None means True for signed weight types.
        format: Output representation (QDQ or QOperator).
        calibration_method: How activation ranges are found (MinMax, Entropy, Percentile,
            Distribution, MSE).
        symmetric_ranges: Calibrated ranges symmetric around 0 (``CalibTensorRangeSymmetric``).
        moving_average: MinMax: exponential moving average of per-batch ranges.
        averaging_constant: Weight of the newest batch in the moving average.
        percentile: Percentile method: percentage of values kept inside the range.
        histogram_bins: Histogram methods: at most this many bins over the observed range.
        quantized_bins: Entropy: quantized levels the KL search compares against.
        calibration_workers: Processes sharing the calibration inference (same ranges as one).
        calibration_cache: JSON file of collected statistics: reused when it exists and was
            made with the same calibration settings (an error otherwise), written when not.
        op_types: Op types to quantize; None means every op type with a rule.
        op_types_to_exclude: Op types never quantized.
        nodes_to_quantize: If given, only these node names are quantized.
        nodes_to_exclude: Node names never quantized.
        force_op_types: Op types quantized wherever they are selected and their inputs have
            ranges, even where onnxquant's own rules would keep them float: a Concat, pool or
            elementwise op with no quantized neighbour, a shallow or slow depthwise Conv in
            QOperator form. The safety rules still apply (extreme constants, singular
            domains, float Softmax/LayerNorm inputs). ``onnxquant.ort`` sets the op types the
            user names in ``op_types_to_quantize`` (onnxruntime quantizes what it is told).
        force_nodes: Node names quantized the same way (``onnxquant.ort``:
            ``nodes_to_quantize``).
        float_output_op_types: QDQ format: outputs of these op types get no Q/DQ pair, even
            where their readers are quantized (``OpTypesToExcludeOutputQuantization``).
        contrib_qdq_ops: QDQ format: QuantizeLinear/DequantizeLinear in the ``com.microsoft``
            domain (onnxruntime's kernels; 16-bit and 4-bit types below opset 21).
        dedicated_qdq_pairs: QDQ format: one Q/DQ pair per reader of a tensor instead of one
            shared pair (some accelerators fuse a pair only into a single consumer).
        quantize_bias: Store Conv/Gemm biases as int32 (scale = input scale × weight scale).
        keep_removable_activations: Keep Relu/Clip even when the quantized range clips.
        min_real_range: Minimum width of every range (activations and constants).
        fold_batchnorm: Fold BatchNormalization into the preceding Conv before quantizing.
        subgraphs: Quantize inside If/Loop/Scan bodies too.
        upgrade_opset: Convert models below opset 10 instead of refusing them.
        external_data: Save tensors to ``<output>.data``; None decides by size (> 2 GB).
        providers: onnxruntime execution providers used for calibration.
        max_calibration_samples: Use at most this many feeds.
        verify_finite: After emission, run the quantized and the float model on the first
            ``verify_feeds`` calibration feeds; where the quantized model gives NaN/Inf that
            the float model does not, the nodes causing it are kept float and the model is
            planned and emitted again (see :mod:`onnxquant.static.verify`). Skipped for models
            without an op that can turn finite values into NaN/Inf (Log, Exp, a divisor that is
            not a constant, ...).
        verify_feeds: Calibration feeds kept for that check.
        evaluate: After writing, measure how close the quantized outputs stay to the float
            ones (``QuantizationResult.fidelity``): every 10th calibration feed (at most 16)
            is held back from calibration for it, unless ``eval_data`` is given (see
            :mod:`onnxquant.calibration.evaluation`). False calibrates on every feed and
            measures only explicit ``eval_data`` (``onnxquant.ort`` sets False).
        progress: Show progress bars.
        float_depthwise_multiple: QOperator format: depthwise Convs whose channel count is not
            a multiple of this stay float, with their elementwise tail (activations):
            onnxruntime's 8-bit depthwise kernel does 16 channels per vector step and the rest
            one by one, 3-8x slower than its float kernel (88-200 channel 5x5 layers of
            rapidocr cls), while multiples of 16 run ~2x slower and are worth the saved
            DequantizeLinear/QuantizeLinear transitions. None quantizes every depthwise Conv.
            QDQ models are unaffected.
        float_conv_depth: QOperator format: Convs (not depthwise) whose reduction depth (input
            channels per group × kernel area) is below this and whose input is float anyway (a
            graph input, or the output of float nodes) stay float, with their elementwise tail,
            instead of opening an integer region: with so few products per output
            onnxruntime's 8-bit Conv does not pay for the QuantizeLinear and Transpose in front
            of it (the 3-channel 3x3 stem of rapidocr cls: 53 µs against 21 µs float, plus
            19 µs of transitions; cls ~1.01x -> ~0.96x float, det 0.45x -> 0.43x). Shallow
            Convs inside an integer region stay integer. None quantizes them all. QDQ models
            are unaffected.
        tensors: Per-tensor overrides by tensor name (:class:`TensorOverride`): mixed
            precision (16-bit activations where 8 bits lose too much), fixed ranges, symmetry.
        smooth_quant: SmoothQuant (:mod:`onnxquant.static.corrections.smoothquant`): divide
            the input channels of MatMul/Gemm activations by ``s`` in the node that produces
            them and multiply the weights' rows by ``s`` (an exact rewrite of the float model),
            so that outlier channels no longer stretch the activation grid. Per-channel maxima
            come from ``correction_feeds`` calibration feeds, and so do the ranges of the
            tensors it changes.
        smooth_quant_alpha: SmoothQuant's migration strength (0: none, 1: all into weights).
        equalize_layers: Cross-layer equalization of consecutive Conv/MatMul/Gemm layers
            (data-free, exact; :mod:`onnxquant.static.corrections.equalization`).
        bias_correction: Subtract the mean output shift that weight rounding causes from the
            biases of Conv/Gemm/MatMul(+Add) layers, from the per-channel input means of
            ``correction_feeds`` calibration feeds. On by default: it removes an error whose
            expectation is known, and on the public corpus it never lowered task fidelity and
            raised it up to 30 points (CTC text agreement 44 % -> 73 %,
            ``benchmarks/bench_corrections.py``); it costs one float pass over those feeds.
        correction_feeds: Calibration feeds kept for the statistics of the corrections.
    """

    activation_type: QuantType = UINT8
    weight_type: QuantType = INT8
    per_channel: bool = False
    per_channel_fallback_db: float | None = 30.0
    reduce_range: bool = False
    activation_symmetric: bool = False
    weight_symmetric: bool | None = None
    format: QuantFormat = QuantFormat.QDQ
    calibration_method: CalibrationMethod = CalibrationMethod.MINMAX
    symmetric_ranges: bool = False
    moving_average: bool = False
    averaging_constant: float = 0.01
    percentile: float = 99.999
    histogram_bins: int = 2048
    quantized_bins: int = 128
    calibration_workers: int = 1
    calibration_cache: str | os.PathLike | None = None
    op_types: Collection[str] | None = None
    op_types_to_exclude: Collection[str] = ()
    nodes_to_quantize: Collection[str] | None = None
    nodes_to_exclude: Collection[str] = ()
    force_op_types: Collection[str] = ()
    force_nodes: Collection[str] = ()
    float_output_op_types: Collection[str] = ()
    contrib_qdq_ops: bool = False
    dedicated_qdq_pairs: bool = False
    quantize_bias: bool = True
    keep_removable_activations: bool = False
    min_real_range: float | None = None
    fold_batchnorm: bool = True
    subgraphs: bool = True
    upgrade_opset: bool = False
    external_data: bool | None = None
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    max_calibration_samples: int | None = None
    verify_finite: bool = True
    verify_feeds: int = 4
    evaluate: bool = True
    progress: bool = False
    float_depthwise_multiple: int | None = 16
    float_conv_depth: int | None = 32
    tensors: Mapping[str, TensorOverride] = dataclasses.field(default_factory=dict)
    smooth_quant: bool = False
    smooth_quant_alpha: float = 0.5
    equalize_layers: bool = False
    bias_correction: bool = True
    correction_feeds: int = 32

    def __post_init__(self) -> None:
        if not 0.0 <= self.smooth_quant_alpha <= 1.0:
            raise QuantizationError(
                f"smooth_quant_alpha must be in [0, 1], got {self.smooth_quant_alpha}")
        if self.correction_feeds < 1:
            raise QuantizationError("correction_feeds must be at least 1")
        for name, override in self.tensors.items():
            if not isinstance(override, TensorOverride):
                raise QuantizationError(
                    f"tensor override '{name}' must be a TensorOverride, got "
                    f"{type(override).__name__}")
            found = override.problems()
            if found:
                raise QuantizationError(f"tensor override '{name}': " + "; ".join(found))
            if (self.format is QuantFormat.QOPERATOR and override.quant_type is not None
                    and override.quant_type not in (self.activation_type, self.weight_type)):
                raise QuantizationError(
                    f"tensor override '{name}': a {override.quant_type} tensor next to "
                    f"{self.activation_type} ones needs the QDQ format (QOperator kernels take "
                    "one element type); use format=QuantFormat.QDQ")

    @property
    def needs_correction_feeds(self) -> bool:
        """Whether calibration keeps feeds for the corrections' statistics."""
        return self.smooth_quant or self.bias_correction

    @property
    def weights_symmetric(self) -> bool:
        """Resolved weight symmetry (signed types default to symmetric)."""
        if self.weight_symmetric is None:
            return self.weight_type.signed
        return self.weight_symmetric

    def calibration_settings(self) -> CalibrationSettings:
        """The calibration part of this config."""
        return CalibrationSettings(
            method=self.calibration_method,
            symmetric=self.symmetric_ranges,
            moving_average=self.moving_average,
            averaging_constant=self.averaging_constant,
            percentile=self.percentile,
            bins=self.histogram_bins,
            quantized_bins=self.quantized_bins,
            levels=1 << self.activation_type.bits,
        )

    def required_opset(self) -> int:
        """The lowest default-domain opset the output needs.

        QDQ: QuantizeLinear/DequantizeLinear of the chosen types (13 for per-axis). QOperator:
        QLinearConv/QLinearMatMul need 10; per-channel weights there are 1-D scale inputs, not
        an ``axis`` attribute, but the fallback DequantizeLinear of a per-channel weight needs
        13. Ops with their own minimum for 8-bit inputs (MaxPool 12, Resize/Pad 11) stay float
        below it. The contrib ops use the ``com.microsoft`` opset 1, imported by the emitter.
        """
        opset = max(self.activation_type.min_opset, self.weight_type.min_opset,
                    *(o.quant_type.min_opset for o in self.tensors.values() if o.quant_type))
        if self.format is QuantFormat.QOPERATOR:
            opset = max(opset, 10)
        if self.per_channel or self.per_channel_fallback_db is not None:
            opset = max(opset, 13)
        return opset
