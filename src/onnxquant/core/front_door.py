"""The front door every mode enters through: load → validate → prepare, written once.

Also the output-side checks (an output never touches an input file) and the size of the input.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import onnx_ir as ir

from onnxquant.core import model_io
from onnxquant.core.errors import OutputPathError

__all__ = ["check_output", "protected_paths", "input_bytes"]


def protected_paths(model_input: Any) -> tuple[str, ...]:
    if isinstance(model_input, (str, os.PathLike)):
        return (os.fspath(model_input),)
    return ()


def check_output(model_input: Any, model_output: str | os.PathLike) -> None:
    out = Path(model_output)
    if isinstance(model_input, (str, os.PathLike)) and Path(model_input).resolve() == out.resolve():
        raise OutputPathError(
            f"the output path '{out}' is the input model; choose another output path "
            "(the input model is never overwritten)"
        )
    if not out.absolute().parent.is_dir():
        raise OutputPathError(f"output folder '{out.absolute().parent}' does not exist")


def input_bytes(model_input: Any, model: ir.Model) -> int:
    """Size of the float model on disk (file plus its external data), or of its tensors."""
    if isinstance(model_input, (str, os.PathLike)):
        path = Path(model_input)
        locations = {
            t.location for g in (model.graph, *model.graph.subgraphs())
            for v in g.initializers.values()
            if isinstance(t := v.const_value, ir.ExternalTensor)
        }
        extra = sum((path.parent / loc).stat().st_size for loc in locations
                    if (path.parent / loc).is_file())
        return path.stat().st_size + extra
    return model_io.model_size_bytes(model)


