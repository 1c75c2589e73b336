"""Interconnection check: can ``p_kw`` of PV, battery or EV charging connect at a bus with a
static limit, and with a flexible (managed) connection how much would it be curtailed
over a horizon (typically a year of hourly forecasts)?

The new device is one connection point at the bus (a zero-load element on the phases
asked for; its power split equally over them) and the question is an operating envelope
problem with a single connection point whose capacity is the device size:

* **fast** (:func:`flexible_connection`): :func:`derms.analysis.envelopes.compute_envelopes`
  over the horizon — linear sensitivities, every interval AC-checked and corrected — gives
  the largest output the network takes in each interval (``allowed_kw``); the device's
  available output is ``p_kw x device_pu[t]``; the curtailment is what exceeds the
  allowance. The **static** answer: the largest size that would never need curtailment
  (the smallest allowance over the intervals where the device runs, scaled by its
  profile) and whether ``p_kw`` is within it.
* **reference** (:func:`curtailment_reference`): a QSTS over the same horizon in which
  each interval where the device at its available output breaks a limit is curtailed by
  bisection on the full AC model until none is broken (what a flexible-connection
  controller with perfect information would do).

Both use the same limits (DESIGN "Violation": 0.95-1.05 pu with 0.001 pu tolerance, 100 %
of normal ratings with 1 %, pre-existing violations held to their base value) and the same
control treatment: regulators and capacitors act in the base case and are held at each
interval's base-case state for the checks (``controls="frozen"``).

Directions: ``pv`` exports, ``load`` (EV charging) imports, ``battery`` both (its
available power in each direction is its full size in every interval).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

from derms.analysis.constraints import MAX_SIZE_KW, Limits
from derms.analysis.envelope_network import ConnectionPoint, EnvelopeNetwork
from derms.analysis.envelopes import EnvelopeCriteria, compute_envelopes, horizon_limits
from derms.analysis.hosting_capacity import Site
from derms.errors import InputError
from derms.powerflow.engine import OpenDSSEngine
from derms.powerflow.profiles import Profiles

Kind = Literal["pv", "load", "battery"]
KINDS = ("pv", "load", "battery")
_NEW = "newconn__"
_DIRECTIONS = {"pv": ("export",), "load": ("import",), "battery": ("export", "import")}


@dataclass(frozen=True)
class InterconnectionResult:
    """Static and flexible answers for one device.

    ``intervals``: per direction and interval ``direction, timestamp, available_kw,
    allowed_kw, curtailed_kw`` (available = size x profile; allowed = what the network
    takes; curtailed = max(0, available - allowed)). ``static_limit_kw`` per direction:
    the largest size never curtailed over the horizon.
    """

    site: Site
    kind: str
    p_kw: float
    dt_h: float
    intervals: pd.DataFrame
    static_limit_kw: dict[str, float]
    method: str
    runtime_s: float
    n_ac_solves: int

    @property
    def static_ok(self) -> bool:
        return all(self.p_kw <= v + 1e-9 for v in self.static_limit_kw.values())

    def annual(self) -> dict[str, dict[str, float]]:
        """Per direction: available and curtailed energy [kWh], curtailed share, hours."""
        out = {}
        for d, g in self.intervals.groupby("direction"):
            avail = float(g["available_kw"].sum() * self.dt_h)
            curt = float(g["curtailed_kw"].sum() * self.dt_h)
            out[str(d)] = {"available_kwh": avail, "curtailed_kwh": curt,
                           "curtailed_share": curt / avail if avail > 0 else 0.0,
                           "curtailed_hours": float((g["curtailed_kw"] > 1e-6).sum()
                                                    * self.dt_h)}
        return out


def new_connection(engine: OpenDSSEngine, site: Site, p_kw: float) -> ConnectionPoint:
    """Add the new device's connection point (a 0 kW load) at ``site``: wye, or delta on an
    ungrounded (3-wire) bus (``site.line_to_line``), where a wye element would ground it."""
    if not np.isfinite(p_kw) or not 0 < p_kw <= MAX_SIZE_KW:
        raise InputError(f"device size must be a positive number of kW, at most "
                         f"{MAX_SIZE_KW:g}, got {p_kw}")
    c = engine.circuit
    c.SetActiveBus(site.bus)
    kv_ln = c.ActiveBus.kVBase
    n = len(site.nodes)
    kv = kv_ln if n == 1 else kv_ln * np.sqrt(3.0)
    conn = "delta" if site.line_to_line and n >= 2 else "wye"
    phases = 1 if conn == "delta" and n == 2 else n  # two nodes in delta: one branch
    name = f"{_NEW}{site.bus}"
    engine.command(f"new load.{name} bus1={site.bus}.{site.phases} phases={phases} "
                   f"conn={conn} kV={kv:.6g} kW=0 kvar=0 model=1 vminpu=0 vlowpu=0 "
                   "vmaxpu=1000")
    return ConnectionPoint(name, f"load.{name}", site.bus, site.nodes, phases, conn,
                           float(kv), 0.0, 0.0, float(p_kw))


def _check_profile(device_pu: np.ndarray, profiles: Profiles) -> np.ndarray:
    pu = np.asarray(device_pu, dtype=float)
    if pu.shape != (profiles.n_steps,) or not np.isfinite(pu).all() or (pu < 0).any():
        raise InputError(f"device profile must be {profiles.n_steps} finite values >= 0 "
                         f"(per unit of its size), got shape {pu.shape}")
    return pu


# margin left unrefined per interval, and the AC excess accepted (out of DESIGN.md's
# tolerance: the allocation aims that much inside it)
REFINE_V_PU, REFINE_THERMAL_PCT = 0.0001, 0.1


def flexible_connection(engine: OpenDSSEngine, profiles: Profiles, site: Site, kind: Kind,
                        p_kw: float, device_pu: np.ndarray | None = None, *,
                        limits: Limits | None = None,
                        progress: Callable[[str, int, int], None] | None = None
                        ) -> InterconnectionResult:
    """Fast method (module docstring). ``device_pu`` (T,): available output per unit of
    ``p_kw`` (PV: its generation profile; load: its charging profile); None = 1 (battery
    always)."""
    if kind not in KINDS:
        raise InputError(f"device kind {kind!r}: expected one of {', '.join(KINDS)}")
    pu = np.ones(profiles.n_steps) if device_pu is None else _check_profile(device_pu, profiles)
    t0 = time.perf_counter()
    cp = new_connection(engine, site, p_kw)
    crit = EnvelopeCriteria(limits=limits or Limits(), policy="equal",
                            directions=_DIRECTIONS[kind], controls="frozen",
                            export_q_per_p=0.0, import_q_per_p=0.0,
                            # one connection point: refine to 0.0001 pu / 0.1 % of the
                            # limit (at the envelopes' 0.002 pu a 2.5 MW battery at IEEE
                            # 13's bus 675 was curtailed twice what the reference
                            # curtails; now +9.3 %)
                            refine_v_pu=REFINE_V_PU, refine_thermal_pct=REFINE_THERMAL_PCT,
                            accept_v_pu=REFINE_V_PU, accept_thermal_pct=REFINE_THERMAL_PCT)
    res = compute_envelopes(engine, profiles, [cp], crit, progress=progress,
                            active=None if kind == "battery" else pu > 0)
    frames, static = [], {}
    for d in _DIRECTIONS[kind]:
        allowed = (res.export_kw if d == "export" else res.import_kw)[:, 0]
        frames.append(_frame(d, profiles, p_kw * pu, allowed))
        static[d] = _static_limit(pu, allowed, p_kw)
    return InterconnectionResult(site, kind, float(p_kw), profiles.step.total_seconds() / 3600,
                                 pd.concat(frames, ignore_index=True), static, "fast",
                                 time.perf_counter() - t0, res.n_ac_solves)


def curtailment_reference(engine: OpenDSSEngine, profiles: Profiles, site: Site, kind: Kind,
                          p_kw: float, device_pu: np.ndarray | None = None, *,
                          limits: Limits | None = None, tol_kw: float = 0.05
                          ) -> InterconnectionResult:
    """Reference: QSTS with per-interval AC bisection of the output (module docstring)."""
    if kind not in KINDS:
        raise InputError(f"device kind {kind!r}: expected one of {', '.join(KINDS)}")
    pu = np.ones(profiles.n_steps) if device_pu is None else _check_profile(device_pu, profiles)
    lim = limits or Limits()
    t0 = time.perf_counter()
    cp = new_connection(engine, site, p_kw)
    net = EnvelopeNetwork(engine, profiles, [cp])
    base = net.base()
    net.reference(act_every=None)
    n_t = net.n_steps
    # bisection is exact: up to DESIGN.md's threshold itself (no accepted excess to keep
    # back, as the envelopes' AC check has)
    hl = horizon_limits(base, net.index, engine.node_names(),
                        EnvelopeCriteria(limits=lim, accept_v_pu=0.0, accept_thermal_pct=0.0))
    frames, static = [], {}
    for d in _DIRECTIONS[kind]:
        s = -1.0 if d == "export" else 1.0
        avail = p_kw * pu

        def ok(x: np.ndarray, steps: np.ndarray, s=s, d=d) -> np.ndarray:
            full = np.zeros((n_t, 1))
            full[steps, 0] = x
            st = net.check(s * full, 0 * full, steps)
            v = st.v_pu[:, hl.nodes]
            ve = (v - hl.v_hi[steps]) if d == "export" else (hl.v_lo[steps] - v)
            te = (st.i_a[:, hl.branches] - hl.i_max[steps]) / hl.norm_a
            return st.converged & (ve.max(axis=1) <= 0) & (te.max(axis=1, initial=-np.inf) <= 0)

        allowed = avail.copy()
        run = np.flatnonzero(avail > 0)
        good = ok(avail[run], run)
        bad = run[~good]
        lo, hi = np.zeros(bad.size), avail[bad].copy()
        while bad.size and (hi - lo).max() > tol_kw:
            mid = 0.5 * (lo + hi)
            fine = ok(mid, bad)
            lo, hi = np.where(fine, mid, lo), np.where(fine, hi, mid)
        allowed[bad] = lo
        frames.append(_frame(d, profiles, avail, allowed))
        static[d] = _static_limit(pu, allowed, p_kw, exact=avail)
    return InterconnectionResult(site, kind, float(p_kw), profiles.step.total_seconds() / 3600,
                                 pd.concat(frames, ignore_index=True), static, "reference",
                                 time.perf_counter() - t0, net.n_solves)


def _frame(direction: str, profiles: Profiles, avail: np.ndarray,
           allowed: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"direction": direction, "timestamp": profiles.times,
                         "available_kw": avail, "allowed_kw": allowed,
                         "curtailed_kw": np.maximum(avail - allowed, 0.0)})


def _static_limit(pu: np.ndarray, allowed: np.ndarray, p_kw: float,
                  exact: np.ndarray | None = None) -> float:
    """Largest size never curtailed: min over running intervals of allowed / pu. Where the
    allowance equals the available output (not limited), the size could be larger; the
    bound there is the size itself (we only know the network took all of it)."""
    run = pu > 0
    if not run.any():
        return float(p_kw)
    ratio = allowed[run] / pu[run]
    limited = allowed[run] < p_kw * pu[run] - 1e-6
    if not limited.any():
        return float(p_kw)
    return float(min(ratio[limited].min(), p_kw))
