"""Dynamic quantization of recurrent and transformer contrib operators.

One rewrite per operator, each ``(graph, node, config, unique_name) -> (changed, note)``; a
rewrite that cannot apply leaves the graph untouched and returns ``(False, reason)``.

* LSTM → DynamicQuantizeLSTM (:mod:`onnxquant.dynamic.lstm`)
* Attention → DynamicQuantizeLinear + QAttention (:mod:`onnxquant.dynamic.attention`)
* EmbedLayerNormalization → QEmbedLayerNormalization (:mod:`onnxquant.dynamic.embed`)
"""

from __future__ import annotations

from onnxquant.dynamic.attention import rewrite_attention
from onnxquant.dynamic.embed import rewrite_embed_layer_norm
from onnxquant.dynamic.lstm import rewrite_lstm

__all__ = ["rewrite_lstm", "rewrite_attention", "rewrite_embed_layer_norm"]
