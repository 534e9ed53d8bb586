"""onnxruntime's ``quantization.fusions``: passes that replace a pattern of basic ops by one node.

:class:`Fusion` is the base; :class:`FusionGelu` (Erf sequence -> ``com.microsoft.Gelu``) and
:class:`FusionLayerNormalization` (ReduceMean sequence -> ``LayerNormalization``) are the
fusions. Each works on an :class:`onnxquant.ort.onnx_model.ONNXModel` in place and
``apply()`` returns whether it changed the model.
"""

from __future__ import annotations

from onnxquant.ort.fusions.fusion import Fusion
from onnxquant.ort.fusions.fusion_gelu import FusionGelu
from onnxquant.ort.fusions.fusion_layernorm import FusionLayerNormalization

__all__ = ["Fusion", "FusionGelu", "FusionLayerNormalization"]
