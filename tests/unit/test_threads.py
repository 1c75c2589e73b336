"""derms.threads: the BLAS limit held by overlapping threads is restored once, by the
last to leave (threadpoolctl's nested limits each restored what they saw on entry)."""

from __future__ import annotations

import threading

import numpy  # noqa: F401 - load the BLAS libraries the limit acts on
import scipy.linalg  # noqa: F401
from threadpoolctl import threadpool_info

from derms.threads import blas_single_thread, solve_workers


def _blas_threads() -> set[int]:
    return {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}


def test_a_holder_restores_the_original_count():
    before = _blas_threads()
    with blas_single_thread():
        assert _blas_threads() == {1}
        with blas_single_thread():  # nested
            assert _blas_threads() == {1}
        assert _blas_threads() == {1}
    assert _blas_threads() == before


def test_overlapping_holders_restore_the_original_count():
    before = _blas_threads()
    entered, release = threading.Event(), threading.Event()

    def other():
        with blas_single_thread():
            entered.set()
            release.wait(5)

    t = threading.Thread(target=other)
    with blas_single_thread():
        t.start()
        entered.wait(5)
        assert _blas_threads() == {1}
    assert _blas_threads() == {1}  # the other thread still holds it
    release.set()
    t.join(5)
    # the other thread left last; OpenBLAS takes the count back only from the thread
    # that lowered it: at its next exit
    with blas_single_thread():
        pass
    assert _blas_threads() == before


def test_solve_workers_is_at_least_one():
    assert 1 <= solve_workers() <= 4
