"""The accuracy-target search (first slice: keeping nodes float): a planted difficulty is found
and fixed, a target that cannot be met returns the best model with met=False, the metrics
score as documented, and a callable metric receives the documented structure."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import target_models as tm

import onnxquant
from onnxquant.core.errors import QuantizationError
from onnxquant.target import candidates, search
from onnxquant.target.moves import Move
from onnxquant.target.scoring import score

DIM = tm.DIM


def _feeds(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    return tm.feeds(count, seed)


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
    onnx.save(tm.hidden_outlier(), path)
    return path


PLANTED = {  # model, feeds, config, what the search must find
    "activation outlier": (tm.input_outlier, tm.outlier_feeds, {}, "float: mm1"),
    "badly scaled weight": (tm.badly_scaled_weight, tm.feeds,
                            {"per_channel_fallback_db": None}, "per-channel weights"),
    "outlier channels": (tm.hidden_outlier, tm.feeds, {}, "SmoothQuant"),
    "unequal channels": (tm.unequal_cnn, tm.image_feeds, {"per_channel_fallback_db": None},
                         "cross-layer equalization"),
}


@pytest.mark.parametrize("case", PLANTED)
def test_search_finds_and_fixes_the_planted_difficulty(case: str, tmp_path: Path) -> None:
    build, feeds, options, fix = PLANTED[case]
    path = tmp_path / "float.onnx"
    onnx.save(build(), path)
    config = onnxquant.StaticQuantConfig(**options)
    default = tmp_path / "default.onnx"
    onnxquant.quantize_static(path, default, feeds(16, 1), config, eval_data=feeds(8, 2))
    assert _cosine(path, default, feeds(8, 3)) < 0.99  # the planted difficulty is real
    out = tmp_path / "q.onnx"
    target = onnxquant.AccuracyTarget("cosine", 0.999, eval_data=feeds(8, 2))
    found = onnxquant.quantize_static(path, out, feeds(16, 1), config, target=target).target
    assert found.met and found.score >= 0.999
    assert _cosine(path, out, feeds(8, 3)) >= 0.995  # on samples the search never saw
    if fix.startswith("float: "):  # exactly the planted layer, nothing else
        assert set(found.kept_float) == {fix[len("float: "):]} and not found.wide_tensors
    else:  # a whole-model change, no node kept at higher precision
        assert fix in found.changes and not found.kept_float and not found.wide_tensors
    assert found.steps[0].move == "defaults" and found.steps[0].score < 0.99
    assert all(s.latency is not None and s.latency > 0 for s in found.steps)
    frontier = found.frontier()
    assert [s.bytes for s in frontier] == sorted(s.bytes for s in frontier)
    assert [s.score for s in frontier] == sorted(s.score for s in frontier)
    assert fix in "\n".join(found.lines())


def test_a_gaining_16_bit_probe_is_kept_and_trimming_splits_groups(tmp_path: Path) -> None:
    """On the graph-input outlier, 16 bits everywhere gains without meeting the target and is
    kept; a group move then meets it, and trimming finds that one of its two layers suffices."""
    path = tmp_path / "float.onnx"
    onnx.save(tm.input_outlier(), path)
    target = onnxquant.AccuracyTarget("cosine", 0.999, eval_data=tm.outlier_feeds(8, 2))
    found = onnxquant.quantize_static(path, tmp_path / "q.onnx", tm.outlier_feeds(16, 1),
                                      target=target).target
    moves = {s.move: s for s in found.steps}
    probe = moves["16-bit activations everywhere"]
    assert probe.kept and probe.score > found.steps[0].score + 0.5
    assert moves["float every MatMul except mm2"].kept
    assert set(found.kept_float) == {"mm1"}


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
    assert "whole model: SmoothQuant" in proc.stdout and "size/accuracy frontier" in proc.stdout
    capped = subprocess.run(
        [sys.executable, "-m", "onnxquant", "static", str(outlier), "-o",
         str(tmp_path / "c.onnx"), "--calib", str(tmp_path / "calib"), "--eval",
         str(tmp_path / "eval"), "--target", "sqnr:500", "--target-evaluations", "2"],
        capture_output=True, text=True, timeout=300, check=False)
    assert capped.returncode == 0, capped.stderr
    assert "NOT met" in capped.stdout and "after 2 evaluations" in capped.stdout
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
    original = candidates.Candidates.build

    def build(self, state):  # type: ignore[no-untyped-def]
        if state.config.per_channel:
            raise QuantizationError("planted failure")
        return original(self, state)

    monkeypatch.setattr(candidates.Candidates, "build", build)
    target = onnxquant.AccuracyTarget("cosine", 0.999, eval_data=_feeds(8, 2))
    result = onnxquant.quantize_static(outlier, tmp_path / "q.onnx", _feeds(16, 1),
                                       target=target)
    failed = [s for s in result.target.steps if s.move.endswith("(failed)")]
    assert [s.move for s in failed] == ["per-channel weights (failed)"]
    assert result.target.met


def _scripted(monkeypatch: pytest.MonkeyPatch, scores: list[float], moves: list[Move]) -> None:
    """Scores come from ``scores`` in order; the node moves are ``moves``; no other moves."""
    values = iter(scores)
    original = candidates.Candidates.evaluate

    def evaluate(self, model):  # type: ignore[no-untyped-def]
        _, size, latency = original(self, model)
        return next(values), size, latency

    monkeypatch.setattr(candidates.Candidates, "evaluate", evaluate)
    monkeypatch.setattr(search, "config_moves", lambda state: [])
    monkeypatch.setattr(search, "correction_moves", lambda state, applicable: [])
    monkeypatch.setattr(search, "node_moves", lambda report, model, plan, state: moves)
    monkeypatch.setattr(search, "last_resort", lambda state: [])


def _float(node: str) -> Move:
    return Move(f"float layer {node}", lambda s: dataclasses.replace(
        s, keep_float={**s.keep_float, node: "test"}))


def test_trimming_undoes_an_unneeded_costly_move(outlier: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Once the target is met, float moves are undone latest first while the model still
    meets it: the later move is needed, the earlier one is not (scripted scores)."""
    _scripted(monkeypatch, [0.5, 0.7, 1.0, 0.5, 1.0],
              [_float("mm1"), _float("mm2")])
    monkeypatch.setattr(search._Search, "_probe", lambda self: None)
    target = onnxquant.AccuracyTarget("cosine", 0.99, eval_data=_feeds(8, 2))
    result = onnxquant.quantize_static(outlier, tmp_path / "q.onnx", _feeds(16, 1),
                                       target=target)
    steps = [(s.move, s.kept) for s in result.target.steps]
    assert steps == [("defaults", True), ("float layer mm1", True), ("float layer mm2", True),
                     ("undo: float layer mm2", False), ("undo: float layer mm1", True)]
    assert result.target.met and set(result.target.kept_float) == {"mm2"}
    assert result.plan.nodes["mm1"].action == "quantize"


