"""The accuracy-target search (first slice: keeping nodes float): a planted difficulty is found
and fixed, a target that cannot be met returns the best model with met=False, the metrics
score as documented, and a callable metric receives the documented structure."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxquant
from onnxquant.core.errors import QuantizationError
from onnxquant.target.scoring import score

DIM = 16


def _outlier_chain(seed: int = 0) -> onnx.ModelProto:
    """x → MatMul(W1) → h → MatMul(W2) → y → MatMul(W3) → z; h's channel 0 is 500x the others
    (W1's column scaled up, W2's row scaled down: the float model is unchanged), so a per-tensor
    grid for h wipes out its other channels."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.3, (DIM, DIM)).astype(np.float32)
    w2 = rng.normal(0, 0.3, (DIM, DIM)).astype(np.float32)
    w3 = rng.normal(0, 0.3, (DIM, DIM)).astype(np.float32)
    w1[:, 0] *= 500.0
    w2[0, :] /= 500.0
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
         helper.make_node("MatMul", ["h", "w2"], ["y"], name="mm2"),
         helper.make_node("MatMul", ["y", "w3"], ["z"], name="mm3")],
        "outlier", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", DIM])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", DIM])],
        [numpy_helper.from_array(w, n) for w, n in ((w1, "w1"), (w2, "w2"), (w3, "w3"))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _feeds(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(size=(4, DIM)).astype(np.float32)} for _ in range(count)]


def _cosine(float_path: Path, quant_path: Path, feeds: list[dict]) -> float:
    ref = ort.InferenceSession(str(float_path), providers=["CPUExecutionProvider"])
    got = ort.InferenceSession(str(quant_path), providers=["CPUExecutionProvider"])
    values = []
    for feed in feeds:
        a, b = ref.run(None, feed)[0].ravel(), got.run(None, feed)[0].ravel()
        norms = float(np.linalg.norm(a) * np.linalg.norm(b))
        values.append(float(np.dot(a, b)) / norms if norms else 0.0)
    return float(np.mean(values))


@pytest.fixture(scope="module")
def outlier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("target") / "outlier.onnx"
    onnx.save(_outlier_chain(), path)
    return path


def test_defaults_fail_on_the_planted_outlier(outlier: Path, tmp_path: Path) -> None:
    out = tmp_path / "q.onnx"
    onnxquant.quantize_static(outlier, out, _feeds(16, 1), eval_data=_feeds(8, 2))
    assert _cosine(outlier, out, _feeds(8, 3)) < 0.99


def test_search_keeps_the_outlier_tensor_float(outlier: Path, tmp_path: Path) -> None:
    out = tmp_path / "q.onnx"
    target = onnxquant.AccuracyTarget("cosine", 0.999, eval_data=_feeds(8, 2))
    result = onnxquant.quantize_static(outlier, out, _feeds(16, 1), target=target)
    found = result.target
    assert found.met and found.score >= 0.999
    # The planted tensor h (written by mm1, read by mm2) is out of quantization; mm3 is not.
    assert {"mm1", "mm2"} <= set(found.kept_float) and "mm3" not in found.kept_float
    assert result.plan.nodes["mm3"].action == "quantize"
    # On samples the search never saw.
    assert _cosine(outlier, out, _feeds(8, 3)) >= 0.999
    assert found.steps[0].move == "defaults" and found.steps[0].score < 0.999
    assert len(found.steps) <= 24 + 4
    # Trimming tried to undo the float tensor once the target was met, and had to keep it.
    undo = [s for s in found.steps if s.move == "undo: float tensor h"]
    assert len(undo) == 1 and not undo[0].kept and undo[0].score < 0.999


def test_unreachable_target_returns_the_best_model(outlier: Path, tmp_path: Path) -> None:
    out = tmp_path / "q.onnx"
    target = onnxquant.AccuracyTarget("sqnr", 500.0, eval_data=_feeds(4, 2), max_evaluations=3)
    result = onnxquant.quantize_static(outlier, out, _feeds(16, 1), target=target)
    found = result.target
    assert not found.met and len(found.steps) == 3
    assert found.score == max(s.score for s in found.steps)
    assert out.exists() and "NOT met" in "\n".join(found.lines())


def test_callable_metric_gets_the_documented_structure(outlier: Path, tmp_path: Path) -> None:
    seen = []

    def metric(reference: list[dict[str, np.ndarray]],
               candidate: list[dict[str, np.ndarray]]) -> float:
        seen.append((len(reference), sorted(reference[0]), reference[0]["z"].shape,
                     len(candidate), sorted(candidate[0])))
        return 1.0

    target = onnxquant.AccuracyTarget(metric, 0.5, eval_data=_feeds(3, 2))
    result = onnxquant.quantize_static(outlier, tmp_path / "q.onnx", _feeds(16, 1),
                                       target=target)
    assert result.target.met
    assert seen == [(3, ["z"], (4, DIM), 3, ["z"])]


