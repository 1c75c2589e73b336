"""The control loop's modules hold one responsibility each (DESIGN.md: a file past ~400
lines probably holds two). ``derms/control/loop.py`` had grown to 586 lines holding the
service, the (re)build on topology, fleet and model version changes, and the per-cycle
step; the re-plan was already apart. Its public names still come from
``derms.control.loop``."""

from __future__ import annotations

from pathlib import Path

import pytest

from derms.control import loop
from derms.control.loop import ControlLoop

CONTROL = Path(loop.__file__).resolve().parent
MAX_LINES = 400


@pytest.mark.parametrize("name", ["loop", "loop_build", "loop_cycle", "loop_replan"])
def test_each_loop_module_is_short(name):
    n = len((CONTROL / f"{name}.py").read_text().splitlines())
    assert n <= MAX_LINES, f"derms/control/{name}.py has {n} lines"


@pytest.mark.parametrize(("method", "module"), [
    ("__init__", "derms.control.loop"), ("status", "derms.control.loop"),
    ("_run", "derms.control.loop"), ("latest_state", "derms.control.loop"),
    ("build", "derms.control.loop_build"), ("_registry_rows", "derms.control.loop_build"),
    ("_version_in_force", "derms.control.loop_build"),
    ("run_once", "derms.control.loop_cycle"), ("_fleet", "derms.control.loop_cycle"),
    ("_audit_cycle", "derms.control.loop_cycle"),
    ("run_replan", "derms.control.loop_replan")])
def test_each_responsibility_lives_in_its_module(method, module):
    assert getattr(ControlLoop, method).__module__ == module


def test_the_public_names_are_where_they_were():
    assert loop.__all__ == ["ControlLoop", "DefaultControlConfig", "LoopConfig",
                            "assign_end_devices", "ensure_control_program"]
    for name in loop.__all__:
        assert getattr(loop, name) is not None
