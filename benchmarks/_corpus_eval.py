"""Fidelity of a quantized corpus model against its float original (shared by the benchmarks).

The corpus is ../shared/corpus (see its README.md); its data.py is imported from there, or from
the folder named by QCORPUS_DIR.

    samples(name, split)                   -> list of feeds ("calib": 32, "eval": 64)
    model_path(name)                       -> path of the float model
    run_model(path, feeds)                 -> list of {output_name: array} (CPU, 1 intra-op thread)
    float_outputs(name, feeds)             -> run_model() of the float model, cached in memory
    fidelity(name, float_outs, quant_outs) -> float in [0, 1]; 1.0 = identical to the float model
    measure_name(name)                     -> what fidelity() measures for this model
    format_fidelity(name, value)           -> "93.8 %" for agreement rates, "0.974" otherwise

`python benchmarks/_corpus_eval.py [model ...]` checks each measure: the float model compared
with itself must score 1.0.
"""

from __future__ import annotations

import collections
import hashlib
import os
import sys
from pathlib import Path

import numpy as np

_DEFAULT_CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"
CORPUS_DIR = Path(os.environ.get("QCORPUS_DIR", _DEFAULT_CORPUS))


def corpus_data():
    """The corpus' data.py module."""
    if str(CORPUS_DIR) not in sys.path:
        sys.path.insert(0, str(CORPUS_DIR))
    import data

    return data


def model_names() -> list[str]:
    return list(corpus_data().LOADERS)


def model_path(name: str) -> str:
    return os.path.join(corpus_data().MODELS, f"{name}.onnx")


def samples(name: str, split: str) -> list[dict[str, np.ndarray]]:
    return corpus_data().samples(name, split)


def session(path: str):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def run_model(path: str, feeds) -> list[dict[str, np.ndarray]]:
    sess = session(path)
    names = [o.name for o in sess.get_outputs()]
    return [dict(zip(names, sess.run(None, feed), strict=True)) for feed in feeds]


# ------------------------------------------------------------------ float outputs cache
_FLOAT_CACHE: collections.OrderedDict = collections.OrderedDict()
_FLOAT_CACHE_SIZE = 2


def _fingerprint(feeds) -> str:
    h = hashlib.blake2b(digest_size=16)
    for feed in feeds:
        for k in sorted(feed):
            a = np.ascontiguousarray(feed[k])
            h.update(f"{k}{a.shape}{a.dtype}".encode())
            h.update(a.tobytes())
    return h.hexdigest()


def float_outputs(name: str, feeds) -> list[dict[str, np.ndarray]]:
    """Outputs of the float model on `feeds`; the last two (model, feeds) pairs are cached."""
    key = (name, _fingerprint(feeds))
    if key not in _FLOAT_CACHE:
        _FLOAT_CACHE[key] = run_model(model_path(name), feeds)
        while len(_FLOAT_CACHE) > _FLOAT_CACHE_SIZE:
            _FLOAT_CACHE.popitem(last=False)
    _FLOAT_CACHE.move_to_end(key)
    return _FLOAT_CACHE[key]


# ------------------------------------------------------------------ per-sample measures
def _first(out: dict) -> np.ndarray:
    return next(iter(out.values()))


def ctc_greedy(probs: np.ndarray, blank: int = 0) -> tuple[int, ...]:
    """Greedy CTC decode of [T, C] scores: argmax per step, merge repeats, drop blanks."""
    best = probs.argmax(-1)
    keep = np.ones(len(best), bool)
    keep[1:] = best[1:] != best[:-1]
    return tuple(int(c) for c in best[keep] if c != blank)


def _iou_text_map(f: dict, q: dict) -> float:
    a, b = _first(f) > 0.3, _first(q) > 0.3
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def _ctc_match(time_major: bool):
    def same(f: dict, q: dict) -> float:
        batch_axis = 1 if time_major else 0  # [T, 1, C] or [1, T, C]
        a, b = (np.squeeze(_first(o), batch_axis) for o in (f, q))
        return float(ctc_greedy(a) == ctc_greedy(b))

    return same


def _top1(f: dict, q: dict) -> float:
    return float(np.argmax(_first(f)) == np.argmax(_first(q)))


def _embedding(out: dict) -> np.ndarray:
    """The model's pooled sentence embedding, else the mean of last_hidden_state over tokens.

    The corpus feeds are single unpadded sentences (attention_mask all ones), so the plain mean
    is the mask-weighted mean.
    """
    if "sentence_embedding" in out:
        return out["sentence_embedding"].ravel()
    return out["last_hidden_state"][0].mean(0)


def _cosine(f: dict, q: dict) -> float:
    a, b = _embedding(f).astype(np.float64), _embedding(q).astype(np.float64)
    den = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / den) if den > 0 else float(np.array_equal(a, b))


def _speech(f: dict, q: dict) -> float:
    return float((_first(f).item() > 0.5) == (_first(q).item() > 0.5))


# name -> (description, per-sample measure, is a rate shown in %)
MEASURES = {
    "rapidocr_det_v4": ("IoU of text map >0.3", _iou_text_map, False),
    "rapidocr_rec_v4": ("CTC decode = float", _ctc_match(time_major=False), True),
    "rapidocr_cls_v2": ("top-1 agreement", _top1, True),
    "ddddocr_common": ("CTC decode = float", _ctc_match(time_major=True), True),
    "magika_v3_3": ("top-1 agreement", _top1, True),
    "minilm_l6": ("mean embedding cosine", _cosine, False),
    "silero_vad": ("speech (p>0.5) agreement", _speech, True),
}


def measure_name(name: str) -> str:
    return MEASURES[name][0]


def fidelity(name: str, float_outs, quant_outs) -> float:
    """Mean over samples of the model's measure; 1.0 means the same as the float model."""
    if len(float_outs) != len(quant_outs):
        raise ValueError(f"{len(float_outs)} float outputs vs {len(quant_outs)} quantized")
    measure = MEASURES[name][1]
    return float(np.mean([measure(f, q) for f, q in zip(float_outs, quant_outs, strict=True)]))


def format_fidelity(name: str, value: float | None) -> str:
    if value is None:
        return "–"
    return f"{100 * value:.1f} %" if MEASURES[name][2] else f"{value:.3f}"


def _self_check(names: list[str]) -> None:
    for name in names:
        outs = float_outputs(name, samples(name, "eval"))
        value = fidelity(name, outs, outs)
        print(f"{name:16s} {measure_name(name):26s} float vs float: {format_fidelity(name, value)}")
        assert value == 1.0, (name, value)


if __name__ == "__main__":
    _self_check(sys.argv[1:] or model_names())