def test_a_16_bit_probe_is_bisected_to_the_fewest_activations(
        outlier: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """16 bits everywhere meets the target; bisection over the activations (worst own error
    first) finds that the 2 worst suffice and the rest go back to 8 bits (scripted scores)."""
    _scripted(monkeypatch, [0.5, 1.0, 1.0, 0.5, 0.5], [])
    target = onnxquant.AccuracyTarget("cosine", 0.99, eval_data=_feeds(8, 2))
    result = onnxquant.quantize_static(outlier, tmp_path / "q.onnx", _feeds(16, 1),
                                       target=target)
    steps = [(s.move, s.kept) for s in result.target.steps]
    assert steps == [("defaults", True), ("16-bit activations everywhere", True),
                     ("16-bit for the 2 worst activations", True),
                     ("16-bit for the 1 worst activations", False),
                     ("undo: 16-bit for the 2 worst activations", False)]
    wide = [t for t, tq in result.plan.tensors.items() if tq.qtype == "uint16"]
    assert sorted(wide) == sorted(result.target.wide_tensors) and len(wide) == 2
    narrow = [t for t, tq in result.plan.tensors.items()
              if tq.role == "activation" and tq.qtype == "uint8"]
    assert len(narrow) == 2  # x, h, y, z: the other two
    assert "h" in wide  # the planted outlier channel has the worst own error


def test_the_ranking_is_made_again_when_moves_disappoint(
        outlier: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a kept move, two disappointing moves in a row send the search back to the report
    (on the new best model); moves already tried are not tried again."""
    _scripted(monkeypatch, [0.1, 0.2, 0.15, 0.15, 0.3, 0.25, 0.25],
              [_float("mm1"), _float("mm2"), _float("mm3"), _float("relu"), _float("x")])
    reports = []
    monkeypatch.setattr(search._Search, "_probe", lambda self: None)
    monkeypatch.setattr(search._Search, "_report", lambda self: reports.append(
        self.best.score) or None)
    target = onnxquant.AccuracyTarget("cosine", 0.99, eval_data=_feeds(8, 2),
                                      max_evaluations=7)
    result = onnxquant.quantize_static(outlier, tmp_path / "q.onnx", _feeds(16, 1),
                                       target=target)
    moves = [s.move for s in result.target.steps]
    assert moves == ["defaults", "float layer mm1", "float layer mm2", "float layer mm3",
                     "float layer relu", "float layer x"]
    assert reports == [0.1, 0.2]  # ranked again after mm2 and mm3 disappointed
    assert not result.target.met and "every move was tried" in result.target.reason
