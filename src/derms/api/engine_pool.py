"""OpenDSS work requested over HTTP runs in a worker *process*, never in the server's threads.

dss-python engine contexts used from the server's worker threads crashed the process
later, when another context was created on a different thread (a segmentation fault in
``NewContext``, reproduced under pytest after a dispatch or constraint-forecast request;
the same family as the monitoring-cycle crash in docs/ARCHITECTURE.md). A one-process
pool (spawned, started on first use, reused) isolates every engine from the server: the
server stays up even if the native engine crashes, and each request's engines live and
die on the worker's main thread. Functions sent to it must be top-level and take and
return picklable values.
"""

from __future__ import annotations

import asyncio
import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from derms.api.problems import Problem


class EnginePool:
    """A lazily started single-worker process pool; restarted if the worker died."""

    def __init__(self, workers: int = 1) -> None:
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers,
                                             mp_context=multiprocessing.get_context("spawn"))
        return self._pool

    async def run(self, func: Callable[..., Any], *args: Any) -> Any:
        """Run ``func(*args)`` in the worker; a crashed worker is a 503 and is replaced."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor(), func, *args)
        except BrokenProcessPool:
            self.close()
            raise Problem(503, "the power-flow worker stopped unexpectedly; retry the "
                               "request") from None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
