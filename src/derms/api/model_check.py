"""The registration check of a feeder model: compile it and solve its base case in a
short-lived child process, with a time limit.

A model can crash the native engine (a ``Redirect`` of itself segfaults OpenDSS) or take
long to compile; run in the shared engine worker, such a model answered 503 at every
retry and took the worker's queued studies down with it. A child of its own turns a crash
into an answer about the file and cannot hold up anything else.

    python -m derms.api.model_check MASTER   # exit 0: usable; 2: the reason on stderr
"""

from __future__ import annotations

import asyncio
import sys

CHECK_TIMEOUT_S = 300.0


def check_model(master: str) -> int:
    """Compile ``master`` and solve its base case; the number of buses. DermsError when it
    does not compile, defines no circuit or does not solve."""
    from derms.powerflow.engine import OpenDSSEngine

    with OpenDSSEngine(master) as engine:
        engine.solve_snapshot()
        return int(engine.circuit.NumBuses)


async def model_problem(master: str, timeout_s: float = CHECK_TIMEOUT_S) -> str | None:
    """None when ``master`` compiles and solves in a child process within ``timeout_s``,
    else what went wrong (the engine's message, a crash or the time limit)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "derms.api.model_check", master,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        _out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return f"compiling and solving it took more than {timeout_s:.0f} s"
    if proc.returncode == 0:
        return None
    text = err.decode("utf-8", "replace").strip().splitlines()
    if proc.returncode == 2 and text:
        return text[-1][:500]
    return (f"the engine crashed compiling or solving it (exit {proc.returncode}; a "
            "Redirect or Compile of the file itself does that)")


def main(argv: list[str] | None = None) -> int:
    from derms.errors import DermsError

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m derms.api.model_check MASTER", file=sys.stderr)
        return 2
    try:
        check_model(args[0])
    except DermsError as exc:
        print(str(exc).replace("\n", " "), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
