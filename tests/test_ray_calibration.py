"""Calibration on a Ray cluster: ranges identical to one process for every method, a shard
whose feed fails is named in the error, a worker that dies is replaced and its shard retried,
and a clear message when Ray is missing. GPTQ's Hessians summed on Ray agree with one process
to float64 rounding, and so do the weights quantized with them.

One local Ray cluster bound to 127.0.0.1 (2 CPUs, no dashboard) serves the whole module; the
backend uses it as it is (a Ray initialised in the process) and does not shut it down.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import model_zoo as zoo
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

import onnxquant
from onnxquant import CalibrationMethod, QuantizationError, StaticQuantConfig
from onnxquant.calibration import ray_cluster
from onnxquant.calibration.observers import MinMaxObserver
from onnxquant.cli.main import build_parser
from onnxquant.cli.static import static_config_from_args
from onnxquant.cli.weights import weights_config_from_args
from onnxquant.weight_only import calib
from onnxquant.weight_only.config import WeightOnlyConfig, WeightOnlyConfigError

METHODS = list(CalibrationMethod)


@pytest.fixture(scope="module")
def cluster():
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'onnxquant[ray]')")
    # The backend's own start: ray.init(address="local", num_cpus=2, include_dashboard=False)
    # listening on 127.0.0.1 only. Every test below uses this Ray as it is (initialised in the
    # process) and leaves it running; the module shuts it down at the end.
    with ray_cluster.ray_session(None, workers=2):
        # FlakyObserver (below) travels to the workers by value: tests/ is not on their path.
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
        assert ray.nodes()[0]["NodeManagerAddress"] == "127.0.0.1"
        yield ray
    assert not ray.is_initialized()


def _config(method: CalibrationMethod, **kwargs) -> StaticQuantConfig:
    return StaticQuantConfig(calibration_method=method, **kwargs)


def _on_ray(method: CalibrationMethod) -> StaticQuantConfig:
    return _config(method, calibration_backend="ray", calibration_workers=2)


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.value)
def test_ranges_equal_one_process_for_every_method(cluster, method):
    model = zoo.transformer_block()
    # 19 feeds: shards of 8, 8 and 3 over two workers; the dynamic axes vary.
    feeds = zoo.random_feeds(model, 10, seed=1, dims={"B": 2, "S": 5})
    feeds += zoo.random_feeds(model, 9, seed=3, dims={"B": 1, "S": 11})
    one = onnxquant.calibrate(model, feeds, _config(method))
    ray = onnxquant.calibrate(model, feeds, _on_ray(method))
    assert ray.samples == one.samples == 19
    assert ray.ranges == one.ranges  # exactly equal floats
    assert ray.unobserved == one.unobserved
    for name, observer in one.statistics.items():
        got = ray.statistics[name]
        if hasattr(observer, "counts"):
            assert np.array_equal(got.counts, observer.counts), name
            assert (got.count, got.low, got.high) == (observer.count, observer.low, observer.high)
        else:
            assert (got.low, got.high, got.batches) == (observer.low, observer.high,
                                                        observer.batches), name


def test_subgraph_model_ranges_equal_one_process(cluster):
    model = zoo.if_subgraph_model()  # tensors inside If branches (pairs only)
    feeds = zoo.random_feeds(model, 11, seed=4)
    method = CalibrationMethod.ENTROPY
    one = onnxquant.calibrate(model, feeds, _config(method))
    ray = onnxquant.calibrate(model, feeds, _on_ray(method))
    assert ray.samples == one.samples == 11
    assert ray.ranges == one.ranges


def test_quantize_static_on_ray_writes_the_same_model(cluster, tmp_path):
    model = zoo.cnn()
    feeds = zoo.random_feeds(model, 12, seed=2, dims={"N": 2})
    local = onnxquant.quantize_static(model, tmp_path / "local.onnx", feeds,
                                      _config(CalibrationMethod.PERCENTILE))
    ray = onnxquant.quantize_static(model, tmp_path / "ray.onnx", feeds,
                                    _on_ray(CalibrationMethod.PERCENTILE))
    assert ray.calibration_samples == local.calibration_samples
    assert (tmp_path / "ray.onnx").read_bytes() == (tmp_path / "local.onnx").read_bytes()


def _reshape_model() -> onnx.ModelProto:
    """x[1, D] -> Reshape to [-1, 4] -> MatMul: onnxruntime fails when D is not a multiple of 4
    (a feed that passes validation, so the worker raises)."""
    weight = np.arange(16, dtype=np.float32).reshape(4, 4) / 16
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["r"]),
         helper.make_node("MatMul", ["r", "w"], ["y"])],
        "reshape", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "D"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [helper.make_tensor("shape", TensorProto.INT64, [2], [-1, 4]),
         onnx.numpy_helper.from_array(weight, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_failing_feed_names_the_shard_and_the_workers(cluster):
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.normal(size=(1, 8)).astype(np.float32)} for _ in range(20)]
    feeds[11] = {"x": rng.normal(size=(1, 6)).astype(np.float32)}
    with pytest.raises(onnxquant.CalibrationError) as caught:
        onnxquant.calibrate(_reshape_model(), feeds, _on_ray(CalibrationMethod.MINMAX))
    message = str(caught.value)
    assert "shard 1 (feeds 8-15)" in message
    assert "failed on two Ray workers" in message
    assert "worker 1 (" in message and "worker 0 (" in message  # tried, then retried
    assert "feed 11" in message  # onnxruntime's error, naming the feed


@dataclasses.dataclass
class FlakyObserver(MinMaxObserver):
    """A MinMax observer whose worker process dies on its first update while ``marker``
    exists (exactly one worker removes the file and exits)."""

    marker: str = ""

    def update(self, pairs: np.ndarray) -> None:
        try:
            os.remove(self.marker)
        except FileNotFoundError:
            pass
        else:
            os._exit(1)
        super().update(pairs)


def _minmax_model() -> ir.Model:
    """x -> ReduceMin/ReduceMax -> Concat: a (min, max) pair per feed, as augmented models
    expose them."""
    graph = helper.make_graph(
        [helper.make_node("ReduceMin", ["x"], ["lo"], keepdims=0),
         helper.make_node("ReduceMax", ["x"], ["hi"], keepdims=0),
         helper.make_node("Unsqueeze", ["lo", "axes"], ["lo1"]),
         helper.make_node("Unsqueeze", ["hi", "axes"], ["hi1"]),
         helper.make_node("Concat", ["lo1", "hi1"], ["pair"], axis=0)],
        "pairs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 5])],
        [helper.make_tensor_value_info("pair", TensorProto.FLOAT, [2])],
        [helper.make_tensor("axes", TensorProto.INT64, [1], [0])])
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))


def test_a_worker_that_dies_is_replaced_and_its_shard_retried(cluster, tmp_path: Path):
    rng = np.random.default_rng(1)
    feeds = [{"x": rng.normal(size=(3, 5)).astype(np.float32) * (i + 1)} for i in range(21)]
    marker = tmp_path / "die-once"
    marker.touch()
    observers = {"pair": FlakyObserver(marker=str(marker))}
    samples = ray_cluster.run_on_ray(
        _minmax_model(), {"pair": "pair"}, observers, iter(feeds),
        providers=["CPUExecutionProvider"], workers=2, address=None, total=None,
        progress=False)
    assert not marker.exists()  # a worker did die
    assert samples == 21 and observers["pair"].batches == 21  # never fewer samples
    values = np.stack([f["x"] for f in feeds])
    assert (observers["pair"].low, observers["pair"].high) == (float(values.min()),
                                                                float(values.max()))


def test_missing_ray_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(ray_cluster, "ray_available", lambda: False)
    with pytest.raises(QuantizationError, match=r"pip install 'onnxquant\[ray\]'"):
        StaticQuantConfig(calibration_backend="ray")
    with pytest.raises(onnxquant.CalibrationError, match=r"pip install 'onnxquant\[ray\]'"):
        ray_cluster.run_on_ray(_minmax_model(), {}, {}, iter([]), providers=[], workers=1,
                               address=None, total=None, progress=False)


@pytest.mark.parametrize(("fields", "message"), [
    ({"calibration_backend": "dask"}, "calibration_backend must be one of"),
    ({"ray_address": "10.0.0.5:6379"}, "calibration_backend is not 'ray'"),
    ({"calibration_workers": 0}, "calibration_workers must be an int >= 1"),
])
def test_backend_fields_are_checked(fields, message):
    with pytest.raises(QuantizationError, match=message):
        StaticQuantConfig(**fields)


def test_bad_ray_address_is_refused(monkeypatch):
    monkeypatch.setattr(ray_cluster, "ray_available", lambda: True)
    with pytest.raises(QuantizationError, match="ray_address must be 'host:port'"):
        StaticQuantConfig(calibration_backend="ray", ray_address="my cluster")
    config = StaticQuantConfig(calibration_backend="ray", ray_address="ray://head:10001")
    assert config.ray_address == "ray://head:10001"


def test_cli_ray_option_becomes_the_config(monkeypatch):
    monkeypatch.setattr(ray_cluster, "ray_available", lambda: True)
    parser = build_parser()
    base = ["static", "m.onnx", "-o", "q.onnx", "--calib", "data"]
    local = static_config_from_args(parser.parse_args(base))
    assert (local.calibration_backend, local.ray_address) == ("local", None)
    started = static_config_from_args(parser.parse_args([*base, "--ray", "--workers", "3"]))
    assert (started.calibration_backend, started.ray_address,
            started.calibration_workers) == ("ray", None, 3)
    remote = static_config_from_args(parser.parse_args([*base, "--ray", "10.1.2.3:6379"]))
    assert (remote.calibration_backend, remote.ray_address) == ("ray", "10.1.2.3:6379")
    with pytest.raises(SystemExit):
        parser.parse_args(["static", "-o", "q.onnx", "--ray", "m.onnx"])


# --------------------------------------------------------------------------- GPTQ Hessians
def _gptq_model() -> onnx.ModelProto:
    """x[B, S, 32] -> MatMul (32x64) -> Relu -> MatMul (64x32), and x -> MatMul (32x32): three
    GPTQ targets over two distinct A inputs that are not graph inputs, plus x itself."""
    rng = np.random.default_rng(5)
    weights = {"w0": rng.normal(size=(32, 64)) / 6, "w1": rng.normal(size=(64, 32)) / 8,
               "w2": rng.normal(size=(32, 32)) / 6}
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w0"], ["h"], name="mm0"),
         helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w1"], ["y"], name="mm1"),
         helper.make_node("MatMul", ["x", "w2"], ["z"], name="mm2")],
        "gptq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(w.astype(np.float32), name) for name, w in weights.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _gptq_config(**kwargs) -> WeightOnlyConfig:
    return WeightOnlyConfig(algorithm="gptq", block_size=16, evaluate=False, **kwargs)


def test_gptq_hessians_and_weights_match_one_process(cluster, tmp_path, monkeypatch):
    rng = np.random.default_rng(6)
    # 12 feeds: shards 0-7 and 8-11 on two workers; 8+ rows each, so sums fold on both sides
    feeds = [{"x": rng.normal(size=(2, 4 + i % 3, 32)).astype(np.float32)} for i in range(12)]
    collected: dict[str, dict] = {}
    collect = calib.collect_hessians

    def spy(*args, **kwargs):
        accumulators, samples = collect(*args, **kwargs)
        collected[kwargs["backend"]] = accumulators
        return accumulators, samples

    monkeypatch.setattr(calib, "collect_hessians", spy)
    results = {}
    for backend, extra in [("local", {}), ("ray", {"calibration_workers": 2})]:
        config = _gptq_config(calibration_backend=backend, **extra)
        results[backend] = onnxquant.quantize_weights(
            _gptq_model(), tmp_path / f"{backend}.onnx", config, feeds)
    assert results["ray"].calibration_samples == results["local"].calibration_samples == 12
    one, ray = collected["local"], collected["ray"]
    assert sorted(ray) == sorted(one) == ["r", "x"]
    for name in one:
        assert ray[name].samples == one[name].samples
        np.testing.assert_allclose(ray[name].hessian(), one[name].hessian(), rtol=1e-12,
                                   atol=0)
    local = {t.name: onnx.numpy_helper.to_array(t)
             for t in onnx.load(tmp_path / "local.onnx").graph.initializer}
    remote = {t.name: onnx.numpy_helper.to_array(t)
              for t in onnx.load(tmp_path / "ray.onnx").graph.initializer}
    assert sorted(remote) == sorted(local)
    for name, want in local.items():
        got = remote[name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        if want.dtype == np.uint8:  # packed codes (and zero points): a rounding tie at most
            assert int((got != want).sum()) <= 2, name
        else:
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=0, err_msg=name)


def test_gptq_failing_shard_is_named(cluster):
    rng = np.random.default_rng(2)
    feeds = [{"x": rng.normal(size=(1, 8)).astype(np.float32)} for _ in range(20)]
    feeds[11] = {"x": rng.normal(size=(1, 6)).astype(np.float32)}  # Reshape fails on 6
    model = ir.from_proto(_reshape_model())
    with pytest.raises(onnxquant.CalibrationError) as caught:
        calib.collect_hessians(model, {"r": 4}, feeds, backend="ray", workers=2)
    message = str(caught.value)
    assert "shard 1 (feeds 8-15)" in message and "failed on two Ray workers" in message
    assert "worker 1 (" in message and "worker 0 (" in message
    assert "feed 11" in message


def test_weight_only_backend_fields_and_cli(monkeypatch):
    monkeypatch.setattr(ray_cluster, "ray_available", lambda: True)
    with pytest.raises(WeightOnlyConfigError, match="calibration_backend must be one of"):
        WeightOnlyConfig(calibration_backend="dask")
    with pytest.raises(WeightOnlyConfigError, match="needs calibration_backend='ray'"):
        WeightOnlyConfig(calibration_workers=2)
    with pytest.raises(WeightOnlyConfigError, match="ray_address must be 'host:port'"):
        WeightOnlyConfig(calibration_backend="ray", ray_address="my cluster")
    parser = build_parser()
    base = ["weights", "m.onnx", "-o", "q.onnx", "--algorithm", "gptq", "--calib", "data"]
    local = weights_config_from_args(parser.parse_args(base))
    assert (local.calibration_backend, local.ray_address, local.calibration_workers) == (
        "local", None, 1)
    remote = weights_config_from_args(
        parser.parse_args([*base, "--ray", "10.1.2.3:6379", "--workers", "4"]))
    assert (remote.calibration_backend, remote.ray_address, remote.calibration_workers) == (
        "ray", "10.1.2.3:6379", 4)
    monkeypatch.setattr(ray_cluster, "ray_available", lambda: False)
    with pytest.raises(onnxquant.CalibrationError, match=r"pip install 'onnxquant\[ray\]'"):
        calib.collect_hessians(ir.from_proto(_gptq_model()), {"x": 32}, [], backend="ray")
