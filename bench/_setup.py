"""Shared start of the bench scripts (imports nothing heavy, so it runs before numpy loads).

``prepare(blas_threads)`` pins OpenBLAS to that many threads (it must be set before numpy
is imported: on this shared 2-core machine 2 threads made the dense algebra 2-10x slower
and erratic whenever another process held a core) and puts the repository's ``src`` and
root on ``sys.path`` (so ``derms`` and the ``tests`` helpers import from a checkout).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def prepare(blas_threads: int | None) -> Path:
    """Pin BLAS threads (None: leave as is) and make ``derms``/``tests`` importable."""
    if blas_threads is not None:
        os.environ["OPENBLAS_NUM_THREADS"] = str(blas_threads)
    for path in (str(REPO), str(REPO / "src")):
        if path not in sys.path:
            sys.path.insert(0, path)
    return REPO
