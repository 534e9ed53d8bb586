"""Typed configuration of dynamic quantization."""

from __future__ import annotations

import dataclasses
from collections.abc import Collection

from onnxquant.core.costs import CostModel
from onnxquant.core.objective import Objective, as_objective
from onnxquant.core.qtypes import INT8, QuantFormat, QuantType

__all__ = ["DynamicQuantConfig"]


@dataclasses.dataclass
class DynamicQuantConfig:
    """Settings of :func:`onnxquant.quantize_dynamic`.

    Attributes:
        weight_type: Element type of quantized weights (int8 or uint8). Activations are
            always uint8 in QOperator form (DynamicQuantizeLinear's type).
        per_channel: One scale per output channel of MatMul/Gemm/LSTM weights (Conv weights
            too where the runtime allows it).
        per_channel_fallback_db: With per-tensor weights, a weight whose per-tensor
            quantization SQNR is below this many dB (outlier channels) is quantized per channel
            instead, where the runtime allows it; the decision's reason says so. None disables.
        reduce_range: Quantize weights to 7 bits (CPUs without VNNI overflow on u8s8).
        weight_symmetric: Symmetric weights; None means True for signed weight types.
        format: QOPERATOR (MatMulInteger, ConvInteger, QAttention, DynamicQuantizeLSTM, ...)
            or QDQ (QuantizeLinear/DequantizeLinear fed by ComputeQuantizationParameters).
        op_types: Op types to quantize; None means every op type dynamic quantization handles.
        op_types_to_exclude: Op types never quantized.
        nodes_to_quantize: If given, only these node names are quantized.
        nodes_to_exclude: Node names never quantized.
        matmul_const_b_only: Only MatMuls whose B is a constant (default, as in the baseline).
        fold_batchnorm: Fold BatchNormalization into the preceding Conv before quantizing.
        subgraphs: Quantize inside If/Loop/Scan bodies too. Off by default (as in the
            baseline): dynamic quantization adds nodes that run on every call, and in small
            branch/loop bodies that overhead outweighs the integer kernels (silero_vad: 0.66x
            the file size but 1.1-1.2x the latency with it on).
        upgrade_opset: Convert models below opset 10 instead of refusing them.
        external_data: Save tensors to ``<output>.data``; None decides by size (> 2 GB).
        check_runtime: Emit only operator/type combinations onnxruntime's CPU provider can
            execute (probed once per process); a node that cannot run stays float or uses a
            form that runs, and the summary says which and why.
        evaluate: After writing, measure how close the quantized outputs stay to the float
            ones (``DynamicQuantizationResult.fidelity``) on 4 random feeds when every model
            input is a float tensor; explicit ``eval_data`` is measured either way.
        progress: Show a progress bar while measuring.
        objective: ``"speed"``, ``"balanced"`` (default) or ``"size"``
            (:class:`onnxquant.core.objective.Objective`). QOperator form: with speed or
            balanced, a Conv/MatMul/Gemm whose dynamic form (DynamicQuantizeLinear +
            ConvInteger/MatMulInteger + rescaling) is measured slower than its float form stays
            float, with the reason in its decision (ConvInteger has no fused kernel: most
            Convs stay float); balanced quantizes such a node anyway under the rule of
            :func:`onnxquant.core.objective.balanced_accepts`. With size every node is
            quantized and the summary states the latency cost measured. Op types listed in
            ``op_types`` and nodes listed in ``nodes_to_quantize`` count as named by the user:
            they are quantized whatever they cost (``onnxquant.ort`` sets them from
            ``op_types_to_quantize``/``nodes_to_quantize``).
        measure_costs: Measure kernel costs on this machine (cached, see
            :mod:`onnxquant.core.costs`); None measures unless ``ONNXQUANT_MEASURE_COSTS=0``.
            Without measurements every selected node is quantized, as before.
        cost_model: A cost model to decide with instead of measuring (a table or a fake).
        latency_guard: With speed or balanced and costs measured, time the float and the
            quantized model on random feeds (float inputs only) and, when the quantized one
            is slower, rewrite it with its Convs, then every node not named by the user,
            kept float (:mod:`onnxquant.dynamic._latency_guard`).
    """

    weight_type: QuantType = INT8
    per_channel: bool = False
    per_channel_fallback_db: float | None = 30.0
    reduce_range: bool = False
    weight_symmetric: bool | None = None
    format: QuantFormat = QuantFormat.QOPERATOR
    op_types: Collection[str] | None = None
    op_types_to_exclude: Collection[str] = ()
    nodes_to_quantize: Collection[str] | None = None
    nodes_to_exclude: Collection[str] = ()
    matmul_const_b_only: bool = True
    fold_batchnorm: bool = True
    subgraphs: bool = False
    upgrade_opset: bool = False
    external_data: bool | None = None
    check_runtime: bool = True
    evaluate: bool = True
    progress: bool = False
    objective: Objective | str = Objective.BALANCED
    measure_costs: bool | None = None
    latency_guard: bool = True
    cost_model: CostModel | None = None

    def __post_init__(self) -> None:
        self.objective = as_objective(self.objective)

    @property
    def weights_symmetric(self) -> bool:
        """Resolved weight symmetry (signed types default to symmetric)."""
        if self.weight_symmetric is None:
            return self.weight_type.signed
        return self.weight_symmetric
