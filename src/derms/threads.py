"""Thread use of the numerical kernels: how many worker threads, and BLAS held to one.

The hot paths of the state estimator and the linearised model parallelise over batches
of right-hand sides in Python threads (SuperLU, scipy.sparse and numpy release the GIL).
OpenBLAS's own threads on top of them oversubscribe the cores: on this 2-core machine an
IEEE 8500 estimate took 1.48 s with OpenBLAS at 2 threads against 0.93 s at 1. Code that
runs its own threads holds BLAS to one thread with :func:`blas_single_thread`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
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


class _BlasLimit:
    """One process-wide BLAS limit shared by overlapping holders: the first to enter sets
    it, the last to leave restores what was there before. (Nested ``limit()`` contexts of
    threadpoolctl each restore what they saw on entry, so two overlapping threads left
    the process at the wrong count.) OpenBLAS only raises its thread count again from the
    thread that lowered it (measured: a restore from another thread left it at 1), so
    when the last holder is another thread the limit stays at one thread until the
    setting thread next leaves."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holders = 0
        self._limit = None
        self._owner: int | None = None

    def enter(self) -> None:
        with self._lock:
            if self._holders == 0 and self._limit is None:
                self._limit = _controller().limit(limits=1, user_api="blas")
                self._owner = threading.get_ident()
            self._holders += 1

    def exit(self) -> None:
        with self._lock:
            self._holders -= 1
            if (self._holders == 0 and self._limit is not None
                    and self._owner == threading.get_ident()):
                self._limit.restore_original_limits()
                self._limit, self._owner = None, None


@lru_cache(maxsize=1)
def _blas_limit() -> _BlasLimit:
    return _BlasLimit()


@contextmanager
def blas_single_thread() -> Iterator[None]:
    """Hold every loaded BLAS library to one thread inside the block (process-wide: while
    any thread is inside, all threads' BLAS calls run on one thread)."""
    limit = _blas_limit()
    limit.enter()
    try:
        yield
    finally:
        limit.exit()


def blas_single_threaded(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Decorator: run ``fn`` inside :func:`blas_single_thread`."""
    @wraps(fn)
    def run(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with blas_single_thread():
            return fn(*args, **kwargs)
    return run


@lru_cache(maxsize=1)
def _beside_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="derms-beside")


def run_beside(fn: Callable[..., _R], *args: object) -> Future:
    """Run ``fn(*args)`` in one background thread (shared, one job at a time) while the
    caller goes on, e.g. dense algebra (numpy/LAPACK release the GIL) beside OpenDSS
    solves (cffi releases it too). The caller takes ``.result()``; ``fn`` must only read
    what the caller may touch meanwhile."""
    return _beside_pool().submit(fn, *args)
