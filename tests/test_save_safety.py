"""Outputs never touch inputs, and a save killed at any moment loses nothing.

- an output whose external-data file would be the input's data file is refused, before work;
- a hard-linked output, a missing or unwritable destination: an OutputPathError naming it;
- SIGKILL during the save of a ~100 MB model leaves the previous output byte-identical, and the
  next save in that folder sweeps the dead process's temporary folder.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from malformed_cases import base_model, feeds

import onnxquant
from onnxquant import OutputPathError
from onnxquant.core import model_io

MODES = {
    "static": lambda m, o, **kw: onnxquant.quantize_static(
        m, o, feeds(), onnxquant.StaticQuantConfig(**kw)),
    "dynamic": lambda m, o, **kw: onnxquant.quantize_dynamic(
        m, o, onnxquant.DynamicQuantConfig(**kw)),
    "weights": lambda m, o, **kw: onnxquant.quantize_weights(
        m, o, onnxquant.WeightOnlyConfig(block_size=32, **kw)),
}


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("mode", list(MODES))
def test_output_data_file_is_the_inputs_data(tmp_path: Path, mode: str) -> None:
    """Input model.onnx keeps its weights in q.onnx.data; writing q.onnx with external data
    there would overwrite them."""
    onnx.save(base_model(), str(tmp_path / "model.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=True, location="q.onnx.data", size_threshold=0)
    before = _files(tmp_path)
    with pytest.raises(OutputPathError, match=r"q\.onnx\.data"):
        MODES[mode](tmp_path / "model.onnx", tmp_path / "q.onnx", external_data=True)
    assert _files(tmp_path) == before


@pytest.mark.parametrize("mode", list(MODES))
def test_output_hard_linked_to_the_input(tmp_path: Path, mode: str) -> None:
    model = tmp_path / "model.onnx"
    onnx.save(base_model(), str(model))
    os.link(model, tmp_path / "q.onnx")
    before = _files(tmp_path)
    with pytest.raises(OutputPathError, match="q.onnx"):
        MODES[mode](model, tmp_path / "q.onnx")
    assert _files(tmp_path) == before


@pytest.mark.parametrize("mode", list(MODES))
def test_destination_inside_a_file(tmp_path: Path, mode: str) -> None:
    model = tmp_path / "model.onnx"
    onnx.save(base_model(), str(model))
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(OutputPathError, match="does not exist"):
        MODES[mode](model, tmp_path / "file" / "q.onnx")


def test_unwritable_destination_names_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                         ) -> None:
    """An OS refusal while saving (read-only folder, full disk) names the output, not a temp
    folder; nothing is left behind."""
    def refuse(*args: object, **kwargs: object) -> str:
        raise PermissionError(13, "Permission denied", str(tmp_path / ".onnxquant-x"))

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    model = ir.serde.deserialize_model(base_model())
    with pytest.raises(OutputPathError, match=r"q\.onnx.*Permission denied"):
        model_io.save_model(model, tmp_path / "q.onnx")
    assert list(tmp_path.iterdir()) == []


_SAVER = textwrap.dedent("""
    import sys
    import numpy as np
    import onnx_ir as ir
    from onnxquant.core import model_io
    big = np.random.default_rng(0).standard_normal(25_000_000).astype(np.float32)  # 100 MB
    value = ir.Value(name="big", const_value=ir.tensor(big, name="big"),
                     type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(big.shape))
    graph = ir.Graph([], [value], nodes=[], initializers=[value], opset_imports={"": 17})
    print("saving", flush=True)
    model_io.save_model(ir.Model(graph, ir_version=8), sys.argv[1])
""")


def test_sigkill_during_save_keeps_the_old_output(tmp_path: Path) -> None:
    out = tmp_path / "q.onnx"
    onnx.save(base_model(), str(out))
    old = out.read_bytes()
    script = tmp_path / "saver.py"
    script.write_text(_SAVER)
    proc = subprocess.Popen([sys.executable, str(script), str(out)], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"saving"
    partial = _wait_for_partial_file(tmp_path, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert out.read_bytes() == old  # the previous output is intact
    assert partial.parent.exists()  # the dead process's folder is still there ...
    model_io.save_model(ir.serde.deserialize_model(base_model()), tmp_path / "other.onnx")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".onnxquant-")]  # ... swept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.onnx", "q.onnx", "saver.py"]


def _wait_for_partial_file(folder: Path, proc: subprocess.Popen) -> Path:
    """The temporary model file once it has some bytes but is not complete."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        for tmp in folder.glob(".onnxquant-*/q.onnx"):
            size = tmp.stat().st_size if tmp.exists() else 0
            if 0 < size < 100_000_000:
                return tmp
        time.sleep(0.001)
    pytest.fail("the save finished or never started before it could be killed")


def test_input_bytes_unchanged_after_quantizing_external_data_models(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    onnx.save(base_model(), str(src / "model.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=0)
    before = _files(src)
    for mode, run in MODES.items():
        run(src / "model.onnx", tmp_path / f"{mode}.onnx", external_data=True)
        assert (tmp_path / f"{mode}.onnx.data").exists()
    assert _files(src) == before
    x = feeds(1)[0]
    import onnxruntime as ort

    got = ort.InferenceSession(str(tmp_path / "static.onnx")).run(None, x)[0]
    assert np.isfinite(got).all() and got.shape == x["x"].shape
