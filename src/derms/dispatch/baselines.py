"""Baseline schedules to compare a plan against (net import, consumption positive).

* :func:`uncontrolled` — PV at its available power, batteries idle, EVs charging
  immediately at full rate, flexible loads at baseline (also the "immediate EV
  charging" baseline).
* :func:`rule_based_peak_shaving` — batteries discharge when the forecast head import is
  above a threshold (the excess shared in proportion to their ratings, within SOC), and
  recharge when it is below ``charge_below_kw``; each ends the horizon with the energy the
  plan must leave in it (recharged in the valleys, else discharged less).
* :func:`static_export_limit` — every PV's output capped at a fixed share of its kVA.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from derms.der.models import Fleet, FleetArrays, fleet_arrays
from derms.dispatch.plan import Schedule, uncontrolled_schedule


def uncontrolled(fleet: Fleet) -> Schedule:
    """The uncontrolled / immediate-EV-charging schedule."""
    return uncontrolled_schedule(fleet)


def rule_based_peak_shaving(fleet: Fleet, head_forecast_kw: np.ndarray, threshold_kw: float,
                            charge_below_kw: float | None = None) -> Schedule:
    """Threshold discharge. ``head_forecast_kw`` (T,) is the head import of the
    uncontrolled schedule [kW]; batteries discharge ``head - threshold_kw`` (shared by
    rating) and charge up to ``charge_below_kw - head`` (default ``0.8 threshold``); then
    each battery is brought back to the end energy the plan must also leave
    (:func:`restore_end_energy`: more charge in the valleys below ``charge_below_kw``, then
    below the threshold, else less discharge), so both end the horizon alike."""
    base = uncontrolled_schedule(fleet)
    a = fleet_arrays(fleet)
    T, dt = fleet.horizon.n_steps, a.dt_h
    ch_lim = 0.8 * threshold_kw if charge_below_kw is None else charge_below_kw
    p_max = a.bat_p_max_kw
    share = p_max / p_max.sum() if p_max.sum() > 0 else p_max
    e = a.bat_e0_kwh.copy()
    ch, dis = np.zeros((T, p_max.size)), np.zeros((T, p_max.size))
    for t in range(T):  # sequential in time by nature (SOC), vectorised over batteries
        excess = head_forecast_kw[t] - threshold_kw
        room = ch_lim - head_forecast_kw[t]
        if excess > 0:
            d = np.minimum.reduce([share * excess, p_max,
                                   (e - a.bat_e_min_kwh) * a.bat_eta_dis / dt])
            dis[t] = np.maximum(d, 0.0)
        elif room > 0:
            c = np.minimum.reduce([share * room, p_max,
                                   (a.bat_e_max_kwh - e) / (a.bat_eta_ch * dt)])
            ch[t] = np.maximum(c, 0.0)
        e = e + (a.bat_eta_ch * ch[t] - dis[t] / a.bat_eta_dis) * dt
    restore_end_energy(a, np.asarray(head_forecast_kw, dtype=float), ch, dis,
                       (ch_lim, threshold_kw))
    n_pv = a.pv_s_kva.size
    p = base.p_kw.copy()
    p[:, n_pv:n_pv + p_max.size] = ch - dis
    return replace(base, p_kw=p, charge_kw=ch, discharge_kw=dis, e_kwh=battery_energy(a, ch, dis))


def battery_energy(a: FleetArrays, ch_kw: np.ndarray, dis_kw: np.ndarray) -> np.ndarray:
    """(T, n_bat) stored energy [kWh] at the end of each interval, from the charge and
    discharge powers [kW] (battery side: charge x eta_ch in, discharge / eta_dis out)."""
    flow = (a.bat_eta_ch * ch_kw - dis_kw / a.bat_eta_dis) * a.dt_h
    return a.bat_e0_kwh + np.cumsum(flow, axis=0)


def restore_end_energy(a: FleetArrays, head_kw: np.ndarray, ch_kw: np.ndarray,
                       dis_kw: np.ndarray, levels_kw: tuple[float, ...]) -> np.ndarray:
    """Make each battery end with at least ``bat_e_end_min_kwh`` (what the plan must leave
    in it), in place on ``ch_kw`` / ``dis_kw`` (T, n_bat) [kW]; returns the shortfall left
    [kWh] (0 unless the battery cannot hold it).

    First charge more in the intervals of lowest head import ``head_kw`` (T,) [kW, before
    the batteries] where a battery is not discharging, keeping the head with the batteries
    at or below each of ``levels_kw`` in turn (the share of the room by rating, within
    power and the energy ceiling of every later interval); what is still missing is
    discharged less, latest intervals first."""
    dt, T = a.dt_h, head_kw.size
    e = battery_energy(a, ch_kw, dis_kw)
    short = a.bat_e_end_min_kwh - (e[-1] if T else a.bat_e0_kwh)
    order = np.argsort(head_kw, kind="stable")
    for level in levels_kw:
        for t in order:
            need = short > 1e-9
            if not need.any():
                return np.zeros_like(short)
            room = level - head_kw[t] - (ch_kw[t] - dis_kw[t]).sum()
            w = np.where(need & (dis_kw[t] <= 0), a.bat_p_max_kw, 0.0)
            if room <= 1e-9 or w.sum() <= 0:
                continue
            ceiling = (a.bat_e_max_kwh - e[t:].max(axis=0)) / (a.bat_eta_ch * dt)
            c = np.maximum(np.minimum.reduce([
                room * w / w.sum(), a.bat_p_max_kw - ch_kw[t],
                short / (a.bat_eta_ch * dt), ceiling]), 0.0) * (w > 0)
            ch_kw[t] += c
            e[t:] += a.bat_eta_ch * c * dt
            short -= a.bat_eta_ch * c * dt
    for t in range(T - 1, -1, -1):
        if not (short > 1e-9).any():
            break
        ceiling = (a.bat_e_max_kwh - e[t:].max(axis=0)) * a.bat_eta_dis / dt
        cut = np.maximum(np.minimum.reduce([dis_kw[t], short * a.bat_eta_dis / dt, ceiling]),
                         0.0)
        dis_kw[t] -= cut
        e[t:] += cut / a.bat_eta_dis * dt
        short -= cut / a.bat_eta_dis * dt
    return np.maximum(short, 0.0)


def static_export_limit(fleet: Fleet, limit_frac: float = 0.5) -> Schedule:
    """PV output capped at ``limit_frac x s_kva`` (a fixed per-system export limit)."""
    base = uncontrolled_schedule(fleet)
    a = fleet_arrays(fleet)
    pv = np.minimum(a.pv_avail_kw, limit_frac * a.pv_s_kva)
    p = base.p_kw.copy()
    p[:, :pv.shape[1]] = -pv
    return replace(base, p_kw=p, pv_kw=pv, curtail_kw=a.pv_avail_kw - pv)
