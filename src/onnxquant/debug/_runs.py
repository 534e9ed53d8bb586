"""The onnxruntime sessions of one comparison, and a fixed-bin streaming histogram."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from onnxquant.calibration.session import make_session
from onnxquant.core.errors import CalibrationError
from onnxquant.debug.matching import LayerMatch, Matching
from onnxquant.debug.report import Histogram
from onnxquant.debug.surgery import copy_model, cut_at_activations, expose

__all__ = ["Sessions", "StreamingHistogram"]

HISTOGRAM_BINS = 96
HISTOGRAM_VALUES = 1 << 16
"""Values per sample a histogram bins (an evenly strided subset of larger tensors)."""


class Sessions:
    """The float, quantized, exposed and cut sessions of one comparison."""

    def __init__(self, float_model: ir.Model, quantized_model: ir.Model, matching: Matching,
                 providers: Sequence[str], workdir: Path) -> None:
        self.providers = list(providers)
        self.workdir = workdir
        quant_outputs = {v.name for v in quantized_model.graph.outputs}
        self.output_names = [v.name or "" for v in float_model.graph.outputs
                             if v.name in quant_outputs]
        floats = copy_model(float_model)
        wanted = [m.reference for m in matching.layers] + list(matching.activations)
        wanted += list(matching.dynamic_inputs.values())
        self.float_names = [*self.output_names, *expose(floats, wanted)]
        self.float = make_session(floats, self.providers, workdir)
        external = [v.const_value for v in quantized_model.graph.initializers.values()
                    if isinstance(v.const_value, ir.ExternalTensor)]
        self.external_folder = str(Path(external[0].base_dir or ".").resolve()) \
            if external else None
        self.float_plain = self.optimized(float_model, "float")
        self.plain = self.optimized(quantized_model, "quantized")
        exposed = copy_model(quantized_model)
        fetch = [self.fetch_name(m) for m in matching.layers]
        fetch += [m.tensor.value.name or "" for m in matching.activations.values()]
        self.quant_names = expose(exposed, list(dict.fromkeys(fetch)))
        self.quant = make_session(exposed, self.providers, workdir)
        cut = copy_model(quantized_model)
        self.cut_inputs = cut_at_activations(cut, matching)
        self.cut_names = expose(cut, list(dict.fromkeys(self.fetch_name(m)
                                                        for m in matching.layers)))
        self.cut = make_session(cut, self.providers, workdir)
        self.cut_feed_names = {i.name for i in self.cut.get_inputs()}
        self.float_dtypes = {v.name: np.dtype(v.dtype.numpy()) for v in cut.graph.inputs
                             if v.name in self.cut_inputs and v.dtype is not None}

    @staticmethod
    def fetch_name(layer: LayerMatch) -> str:
        """The quantized-model tensor that carries the layer's output."""
        if layer.quantized is not None:
            return layer.quantized.value.name or ""
        return layer.layer.output.name or ""

    def layer_value(self, layer: LayerMatch, results: dict[str, np.ndarray]) -> np.ndarray:
        """The layer's output as a float array from one session's results."""
        value = results[self.fetch_name(layer)]
        return layer.quantized.params.dequantize(value, np.float32) \
            if layer.quantized is not None else value

    def from_proto(self, proto: onnx.ModelProto, tag: str) -> ort.InferenceSession:
        """An optimized session of a serialized variant of the quantized model (its external
        data, if any, read from the quantized model's folder)."""
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if self.external_folder is not None:
            options.add_session_config_entry(
                "session.model_external_initializers_file_folder_path", self.external_folder)
        try:
            return ort.InferenceSession(proto.SerializeToString(), options,
                                        providers=self.providers)
        except Exception as err:
            raise CalibrationError(f"onnxruntime could not load the {tag} model: {err}") from err

    def optimized(self, model: ir.Model, tag: str) -> ort.InferenceSession:
        """A session with onnxruntime's default optimizations (how the user runs the model)."""
        options = ort.SessionOptions()
        options.log_severity_level = 3
        try:
            external = any(isinstance(v.const_value, ir.ExternalTensor)
                           for v in model.graph.initializers.values())
            if not external:
                data = ir.serde.serialize_model(model).SerializeToString()
                return ort.InferenceSession(data, options, providers=self.providers)
            path = self.workdir / f"{tag}.onnx"
            ir.save(model, path, external_data=f"{tag}.onnx.data")
            return ort.InferenceSession(str(path), options, providers=self.providers)
        except Exception as err:
            raise CalibrationError(f"onnxruntime could not load the {tag} model: {err}") from err

    def run_outputs(self, feed: dict[str, np.ndarray], index: int,
                    floats: dict[str, np.ndarray] | None = None
                    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """The float and the quantized model's outputs, the quantized model run as the user
        runs it (the float outputs are taken from ``floats`` when given)."""
        try:
            reference = floats if floats is not None else \
                _run(self.float_plain, self.output_names, feed)
            return reference, _run(self.plain, self.output_names, feed)
        except Exception as err:
            raise CalibrationError(f"onnxruntime failed on sample {index}: {err}") from err

    def run_layers(self, feed: dict[str, np.ndarray], index: int
                   ) -> tuple[dict[str, np.ndarray], ...]:
        """(float values, exposed quantized values, cut values) of every matched tensor."""
        try:
            floats = _run(self.float, self.float_names, feed)
            floats.update(feed)
            quant = _run(self.quant, self.quant_names, feed)
            cut_feed = {k: v for k, v in feed.items() if k in self.cut_feed_names}
            for name, key in self.cut_inputs.items():
                cut_feed[name] = np.asarray(floats[key], dtype=self.float_dtypes[name])
            cut = _run(self.cut, self.cut_names, cut_feed)
        except KeyError as err:
            raise CalibrationError(f"sample {index}: tensor {err} was not computed") from err
        except Exception as err:
            raise CalibrationError(f"onnxruntime failed on sample {index}: {err}") from err
        return floats, quant, cut


def _run(session: ort.InferenceSession, names: list[str], feed: dict[str, np.ndarray]
         ) -> dict[str, np.ndarray]:
    """``{name: value}`` of the named outputs (none run when no name is asked for: onnxruntime
    would return every output)."""
    if not names:
        return {}
    return dict(zip(names, session.run(names, feed), strict=True))


class StreamingHistogram:
    """Counts of values in fixed bins around a clip range ``[low, high]`` (half a range of
    margin on each side), plus the counts and extremes beyond."""

    def __init__(self, low: float, high: float, bins: int = HISTOGRAM_BINS) -> None:
        span = max(high - low, 1e-12)
        self.low, self.high = low, high
        self.range = (low - span / 2, high + span / 2)
        self.counts = np.zeros(bins, np.int64)
        self.below = self.above = 0
        self.minimum, self.maximum = np.inf, -np.inf

    def update(self, values: np.ndarray) -> None:
        """Count one sample's values; the bins count an evenly strided subset of at most
        :data:`HISTOGRAM_VALUES` values (weighted by the stride), the tails and extremes all."""
        x = np.asarray(values).ravel()
        if x.dtype.kind != "f":
            x = x.astype(np.float64)
        finite = np.isfinite(x)
        if not finite.all():
            x = x[finite]
        if not x.size:
            return
        stride = -(-x.size // HISTOGRAM_VALUES)
        self.counts += np.histogram(x[::stride], bins=self.counts.size, range=self.range)[0] \
            * stride
        self.below += int(np.count_nonzero(x < self.range[0]))
        self.above += int(np.count_nonzero(x > self.range[1]))
        self.minimum = min(self.minimum, float(x.min()))
        self.maximum = max(self.maximum, float(x.max()))

    def result(self, tensor: str) -> Histogram:
        edges = np.linspace(self.range[0], self.range[1], self.counts.size + 1)
        return Histogram(tensor, edges, self.counts.copy(), self.below, self.above,
                         float(self.minimum), float(self.maximum), self.low, self.high)
