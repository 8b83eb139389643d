"""The package's layers (docs/architecture.md): every module imports only from layers below its own.

Imports inside functions count too: a lazy import hides a cycle from Python, not from the reader.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mvtec_seg"

# component -> layer; a component may import only components of a strictly lower layer (or itself)
LAYERS: dict[str, int] = {
    "errors": 0,
    "config": 0,
    "interrupt": 0,
    "precision": 0,
    "io_utils": 1,
    "cli": 2,
    "summary": 2,
    "identity": 3,
    "metrics": 2,
    "data": 3,
    "models": 4,
    "viz": 4,
    "settings": 4,
    "loggers": 5,
    "callbacks": 5,
    "layout_metrics": 5,
    "native_metrics": 5,
    "outputs": 6,
    "builders": 6,
    "report": 6,
    "teacher": 7,
    "pseudo": 8,
    "inference": 8,
    "plan": 9,
    "preflight": 9,
    "train": 10,
    "predict": 10,
    "export": 10,
    "sweep": 11,
    "compare": 11,
    "__main__": 12,
}


def _component(module: str) -> str:
    """'mvtec_seg.models.base' -> 'models'; 'mvtec_seg' (the package itself) -> ''."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _internal_imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("mvtec_seg")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mvtec_seg"):
            if node.module == "mvtec_seg":  # `from mvtec_seg import viz`
                found |= {f"mvtec_seg.{a.name}" for a in node.names}
            else:
                found.add(node.module)
    return found


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)


def test_every_component_has_a_layer() -> None:
    components = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in MODULES}
    assert components == set(LAYERS)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_imports_only_go_down(path: Path) -> None:
    own = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
    for module in sorted(_internal_imports(path)):
        other = _component(module)
        assert other == own or LAYERS[other] < LAYERS[own], (
            f"{path.relative_to(PACKAGE)} (layer {LAYERS[own]}) imports {module} (layer {LAYERS[other]})"
        )