def test_scores_against_numpy() -> None:
    rng = np.random.default_rng(0)
    ref = [{"a": rng.normal(size=(2, 5)), "b": rng.normal(size=(3,))} for _ in range(4)]
    cand = [{k: v + rng.normal(size=v.shape) * 0.1 for k, v in r.items()} for r in ref]
    flat = [(np.concatenate([r["a"].ravel(), r["b"].ravel()]),
             np.concatenate([c["a"].ravel(), c["b"].ravel()]))
            for r, c in zip(ref, cand, strict=True)]
    cos = np.mean([np.dot(x, y) / np.linalg.norm(x) / np.linalg.norm(y) for x, y in flat])
    assert score("cosine", ref, cand) == pytest.approx(cos)
    x = np.concatenate([f[0] for f in flat])
    y = np.concatenate([f[1] for f in flat])
    assert score("sqnr", ref, cand) == pytest.approx(
        20 * np.log10(np.linalg.norm(x) / np.linalg.norm(x - y)))
    agree = [np.argmax(r[k], -1) == np.argmax(c[k], -1)
             for r, c in zip(ref, cand, strict=True) for k in r]
    assert score("argmax", ref, cand) == pytest.approx(
        sum(int(a.sum()) for a in agree) / sum(a.size for a in agree))


def test_bad_targets_are_refused() -> None:
    with pytest.raises(QuantizationError, match="unknown accuracy metric"):
        onnxquant.AccuracyTarget("top5", 0.9)
    with pytest.raises(QuantizationError, match="max_evaluations"):
        onnxquant.AccuracyTarget("cosine", 0.9, max_evaluations=0)


def test_cli_target(outlier: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    for folder, feeds in (("calib", _feeds(16, 1)), ("eval", _feeds(8, 2))):
        (tmp_path / folder).mkdir()
        for i, feed in enumerate(feeds):
            np.savez(tmp_path / folder / f"{i}.npz", **feed)
    proc = subprocess.run(
        [sys.executable, "-m", "onnxquant", "static", str(outlier), "-o",
         str(tmp_path / "q.onnx"), "--calib", str(tmp_path / "calib"), "--eval",
         str(tmp_path / "eval"), "--target", "cosine:0.999"],
        capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "target:       cosine >= 0.999 met" in proc.stdout
    assert "float: mm1" in proc.stdout and "float: mm2" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "onnxquant", "static", str(outlier), "-o",
                          str(tmp_path / "r.onnx"), "--target", "top5:1"],
                         capture_output=True, text=True, timeout=120, check=False)
    assert bad.returncode == 2 and "METRIC:SCORE" in bad.stderr


def test_calibrates_once(outlier: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every candidate (other calibration methods included) comes from one calibration pass."""
    from onnxquant.target import search

    calls = []
    original = search.calibrate_prepared

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(args[3].calibration_method)
        return original(*args, **kwargs)

    monkeypatch.setattr(search, "calibrate_prepared", counting)
    target = onnxquant.AccuracyTarget("sqnr", 500.0, eval_data=_feeds(4, 2), max_evaluations=6)
    result = onnxquant.quantize_static(outlier, tmp_path / "q.onnx", _feeds(16, 1),
                                       target=target)
    moves = [s.move for s in result.target.steps]
    assert moves[:5] == ["defaults", "calibration mse", "calibration percentile",
                         "calibration entropy", "per-channel weights"]
    assert len(calls) == 1 and calls[0].value == "mse"  # histograms, from which all derive


def test_a_failing_move_is_skipped(outlier: Path, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from onnxquant.target import search

    original = search._Candidates.build

    def build(self, keep, config=None):  # type: ignore[no-untyped-def]
        if config is not None and config.per_channel:
            raise QuantizationError("planted failure")
        return original(self, keep, config)

    monkeypatch.setattr(search._Candidates, "build", build)
    target = onnxquant.AccuracyTarget("cosine", 0.999, eval_data=_feeds(8, 2))
    result = onnxquant.quantize_static(outlier, tmp_path / "q.onnx", _feeds(16, 1),
                                       target=target)
    failed = [s for s in result.target.steps if s.move.endswith("(failed)")]
    assert [s.move for s in failed] == ["per-channel weights (failed)"]
    assert result.target.met


def test_trimming_undoes_an_unneeded_costly_move(outlier: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Once the target is met, 16-bit activations kept on the way are undone when the model
    still meets it without them, and a float move that is still needed stays (scripted scores:
    defaults 0.5, uint16 0.8, first node move 1.0, undo uint16 1.0, undo node move 0.5)."""
    from onnxquant.target import search

    scores = iter([0.5, 0.8, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    original = search._Candidates.evaluate

    def evaluate(self, model):  # type: ignore[no-untyped-def]
        _, size = original(self, model)
        return next(scores), size

    def moves(config):  # type: ignore[no-untyped-def]
        return [("uint16 activations", functools.partial(
            dataclasses.replace, activation_type=onnxquant.UINT16))]

    monkeypatch.setattr(search._Candidates, "evaluate", evaluate)
    monkeypatch.setattr(search, "_config_moves", moves)
    target = onnxquant.AccuracyTarget("cosine", 0.99, eval_data=_feeds(8, 2))
    result = onnxquant.quantize_static(outlier, tmp_path / "q.onnx", _feeds(16, 1),
                                       target=target)
    steps = [(s.move, s.kept) for s in result.target.steps]
    assert steps[:2] == [("defaults", True), ("uint16 activations", True)]
    assert steps[3] == ("undo: uint8 activations", True)
    assert steps[4][0].startswith("undo: float") and not steps[4][1]
    assert result.target.met and result.target.kept_float
    activations = [tq for tq in result.plan.tensors.values() if tq.role != "weight"]
    assert activations and all(tq.quant_type.bits == 8 for tq in activations)
