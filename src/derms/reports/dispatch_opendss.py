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
      apply_schedule_base.dss      the base case: every DER at zero (the reference of the
                                   pre-existing-violation rule)
      case_<case>.dss              redirects the above for one case (uncontrolled,
                                   rule_based, optimised, base), adds a head monitor and
                                   sets yearly mode one interval per ``Solve``; no solve
      run_<case>.dss               ``Redirect case_<case>.dss`` and solves every interval
      monitored_nodes.csv          the node-phases the voltage criterion checks
      monitored_branches.csv       the branch conductors the thermal criterion checks,
                                   with the rating used and whether it is a default
      limits.json                  limits, tolerances and the counting rule

Counting violations from the set alone (what ``violations_*`` in summary.json are):
step ``case_<case>.dss`` and ``case_base.dss`` one ``Solve`` at a time, read every node's
voltage [pu on the bus's kV base] and the current magnitude of every listed branch
conductor, and apply the rule in ``limits.json`` (also docs/data-formats.md).

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

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from derms.analysis.constraints import Limits
from derms.der.models import Fleet
from derms.powerflow.collect import NetworkIndex
from derms.powerflow.control_state import (  # re-exported for callers of this module
    ControlState,
    capture_control_state,
    restore_control_state,
)
from derms.powerflow.engine import OpenDSSEngine, stage_copy
from derms.powerflow.profiles import SUPPORTED_CLASSES, Profiles, shared_shapes

__all__ = ["CASES", "HEAD_MONITOR", "ControlState", "capture_control_state", "der_load_name",
           "limits_document", "monitored_branches_table", "monitored_nodes_table",
           "restore_control_state", "write_opendss_replay"]

HEAD_MONITOR = "derms_head"  # monitor of the source's power (mode 1, P/Q per phase)
_FLAT = "derms_flat"
CASES = ("uncontrolled", "rule_based", "optimised", "base")
_DEFAULT_LINE_RATING_A = (400.0, 600.0)  # OpenDSS Line normamps / emergamps defaults
_DEFAULT_XFMR_NORMHKVA = 1.1  # OpenDSS Transformer normhkva default: 110 % of kVA


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


def _case_script(master_rel: str, fleet: Fleet, source: str, apply: str | None,
                 label: str) -> str:
    """Set up one case without solving: each later ``Solve`` advances one interval."""
    h = fleet.horizon
    lines = [(f"! derms dispatch replay: the {label} case, {h.n_steps} intervals of "
              f"{h.step.total_seconds():g} s from {h.start.isoformat()} (UTC)."),
             "! Set up only: after this file every 'Solve' advances one interval (yearly",
             "! mode, number=1); interval k (from 0) is the (k+1)-th Solve.",
             f"Redirect {master_rel}",
             "Redirect settings.dss",
             "Redirect customer_shapes.dss",  # sets every load flat first: before the DERs
             "Redirect der_elements.dss"]
    if apply:
        lines.append(f"Redirect {apply}")
    lines += [f"New Monitor.{HEAD_MONITOR} element={source} terminal=1 mode=1 ppolar=no",
              "! head import [kW] = minus the monitor's P channels (power into the source)",
              f"Set mode=yearly stepsize={h.step.total_seconds():g}s number=1",
              "Set time=(0,0)"]
    return "\n".join(lines) + "\n"


def _run(fleet: Fleet, case: str, label: str) -> str:
    h = fleet.horizon
    return "\n".join([
        f"! derms dispatch replay: the {label} case, all {h.n_steps} intervals in one Solve.",
        f"Redirect case_{case}.dss",
        f"Set number={h.n_steps}",
        "Solve",
        f"! Export monitors {HEAD_MONITOR}"]) + "\n"


def monitored_nodes_table(index: NetworkIndex) -> pd.DataFrame:
    """The node-phases the voltage criterion checks: every node numbered 1-3 (conductor
    numbers above 3 are neutrals), in the engine's ``AllNodeNames`` order. ``measure``:
    ``ln`` (node to ground) or ``ll`` (a node of an ungrounded 3-wire area, measured line
    to line against ``partner``, the next phase node of its bus: ``|V - V_partner| /
    (sqrt(3) kVBase)``; :mod:`derms.powerflow.voltage_measure`)."""
    keep = index.node_phase <= 3
    bus, ph = index.node_bus[keep].astype(str), index.node_phase[keep]
    names = np.array([f"{b}.{p}" for b, p in zip(index.node_bus.astype(str),
                                                 index.node_phase)], dtype=object)
    pair = index.v_pair if index.v_pair is not None else np.full(names.size, -1)
    partner = np.where(pair >= 0, names[np.maximum(pair, 0)], "")[keep]
    return pd.DataFrame({"node": names[keep], "bus": bus, "phase": ph,
                         "kv_base_ln": index.node_kv_base_ln[keep],
                         "measure": np.where(pair[keep] >= 0, "ll", "ln"),
                         "partner": partner})


def monitored_branches_table(index: NetworkIndex) -> pd.DataFrame:
    """The branch conductors the thermal criterion checks: the phase conductors of
    terminal 1 of every two-terminal series PD element with a normal rating > 0.

    ``rating_is_default``: the rating is OpenDSS's default, not one given in the model —
    lines/reactors at 400 A normal and 600 A emergency, transformers whose normal rating
    is 110 % of their nameplate current (``normhkva`` not given)."""
    el = index.branch_element.astype(str)
    norm, emerg = index.branch_norm_a, index.branch_emerg_a
    is_x = ~np.isnan(index.xfmr_rated_a)
    with np.errstate(invalid="ignore"):
        xfmr_default = is_x & np.isclose(norm, _DEFAULT_XFMR_NORMHKVA * index.xfmr_rated_a,
                                         rtol=1e-6)
    line_default = ~is_x & (norm == _DEFAULT_LINE_RATING_A[0]) & \
        (emerg == _DEFAULT_LINE_RATING_A[1])
    # conductor k of terminal 1 = k-th occurrence of the element in the index (from 1)
    cond = pd.Series(el).groupby(el).cumcount().to_numpy() + 1
    out = pd.DataFrame({"element": el, "conductor": cond, "phase": index.branch_phase,
                        "bus1": index.branch_bus1.astype(str),
                        "bus2": index.branch_bus2.astype(str), "norm_amps": norm,
                        "emerg_amps": emerg, "rating_is_default": xfmr_default | line_default})
    return out[norm > 0].reset_index(drop=True)


def limits_document(limits: Limits, n_steps: int) -> dict:
    """``limits.json``: the limits and the rule that turns replayed values into counts."""
    return {
        "v_min_pu": limits.v_min_pu, "v_max_pu": limits.v_max_pu,
        "v_tol_pu": limits.v_tol_pu, "thermal_pct": limits.thermal_pct,
        "thermal_tol_pct": limits.thermal_tol_pct,
        "energised_min_pu": limits.energised_min_pu, "n_steps": n_steps,
        "base_case": "case_base.dss",
        "voltage": "v [pu] = node voltage magnitude / the bus's kV base, nodes of "
                   "monitored_nodes.csv (measure 'ln'); for measure 'll' (ungrounded "
                   "3-wire areas) |V_node - V_partner| / (sqrt(3) x the kV base, LN) from "
                   "the complex node voltages; skipped while v < energised_min_pu. Under: "
                   "v < v_min_pu - v_tol_pu; over: v > v_max_pu + v_tol_pu.",
        "thermal": "loading [%] = 100 * |I| of the conductor (terminal 1) / norm_amps, "
                   "conductors of monitored_branches.csv. Over: loading > thermal_pct + "
                   "thermal_tol_pct.",
        "pre_existing": "a (node-phase or conductor, interval) pair over a limit in the case "
                        "that is over the same limit in the base case (same interval; for "
                        "under-voltage only if the base node is energised) is pre-existing: "
                        "it counts only if it got worse than the base value by more than "
                        "the tolerance (under: v < v_base - v_tol_pu; over: v > v_base + "
                        "v_tol_pu; thermal: loading > loading_base + thermal_tol_pct).",
        "counts": "violations_<case> in summary.json = number of (node-phase or conductor, "
                  "interval) pairs over a limit that are not pre-existing, plus the "
                  "pre-existing pairs that got worse (under- and over-voltage and thermal "
                  "summed); the base case itself has none by definition.",
    }


def write_opendss_replay(out: Path, engine: OpenDSSEngine, fleet: Fleet,
                         customer_profiles: Profiles, state: ControlState, *,
                         uncontrolled: tuple[np.ndarray, np.ndarray],
                         optimised: tuple[np.ndarray, np.ndarray],
                         rule_based: tuple[np.ndarray, np.ndarray] | None = None,
                         control_mode: str = "static", source: str = "vsource.source",
                         index: NetworkIndex | None = None, limits: Limits | None = None,
                         ) -> dict[str, Path]:
    """Write the redirect set (see module docstring) to ``out`` (replaced if present).

    ``uncontrolled``/``optimised``/``rule_based`` are ``(p_kw, q_kvar)`` arrays
    (n_steps, n_der) of DER net import, consumption positive, in fleet order.
    ``engine`` is the compiled case (its source master and solve settings are used; it
    is not modified). ``index`` (of the simulated circuit) and ``limits``: write
    ``monitored_nodes.csv``, ``monitored_branches.csv`` and ``limits.json``. Returns the
    paths of the run scripts (``run_<case>``) and the case scripts (``case_<case>``).
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
    zero = np.zeros((fleet.horizon.n_steps, len(fleet.ders)))
    (out / "apply_schedule_base.dss").write_text(
        _apply(fleet, zero, zero, "base-case (no DER: every DER at zero)"))
    cases = {"uncontrolled": (None, "uncontrolled"),
             "optimised": ("apply_schedule.dss", "optimised"),
             "base": ("apply_schedule_base.dss", "base (no DER)")}
    if rule_based is not None:
        (out / "apply_schedule_rule_based.dss").write_text(
            _apply(fleet, *rule_based, "rule-based"))
        cases["rule_based"] = ("apply_schedule_rule_based.dss", "rule-based")
    paths: dict[str, Path] = {}
    for case, (apply, label) in cases.items():
        paths[f"case_{case}"] = out / f"case_{case}.dss"
        paths[f"case_{case}"].write_text(_case_script(master_rel, fleet, source, apply,
                                                      label))
        paths[case] = out / f"run_{case}.dss"
        paths[case].write_text(_run(fleet, case, label))
    if index is not None:
        lim = limits or Limits()
        monitored_nodes_table(index).to_csv(out / "monitored_nodes.csv", index=False)
        monitored_branches_table(index).to_csv(out / "monitored_branches.csv", index=False,
                                               float_format="%.10g")
        (out / "limits.json").write_text(
            json.dumps(limits_document(lim, fleet.horizon.n_steps), indent=2) + "\n")
    return paths
