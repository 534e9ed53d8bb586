"""The package's house rules: rooms import only from rooms below them, and the public names do
not change when modules move."""

from __future__ import annotations

import ast
from pathlib import Path

import onnxquant
import onnxquant.ort

PACKAGE = Path(onnxquant.__file__).parent

# Each room may import from the rooms before it in this list (and from itself), never after.
ROOMS = ["core", "preprocess", "calibration", "dynamic", "emitters", "static", "weight_only",
         "debug", "target", "ort", "cli"]


def _imports(path: Path) -> set[str]:
    """Every ``onnxquant.<room>`` module a file imports (at any depth, lazily or not)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "onnxquant":
                names.update(f"onnxquant.{alias.name}" for alias in node.names)
            elif node.module.startswith("onnxquant."):
                names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("onnxquant."))
    return names


def test_every_module_lives_in_a_room() -> None:
    loose = sorted(p.name for p in PACKAGE.glob("*.py")
                   if p.name not in ("__init__.py", "__main__.py"))
    assert loose == []
    rooms = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists())
    assert set(rooms) <= set(ROOMS), set(rooms) - set(ROOMS)


def test_imports_flow_one_way() -> None:
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        room = path.relative_to(PACKAGE).parts[0]
        if room not in ROOMS:
            continue
        rank = ROOMS.index(room)
        for module in _imports(path):
            target = module.split(".")[1]
            if target in ROOMS and ROOMS.index(target) > rank:
                wrong.append(f"{path.relative_to(PACKAGE)} imports {module}")
            if target == "__version__" and room != "cli":
                wrong.append(f"{path.relative_to(PACKAGE)} imports the package root")
    assert wrong == []


def test_no_import_cycle_between_modules() -> None:
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        graph[name] = {m for m in _imports(path)}
    known = set(graph)
    for name in graph:
        graph[name] = {m for m in graph[name] if m in known and m != name}
    state: dict[str, int] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = 1
        for dep in graph[name]:
            if state.get(dep) == 1:
                cycle = trail[trail.index(dep):] + [dep] if dep in trail else [name, dep]
                raise AssertionError(" -> ".join(cycle))
            if dep not in state:
                visit(dep, trail + [dep])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


PUBLIC = [
    "preprocess", "PreprocessConfig", "PreprocessResult",
    "quantize_static", "quantize_dynamic", "quantize_weights", "compare", "ComparisonReport",
    "AccuracyTarget",
    "DynamicQuantConfig",
    "DynamicQuantizationResult", "calibrate", "WeightOnlyConfig", "WeightOnlyAlgorithm",
    "GPTQSettings", "WeightOnlyResult", "WeightOnlyConfigError", "CalibrationResult",
    "QuantizationResult", "StaticQuantConfig", "TensorOverride", "TensorConvert", "QuantFormat",
    "Objective",
    "CalibrationMethod", "CalibrationDataReader", "QuantPlan", "QuantType", "INT4", "UINT4",
    "INT8", "UINT8", "INT16", "UINT16", "FLOAT8E4M3FN", "PerTensor", "PerAxis", "PerBlock",
    "QuantizationError",
    "ModelLoadError", "UnsupportedModelError", "CalibrationError", "FeedError", "NumericsError",
    "OutputPathError",
]

ORT_PUBLIC = [
    "CalibrationDataReader", "CalibrationMethod", "DynamicQuantConfig", "QuantFormat",
    "QuantType", "StaticQuantConfig", "quantize", "quantize_dynamic", "quantize_static",
]


def test_public_names_are_pinned() -> None:
    assert sorted(set(onnxquant.__all__) - {"__version__"}) == sorted(PUBLIC)
    for name in PUBLIC:
        assert getattr(onnxquant, name) is not None
    for name in ORT_PUBLIC:
        assert hasattr(onnxquant.ort, name), name
