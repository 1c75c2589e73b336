"""Snapshot and restore of an engine's control state: transformer taps and capacitor steps.

Regulator taps and capacitor steps move as controls act during a solve, so two runs of the
same schedule can start from different states (measured: up to 10 kW at the IEEE 123 head).
Studies that compare cases or replay them capture the state once and restore it before
every run.
"""

from __future__ import annotations

from dataclasses import dataclass

from derms.powerflow.engine import OpenDSSEngine


@dataclass(frozen=True)
class ControlState:
    """Tap of every transformer winding (per unit) and state of every capacitor step."""

    taps: tuple[tuple[str, int, float], ...]  # (transformer, winding, tap_pu)
    capacitors: tuple[tuple[str, tuple[int, ...]], ...]  # (capacitor, step states 0/1)


def regulated_transformers(engine: OpenDSSEngine) -> tuple[str, ...]:
    """Names of the transformers a RegControl acts on (their taps move in a solve)."""
    rc = engine.circuit.RegControls
    out: list[str] = []
    k = rc.First
    while k > 0:
        out.append(rc.Transformer.lower())
        k = rc.Next
    return tuple(dict.fromkeys(out))


def capture_control_state(engine: OpenDSSEngine,
                          transformers: tuple[str, ...] | None = None) -> ControlState:
    """The engine's present transformer taps and capacitor states.

    ``transformers`` limits the taps read to those names (e.g.
    :func:`regulated_transformers`, cheap enough to capture every time step of a study);
    None reads every transformer.
    """
    c = engine.circuit
    taps: list[tuple[str, int, float]] = []
    tr = c.Transformers
    for name in (tr.AllNames if transformers is None else transformers):
        if name.lower() == "none":
            continue
        tr.Name = name
        for w in range(1, tr.NumWindings + 1):
            tr.Wdg = w
            taps.append((name.lower(), w, float(tr.Tap)))
    caps: list[tuple[str, tuple[int, ...]]] = []
    cp = c.Capacitors
    for name in cp.AllNames:
        if name.lower() == "none":
            continue
        cp.Name = name
        caps.append((name.lower(), tuple(int(s) for s in cp.States)))
    return ControlState(tuple(taps), tuple(caps))


def restore_control_state(engine: OpenDSSEngine, state: ControlState) -> None:
    """Set taps and capacitor states back to ``state``."""
    c = engine.circuit
    tr = c.Transformers
    for name, w, tap in state.taps:
        tr.Name = name
        tr.Wdg = w
        tr.Tap = tap
    cp = c.Capacitors
    for name, states in state.capacitors:
        cp.Name = name
        cp.States = list(states)


def freeze_base_case(engine: OpenDSSEngine) -> None:
    """Solve the base case with controls acting, then freeze them (taps, capacitors) and
    solve again at that state (ConvergenceError when it does not converge)."""
    engine.set_control_mode("static")
    engine.solve_snapshot()
    engine.set_control_mode("off")
    engine.solve_snapshot()

