"""Checks produced files against docs/data-formats.md (column names and order)."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

DOC = Path(__file__).resolve().parents[1] / "docs" / "data-formats.md"


def documented_columns() -> dict[str, list[str]]:
    """{file name: [columns]} from the doc's ``### `file` `` sections and their tables."""
    out: dict[str, list[str]] = {}
    current = None
    for line in DOC.read_text().splitlines():
        m = re.match(r"^### `([^`]+)`", line)
        if m:
            current = m.group(1)
            continue
        if current and line.startswith("| ") and not line.startswith("| column") \
                and not line.startswith("|---"):
            out.setdefault(current, []).append(line.split("|")[1].strip())
    return out


def check_file(path: Path) -> None:
    """Assert ``path``'s columns equal the doc's table for its name (CSV or Parquet twin)."""
    cols = documented_columns()
    name = path.name
    key = name if name in cols else name.replace(".parquet", ".csv")
    assert key in cols, f"{name} is not documented in {DOC.name}"
    frame = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path, nrows=5)
    assert list(frame.columns) == cols[key], (name, list(frame.columns), cols[key])
