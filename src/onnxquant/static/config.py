"""Typed configuration of static quantization.

Every numeric choice is a visible field with one default, documented once here. The
ORT-compatible layer (``onnxquant.ort``) translates its option strings into these fields in one
place.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Collection, Mapping

from onnxquant.calibration.ray_cluster import backend_problem
from onnxquant.calibration.settings import CalibrationMethod, CalibrationSettings
from onnxquant.core.costs import CostModel
from onnxquant.core.errors import QuantizationError
from onnxquant.core.objective import Objective, as_objective
from onnxquant.core.qtypes import INT8, UINT8, QuantFormat, QuantType
from onnxquant.static.tensor_override import TensorConvert, TensorOverride

__all__ = ["QuantFormat", "CalibrationMethod", "StaticQuantConfig", "TensorConvert",
           "TensorOverride"]


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
            Distribution, MSE). Distribution with float8 types sets every float8 scale
            (activations and weights) to ``std / std(all float8 values)``, as onnxruntime
            does; float8 with the other methods uses ``absmax / 448``.
        symmetric_ranges: Calibrated ranges symmetric around 0 (``CalibTensorRangeSymmetric``).
        moving_average: MinMax: exponential moving average of per-batch ranges.
        averaging_constant: Weight of the newest batch in the moving average.
        percentile: Percentile method: percentage of values kept inside the range.
        histogram_bins: Histogram methods: at most this many bins over the observed range.
        quantized_bins: Entropy: quantized levels the KL search compares against.
        calibration_workers: Processes (or Ray workers) sharing the calibration inference
            (same ranges as one).
        calibration_backend: Where those workers run: ``"local"`` (processes on this machine)
            or ``"ray"`` (actors of a Ray cluster, one CPU each; ``pip install onnxquant[ray]``;
            see :mod:`onnxquant.calibration.ray_cluster`).
        ray_address: With ``calibration_backend="ray"``: the ``host:port`` of a running cluster
            (``ray start --head``; ``"auto"`` finds one on this machine, ``ray://host:port`` is
            a Ray client); None starts a local cluster bound to 127.0.0.1, or uses a Ray
            already initialised in this process.
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
        weight_block_size: QDQ format: rank-2 weights (MatMul, Gemm) quantized in blocks of
            this many elements along their reduction axis, each block with its own scale
            (DequantizeLinear ``block_size``, opset 21; ``BlockSize``). Their biases stay
            float. Other weights raise.
        restricted_zero_points: Asymmetric activations get a zero point at the grid's
            minimum (ranges without negative values) or its middle (128 for uint8), never in
            between (``ActivationRestrictedAsymmetric``; for accelerators that support only
            those).
        force_quantize: Every selected node is quantized the same way (``onnxquant.ort``:
            ``ForceQuantizeNoInputCheck``).
        matmul_const_b_only: QOperator format: MatMuls whose second input is not a constant
            stay float (``MatMulConstBOnly``).
        weight_qdq_pairs: QDQ format: weights stay float in the model, behind a
            QuantizeLinear→DequantizeLinear pair, instead of being stored quantized
            (``AddQDQPairToWeight``; for tools that fold or fine-tune weights afterwards).
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
            Both rules are the fallback of the cost model: they decide only when costs are not
            measured (``measure_costs=False`` or ``ONNXQUANT_MEASURE_COSTS=0``); set them,
            with ``measure_costs=False``, to override the measurements by hand. With
            ``objective="size"`` neither applies.
        objective: What the quantized model is for (:class:`onnxquant.core.objective.Objective`,
            or its value as a string): ``"speed"``, ``"balanced"`` (default) or ``"size"``.
            With speed or balanced, a Conv/MatMul/Gemm whose integer form (QLinearConv/
            QLinearMatMul, with the QuantizeLinear/DequantizeLinear transitions it causes) is
            measured slower than its float form stays float, in QDQ and QOperator form, with
            the reason in the plan; balanced quantizes such a node anyway when it is at most
            25 % slower, saves at least 64 KiB of weights and the accepted slowdowns stay
            within half of what the faster integer nodes gained
            (:func:`onnxquant.core.objective.balanced_accepts`). With size every node is
            quantized where it can be, and the summary states the latency cost measured.
            Nodes the user named (``force_op_types``, ``force_nodes``, ``force_quantize``,
            ``tensors``) are quantized whatever the objective.
        measure_costs: Measure kernel costs with onnxruntime on this machine (cached per CPU
            and onnxruntime version, see :mod:`onnxquant.core.costs`); None measures unless
            the environment sets ``ONNXQUANT_MEASURE_COSTS=0``. Not measuring falls back to
            ``float_depthwise_multiple``/``float_conv_depth`` (QOperator only).
        cost_model: A cost model to decide with instead of measuring here (an object with
            the :class:`onnxquant.core.costs.CostModel` methods: a table measured on the
            target machine, or a fake in tests); it is used even when measuring is off.
        latency_guard: With speed or balanced and costs measured, time the float and the
            quantized model after emission (1 thread, about 2 s) and, while the quantized one
            is more than 3 % slower, keep float the quantized Conv/MatMul/Gemm with the
            smallest measured gain, then every node not named by the user
            (:mod:`onnxquant.static._latency_guard`); the plan and summary say what was
            measured.
        tensors: Per-tensor overrides by tensor name (:class:`TensorOverride`): mixed
            precision (16-bit activations where 8 bits lose too much), fixed ranges, symmetry.
            Nodes that read or write an overridden tensor are quantized like ``force_nodes``.
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
    calibration_backend: str = "local"
    ray_address: str | None = None
    calibration_cache: str | os.PathLike | None = None
    op_types: Collection[str] | None = None
    op_types_to_exclude: Collection[str] = ()
    nodes_to_quantize: Collection[str] | None = None
    nodes_to_exclude: Collection[str] = ()
    force_op_types: Collection[str] = ()
    force_nodes: Collection[str] = ()
    force_quantize: bool = False
    restricted_zero_points: bool = False
    weight_block_size: int | None = None
    matmul_const_b_only: bool = False
    weight_qdq_pairs: bool = False
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
    objective: Objective | str = Objective.BALANCED
    measure_costs: bool | None = None
    cost_model: CostModel | None = None
    latency_guard: bool = True
    tensors: Mapping[str, TensorOverride] = dataclasses.field(default_factory=dict)
    smooth_quant: bool = False
    smooth_quant_alpha: float = 0.5
    equalize_layers: bool = False
    bias_correction: bool = True
    correction_feeds: int = 32

    def __post_init__(self) -> None:
        self.objective = as_objective(self.objective)
        if self.weight_block_size is not None and (
                isinstance(self.weight_block_size, bool) or self.weight_block_size < 1):
            raise QuantizationError(
                f"weight_block_size must be a positive int, got {self.weight_block_size!r}")
        if not 0.0 <= self.smooth_quant_alpha <= 1.0:
            raise QuantizationError(
                f"smooth_quant_alpha must be in [0, 1], got {self.smooth_quant_alpha}")
        if self.correction_feeds < 1:
            raise QuantizationError("correction_feeds must be at least 1")
        problem = backend_problem(self.calibration_backend, self.ray_address,
                                  self.calibration_workers)
        if problem:
            raise QuantizationError(problem)
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
            if override.convert is not None:
                self._check_convert(name, override)

    def _check_convert(self, name: str, override: TensorOverride) -> None:
        """Raise for a ``convert`` the format or the other settings cannot emit."""
        assert override.convert is not None
        where = f"tensor override '{name}'"
        if self.format is QuantFormat.QOPERATOR:
            raise QuantizationError(
                f"{where}: convert (a second type for some readers) needs the QDQ format "
                "(QOperator kernels take one element type); use format=QuantFormat.QDQ or "
                "remove the convert")
        if self.dedicated_qdq_pairs:
            raise QuantizationError(
                f"{where}: convert cannot be combined with dedicated_qdq_pairs; remove one "
                "or the other")
        own = override.quant_type or self.activation_type
        if override.convert.quant_type == own:
            raise QuantizationError(
                f"{where}: the convert quant_type must differ from the tensor's own type "
                f"({own}); remove the convert or choose another type")

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

    @property
    def float8_from_std(self) -> bool:
        """Float8 scales from standard deviations (``std / std(float8 grid)``, onnxruntime's
        rule): float8 activations with the Distribution calibration; other methods use
        ``absmax / max``."""
        return (self.activation_type.is_float
                and self.calibration_method is CalibrationMethod.DISTRIBUTION)

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
                    *(o.quant_type.min_opset for o in self.tensors.values() if o.quant_type),
                    *(o.convert.quant_type.min_opset for o in self.tensors.values()
                      if o.convert is not None))
        if self.format is QuantFormat.QOPERATOR:
            opset = max(opset, 10)
        if self.per_channel or self.per_channel_fallback_db is not None:
            opset = max(opset, 13)
        if self.weight_block_size and self.format is QuantFormat.QDQ:
            opset = max(opset, 21)
        return opset
