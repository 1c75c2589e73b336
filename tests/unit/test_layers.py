"""Layering (DESIGN.md): a module never imports a package of a higher layer."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "derms"
LAYER = {
    "errors": 0, "config": 0, "naming": 0, "threads": 0, "jsonutil": 0, "strict": 0,
    "grid": 1, "powerflow": 2, "der": 3, "analysis": 4,
    "forecast": 4, "dispatch": 4, "studies": 5, "store": 6, "devices": 6, "ingest": 6, "protocols": 7,
    "control": 8, "monitoring": 8, "timeutil": 0, "reports": 9, "api": 9, "ui": 9, "cli": 9, "sim": 9,
}
MODULES = sorted(p for p in SRC.rglob("*.py") if p.name != "__init__.py" or p.parent != SRC)


def _package(path: Path) -> str:
    rel = path.relative_to(SRC).parts
    return rel[0].removesuffix(".py")


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_no_upward_imports(path):
    own = LAYER[_package(path)]
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "derms" and len(parts) > 1:
                assert LAYER[parts[1]] <= own, f"{path.name} imports {name} (layer up)"


def test_physics_core_has_no_web_db_or_protocol_imports():
    banned = ("fastapi", "sqlalchemy", "paho", "pymodbus", "uvicorn", "psycopg")
    for path in MODULES:
        if _package(path) in ("grid", "powerflow", "der", "analysis", "dispatch"):
            text = path.read_text()
            assert not any(f"import {b}" in text or f"from {b}" in text for b in banned), path
