"""Thread use of the numerical kernels: how many worker threads, and BLAS held to one.

The hot paths of the state estimator and the linearised model parallelise over batches
of right-hand sides in Python threads (SuperLU, scipy.sparse and numpy release the GIL).
OpenBLAS's own threads on top of them oversubscribe the cores: on this 2-core machine an
IEEE 8500 estimate took 1.48 s with OpenBLAS at 2 threads against 0.93 s at 1. Code that
runs its own threads holds BLAS to one thread with :func:`blas_single_thread`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache, wraps
from typing import ParamSpec, TypeVar

from threadpoolctl import ThreadpoolController

MAX_WORKERS = 4
_P = ParamSpec("_P")
_R = TypeVar("_R")


def solve_workers() -> int:
    """Worker threads for batched solves: the CPUs this process may run on, at most
    ``MAX_WORKERS``."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        n = os.cpu_count() or 1
    return max(1, min(MAX_WORKERS, n))


@lru_cache(maxsize=1)
def _controller() -> ThreadpoolController:
    return ThreadpoolController()  # the BLAS libraries loaded by now (numpy's, scipy's)


@contextmanager
def blas_single_thread() -> Iterator[None]:
    """Hold every loaded BLAS library to one thread inside the block (process-wide)."""
    with _controller().limit(limits=1, user_api="blas"):
        yield


def blas_single_threaded(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Decorator: run ``fn`` inside :func:`blas_single_thread`."""
    @wraps(fn)
    def run(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with blas_single_thread():
            return fn(*args, **kwargs)
    return run
