"""The registration check of a feeder model: compile it and solve its base case in a
short-lived child process, with a time limit; what the model has (its buses with their
nodes and its transformers, :class:`~derms.grid.elements.ModelElements`) comes back from
the child as JSON on stdout, to be stored with the version (the registry checks device
and meter buses against it without compiling anything).

A model can crash the native engine (a ``Redirect`` of itself segfaults OpenDSS) or take
long to compile; run in the shared engine worker, such a model answered 503 at every
retry and took the worker's queued studies down with it. A child of its own turns a crash
into an answer about the file and cannot hold up anything else.

    python -m derms.api.model_check MASTER   # exit 0: usable, its elements as JSON on
                                             # stdout; 2: the reason on stderr
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from dataclasses import dataclass

from derms.grid.elements import ModelElements

CHECK_TIMEOUT_S = 300.0


def check_model(master: str) -> ModelElements:
    """Compile ``master`` and solve its base case; its buses (with their nodes) and
    transformers. DermsError when it does not compile, defines no circuit or does not
    solve."""
    from derms.powerflow.engine import OpenDSSEngine

    with OpenDSSEngine(master) as engine:
        engine.solve_snapshot()
        return ModelElements.from_names(engine.node_names(),
                                        engine.circuit.Transformers.AllNames)


@dataclass(frozen=True)
class ModelCheck:
    """The check's answer: ``problem`` (None: usable) and, when usable, its elements."""

    problem: str | None
    elements: ModelElements | None = None


def _answer(returncode: int, out: bytes, err: bytes) -> ModelCheck:
    if returncode == 0:
        try:
            # the last line: anything the engine printed comes before it
            line = out.decode("utf-8", "replace").strip().splitlines()[-1]
            return ModelCheck(None, ModelElements.from_json(json.loads(line)))
        except (ValueError, TypeError, AttributeError, IndexError):
            return ModelCheck(None)  # usable, but what it has is not known
    text = err.decode("utf-8", "replace").strip().splitlines()
    if returncode == 2 and text:
        return ModelCheck(text[-1][:500])
    return ModelCheck(f"the engine crashed compiling or solving it (exit {returncode}; a "
                      "Redirect or Compile of the file itself does that)")


def _command(master: str) -> list[str]:
    return [sys.executable, "-m", "derms.api.model_check", master]


async def inspect_model(master: str, timeout_s: float = CHECK_TIMEOUT_S) -> ModelCheck:
    """Compile ``master`` and solve it in a child process within ``timeout_s``: what went
    wrong (the engine's message, a crash or the time limit), or its elements."""
    proc = await asyncio.create_subprocess_exec(
        *_command(master), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return ModelCheck(f"compiling and solving it took more than {timeout_s:.0f} s")
    return _answer(proc.returncode, out, err)


def inspect_model_sync(master: str, timeout_s: float = CHECK_TIMEOUT_S) -> ModelCheck:
    """:func:`inspect_model` for a worker thread (a version stored before its elements
    were: done once, then stored)."""
    try:
        done = subprocess.run(_command(master), capture_output=True, timeout=timeout_s,
                              check=False)
    except subprocess.TimeoutExpired:
        return ModelCheck(f"compiling and solving it took more than {timeout_s:.0f} s")
    return _answer(done.returncode, done.stdout, done.stderr)


async def model_problem(master: str, timeout_s: float = CHECK_TIMEOUT_S) -> str | None:
    """None when ``master`` compiles and solves in a child process within ``timeout_s``,
    else what went wrong (:func:`inspect_model`)."""
    return (await inspect_model(master, timeout_s)).problem


def main(argv: list[str] | None = None) -> int:
    from derms.errors import DermsError

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m derms.api.model_check MASTER", file=sys.stderr)
        return 2
    try:
        elements = check_model(args[0])
    except DermsError as exc:
        print(str(exc).replace("\n", " "), file=sys.stderr)
        return 2
    sys.stdout.write("\n" + json.dumps(elements.to_json()) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
