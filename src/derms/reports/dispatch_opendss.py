"""A self-contained OpenDSS redirect set that replays a dispatch case in plain OpenDSS.

The folder (``DIR/opendss``) holds a copy of the feeder's files and small scripts written
with every parameter explicit; all paths inside are relative, so the folder can be
zipped and opened elsewhere::

    opendss/
      feeder/…                     copy of the feeder's files (as derms compiles them)
      settings.dss                 solver settings and the initial control state
                                   (every transformer winding tap, every capacitor state)
      customer_shapes.dss          yearly load shapes of the feeder's own loads
      der_elements.dss             one Load per DER = its net import (see below) with its
                                   own yearly shape holding the *uncontrolled* schedule
      apply_schedule.dss           the optimised schedule (edits the DER shapes)
      apply_schedule_rule_based.dss  the rule-based baseline (same form)
      run_uncontrolled.dss         redirects the above, adds a head monitor, solves
      run_optimised.dss            the same plus apply_schedule.dss
      run_rule_based.dss           the same plus apply_schedule_rule_based.dss

How derms simulates a DER, and so how the set represents it: a DER is an OpenDSS
``Load`` at its connection (constant P and Q at all voltages: ``model=1 vminpu=0
vmaxpu=1000 vlowpu=0``, ``kw=1 kvar=1``) whose yearly shape multipliers are its net
import [kW] and [kvar] per interval — consumption positive, so a PV exporting 5 kW is
-5 and a charging battery is positive (DESIGN sign convention). Native ``PVSystem`` /
``Storage`` models are *not* used on purpose: their defaults (``%reserve`` 20,
``%IdlingkW`` 1, 90 % efficiencies, inverter efficiency curves, cut-in/cut-out) would
change the replayed powers; the optimiser's battery model (SOC, efficiencies) is
already inside the net-import schedule.

Regulator taps carry over between QSTS runs of one engine (a tap inside its band does
not move), so a replay starts from the control state written in ``settings.dss``; derms
simulates the exported cases from the same state (:func:`restore_control_state`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from derms.der.models import Fleet
from derms.powerflow.control_state import (  # re-exported for callers of this module
    ControlState,
    capture_control_state,
    restore_control_state,
)
from derms.powerflow.engine import OpenDSSEngine, stage_copy
from derms.powerflow.profiles import SUPPORTED_CLASSES, Profiles, shared_shapes

__all__ = ["HEAD_MONITOR", "ControlState", "capture_control_state", "der_load_name",
           "restore_control_state", "write_opendss_replay"]

HEAD_MONITOR = "derms_head"  # monitor of the source's power (mode 1, P/Q per phase)
_FLAT = "derms_flat"


def der_load_name(der_id: str) -> str:
    """OpenDSS Load name of a DER in the exported set (lower case)."""
    return f"der_{der_id}".lower()


def _nums(values: np.ndarray) -> str:
    """Exact (shortest round-trip) decimal form of a float array, space separated."""
    return " ".join(repr(float(v)) for v in np.asarray(values, dtype=float).ravel())


def _shape(name: str, p: np.ndarray, q: np.ndarray, step_s: float) -> str:
    return (f"New LoadShape.{name} npts={p.size} sinterval={step_s:g} useactual=no\n"
            f"~ mult=[{_nums(p)}]\n~ qmult=[{_nums(q)}]\n")


def _settings(engine: OpenDSSEngine, state: ControlState, control_mode: str) -> str:
    s = engine.settings
    lines = ["! Solver settings derms applies after compiling, and the control state every",
             "! replayed case starts from (taps carry over between QSTS runs).",
             (f"Set maxiterations={s.max_iterations} maxcontroliter="
              f"{s.max_control_iterations} tolerance={s.tolerance!r}"),
             f"Set controlmode={control_mode}"]
    lines += [f"Edit Transformer.{n} wdg={w} tap={t!r}" for n, w, t in state.taps]
    lines += [f"Edit Capacitor.{n} states=[{' '.join(map(str, st))}]"
              for n, st in state.capacitors]
    return "\n".join(lines) + "\n"


def _customer_shapes(engine: OpenDSSEngine, profiles: Profiles) -> str:
    """The same load shapes derms gives the feeder's loads (flat where none)."""
    sec = profiles.step.total_seconds()
    known = {n.lower().split(".", 1)[0] for n in engine.circuit.AllElementNames}
    out = ["! Yearly shapes of the feeder's own loads (multipliers of each load's kW and",
           "! kvar); elements without a profile are held at their base value (flat).",
           f"New LoadShape.{_FLAT} npts=1 sinterval={sec:g} mult=[1] qmult=[1] useactual=no"]
    out += [f"BatchEdit {cls}..* yearly={_FLAT}" for cls in SUPPORTED_CLASSES if cls in known]
    shapes, of_element = shared_shapes(profiles)
    out += [_shape(f"cust_shape{i}", p, q, sec).rstrip("\n") for i, (p, q) in enumerate(shapes)]
    out += [f"Edit {element} yearly=cust_shape{i}"
            for element, i in zip(profiles.elements, of_element, strict=True)]
    return "\n".join(out) + "\n"


