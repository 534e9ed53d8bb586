"""Float-model corrections that make static quantization more accurate, all in numpy.

* :func:`smooth_quant` (Xiao et al. 2023): move activation outliers of MatMul/Gemm inputs into
  the weights. Exact rewrite; needs per-channel activation maxima.
* :func:`equalize_layers` (Nagel et al. 2019): cross-layer equalization of consecutive
  Conv/MatMul/Gemm weights. Exact rewrite; needs no data.
* :func:`correct_biases` (Nagel et al. 2019; Banner et al. 2019): subtract the mean output shift
  that a plan's weight rounding causes from the layers' biases. Needs per-channel input means
  and a plan; the caller plans again afterwards.

:func:`channel_statistics` collects the per-channel statistics; :func:`smoothing_tensors` and
:func:`bias_correction_tensors` say which tensors and axes. Every function changes the model it
is given (pass a copy) and returns the names of the tensors whose values changed.
"""

from onnxquant.static.corrections.bias_correction import (
    bias_correction_tensors,
    correct_biases,
    weight_rounding_error,
)
from onnxquant.static.corrections.channel_stats import ChannelStats, channel_statistics
from onnxquant.static.corrections.equalization import equalization_scales, equalize_layers
from onnxquant.static.corrections.smoothquant import (
    SmoothSite,
    smooth_quant,
    smoothing_scales,
    smoothing_sites,
    smoothing_tensors,
)

__all__ = [
    "ChannelStats",
    "channel_statistics",
    "SmoothSite",
    "smoothing_sites",
    "smoothing_tensors",
    "smoothing_scales",
    "smooth_quant",
    "equalize_layers",
    "equalization_scales",
    "bias_correction_tensors",
    "correct_biases",
    "weight_rounding_error",
]
