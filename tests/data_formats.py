"""Checks produced files against docs/data-formats.md (column names and order)."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

DOC = Path(__file__).resolve().parents[1] / "docs" / "data-formats.md"


def documented_columns() -> dict[tuple[str, str], list[str]]:
    """{(command, file name): [columns]} from the doc: ``## `derms cmd …` `` sections,
    ``### `file` `` subsections and their tables."""
    out: dict[tuple[str, str], list[str]] = {}
    command = current = None
    for line in DOC.read_text().splitlines():
        m = re.match(r"^## `(derms [a-z-]+(?: [a-z-]+)?)", line)
        if m:
            command, current = m.group(1).split(" MASTER")[0].strip(), None
            continue
        if line.startswith("### "):
            current = re.findall(r"`([^`]+)`", line)   # several files may share a table
            continue
        if current and line.startswith("| ") and not line.startswith("| column") \
                and not line.startswith("|---"):
            for name in current:
                out.setdefault((command, name), []).append(line.split("|")[1].strip())
    return out


def check_file(path: Path, command: str) -> None:
    """Assert ``path``'s columns equal the doc's table for it (CSV or its Parquet twin)."""
    cols = documented_columns()
    name = path.name
    key = (command, name)
    if key not in cols:
        key = (command, name.replace(".parquet", ".csv"))
    assert key in cols, f"{command}: {name} is not documented in {DOC.name}"
    frame = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path, nrows=5)
    assert list(frame.columns) == cols[key], (name, list(frame.columns), cols[key])