def _der_elements(fleet: Fleet, p_kw: np.ndarray, q_kvar: np.ndarray) -> str:
    sec = fleet.horizon.step.total_seconds()
    out = ["! One Load per DER: constant P/Q (model=1) whose yearly multipliers are the",
           "! DER's net import [kW], [kvar] per interval, consumption positive (a PV",
           "! exporting 5 kW is -5). This file holds the uncontrolled schedule."]
    for k, (d, kind) in enumerate(zip(fleet.ders, fleet.kinds)):
        c = d.connection
        name = der_load_name(d.der_id)
        bus = ".".join([c.bus, *(str(int(n)) for n in c.nodes)])
        out.append(f"! {d.der_id} ({kind})")
        out.append(_shape(name, p_kw[:, k], q_kvar[:, k], sec).rstrip("\n"))
        out.append(f"New Load.{name} bus1={bus} phases={c.phases} kv={c.kv!r} conn={c.conn} "
                   "model=1 kw=1 kvar=1 vminpu=0 vmaxpu=1000 vlowpu=0 status=variable "
                   f"yearly={name}")
    return "\n".join(out) + "\n"


def _apply(fleet: Fleet, p_kw: np.ndarray, q_kvar: np.ndarray, label: str) -> str:
    out = [f"! The {label} schedule: each DER's net import [kW], [kvar] per interval",
           "! (consumption positive) replaces its uncontrolled shape."]
    for k, d in enumerate(fleet.ders):
        name = der_load_name(d.der_id)
        out.append(f"Edit LoadShape.{name} mult=[{_nums(p_kw[:, k])}]")
        out.append(f"~ qmult=[{_nums(q_kvar[:, k])}]")
    return "\n".join(out) + "\n"


def _run(master_rel: str, fleet: Fleet, source: str, apply: str | None, label: str) -> str:
    h = fleet.horizon
    lines = [(f"! derms dispatch replay: the {label} case, {h.n_steps} intervals of "
              f"{h.step.total_seconds():g} s from {h.start.isoformat()} (UTC)."),
             "! Interval k (from 0) is the k-th yearly step after 'set time=(0,0)'.",
             f"Redirect {master_rel}",
             "Redirect settings.dss",
             "Redirect customer_shapes.dss",  # sets every load flat first: before the DERs
             "Redirect der_elements.dss"]
    if apply:
        lines.append(f"Redirect {apply}")
    lines += [f"New Monitor.{HEAD_MONITOR} element={source} terminal=1 mode=1 ppolar=no",
              "! head import [kW] = minus the monitor's P channels (power into the source)",
              f"Set mode=yearly stepsize={h.step.total_seconds():g}s number={h.n_steps}",
              "Set time=(0,0)",
              "Solve",
              f"! Export monitors {HEAD_MONITOR}"]
    return "\n".join(lines) + "\n"


def write_opendss_replay(out: Path, engine: OpenDSSEngine, fleet: Fleet,
                         customer_profiles: Profiles, state: ControlState, *,
                         uncontrolled: tuple[np.ndarray, np.ndarray],
                         optimised: tuple[np.ndarray, np.ndarray],
                         rule_based: tuple[np.ndarray, np.ndarray] | None = None,
                         control_mode: str = "static", source: str = "vsource.source"
                         ) -> dict[str, Path]:
    """Write the redirect set (see module docstring) to ``out`` (replaced if present).

    ``uncontrolled``/``optimised``/``rule_based`` are ``(p_kw, q_kvar)`` arrays
    (n_steps, n_der) of DER net import, consumption positive, in fleet order.
    ``engine`` is the compiled case (its source master and solve settings are used; it
    is not modified). Returns the paths of the run scripts.
    """
    out = Path(out).resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    master = stage_copy(engine.source_master, out)  # out/feeder/<…>/master.dss
    master_rel = master.relative_to(out).as_posix()
    (out / "settings.dss").write_text(_settings(engine, state, control_mode))
    (out / "customer_shapes.dss").write_text(_customer_shapes(engine, customer_profiles))
    (out / "der_elements.dss").write_text(_der_elements(fleet, *uncontrolled))
    (out / "apply_schedule.dss").write_text(_apply(fleet, *optimised, "optimised"))
    paths = {"uncontrolled": out / "run_uncontrolled.dss",
             "optimised": out / "run_optimised.dss"}
    paths["uncontrolled"].write_text(_run(master_rel, fleet, source, None, "uncontrolled"))
    paths["optimised"].write_text(_run(master_rel, fleet, source, "apply_schedule.dss",
                                       "optimised"))
    if rule_based is not None:
        (out / "apply_schedule_rule_based.dss").write_text(
            _apply(fleet, *rule_based, "rule-based"))
        paths["rule_based"] = out / "run_rule_based.dss"
        paths["rule_based"].write_text(_run(master_rel, fleet, source,
                                            "apply_schedule_rule_based.dss", "rule-based"))
    return paths
