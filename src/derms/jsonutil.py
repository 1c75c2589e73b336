"""Values made fit for JSON: numpy scalars and arrays as Python values, NaN and infinite
floats as None (``json.dumps`` writes them as ``NaN`` / ``Infinity``, which is not JSON:
strict parsers refuse the file)."""

from __future__ import annotations

from typing import Any

import numpy as np


def jsonable(x: Any) -> Any:
    """``x`` with numpy scalars/arrays as Python values and non-finite floats as None,
    through dicts, lists and tuples."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x


__all__ = ["jsonable"]
