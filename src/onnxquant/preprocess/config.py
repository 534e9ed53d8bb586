"""The settings of the pre-processing step (:func:`onnxquant.preprocess`)."""

from __future__ import annotations

import dataclasses
from pathlib import PurePath

from onnxquant.core.errors import QuantizationError

__all__ = ["PreprocessConfig"]


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
    """What pre-processing does, in this order: symbolic shapes, optimization, ONNX shapes.

    Attributes:
        symbolic_shapes: Run onnxruntime's symbolic shape inference, keeping what it
            inferred when it stops early (:mod:`onnxquant.preprocess.symbolic_shapes`).
        optimize: Optimize the graph with onnxruntime's basic level: constant folding,
            Identity/Dropout removal, Conv+BatchNormalization and Conv+Add folding,
            common-subexpression elimination (:mod:`onnxquant.preprocess.optimize`).
        onnx_shapes: Run ONNX shape inference with data propagation
            (:mod:`onnxquant.preprocess.onnx_shapes`).
        auto_merge: Symbolic inference merges conflicting symbolic dimensions instead of
            stopping at them (a guess: ``a`` and ``b`` are taken to be equal).
        int_max: The integer symbolic inference treats as unbounded (Slice ends).
        guess_output_rank: Symbolic inference gives the outputs of unknown ops the rank of
            their first input.
        external_data: True: weights of at least ``external_data_threshold`` bytes go to an
            external-data file; False: one file; None: external data only above 2 GB.
        external_data_name: The external-data file name, in the output's folder (default
            ``<output name>.data``).
        external_data_threshold: Bytes from which a tensor goes to the external-data file.
        upgrade_opset: Convert models below opset 10 to opset 13 instead of refusing them.
        model_type: Fuse a transformer with onnxruntime's transformer optimizer for this model
            type (``bert``, ``gpt2``, ``vit``, ...; :mod:`onnxquant.preprocess.transformers`):
            Attention, EmbedLayerNormalization, SkipLayerNormalization, BiasGelu — which
            dynamic quantization turns into QAttention and integer MatMuls. None: no fusion.
        num_heads: Attention heads for the fusion (0: read from the graph).
        hidden_size: Hidden size for the fusion (0: read from the graph).
    """

    symbolic_shapes: bool = True
    optimize: bool = True
    onnx_shapes: bool = True
    auto_merge: bool = False
    int_max: int = 2**31 - 1
    guess_output_rank: bool = False
    external_data: bool | None = None
    external_data_name: str | None = None
    external_data_threshold: int = 1024
    upgrade_opset: bool = False
    model_type: str | None = None
    num_heads: int = 0
    hidden_size: int = 0

    def __post_init__(self) -> None:
        if self.num_heads < 0 or self.hidden_size < 0:
            raise QuantizationError("num_heads and hidden_size must be 0 (read from the graph) "
                                    "or positive")
        if self.model_type is not None:
            from onnxquant.preprocess.transformers import MODEL_TYPES

            if self.model_type not in MODEL_TYPES:
                raise QuantizationError(
                    f"unknown model type '{self.model_type}'; onnxruntime's transformer "
                    f"optimizer knows {', '.join(MODEL_TYPES)}")
        if self.int_max < 1:
            raise QuantizationError(f"int_max must be a positive integer, got {self.int_max}")
        if self.external_data_threshold < 0:
            raise QuantizationError("external_data_threshold must be 0 or more bytes, got "
                                    f"{self.external_data_threshold}")
        name = self.external_data_name
        if name is not None and (not name or PurePath(name).name != name or name in (".", "..")
                                 or "\\" in name):
            raise QuantizationError(
                f"external_data_name '{name}' must be a plain file name (it is written next to "
                "the output model), e.g. model.onnx.data")
