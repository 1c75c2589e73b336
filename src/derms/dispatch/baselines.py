"""Baseline schedules to compare a plan against (net import, consumption positive).

* :func:`uncontrolled` — PV at its available power, batteries idle, EVs charging
  immediately at full rate, flexible loads at baseline (also the "immediate EV
  charging" baseline).
* :func:`rule_based_peak_shaving` — batteries discharge when the forecast head import is
  above a threshold (the excess shared in proportion to their ratings, within SOC), and
  recharge when it is below ``charge_below_kw``.
* :func:`static_export_limit` — every PV's output capped at a fixed share of its kVA.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from derms.der.models import Fleet, fleet_arrays
from derms.dispatch.plan import Schedule, uncontrolled_schedule


def uncontrolled(fleet: Fleet) -> Schedule:
    """The uncontrolled / immediate-EV-charging schedule."""
    return uncontrolled_schedule(fleet)


def rule_based_peak_shaving(fleet: Fleet, head_forecast_kw: np.ndarray, threshold_kw: float,
                            charge_below_kw: float | None = None) -> Schedule:
    """Threshold discharge. ``head_forecast_kw`` (T,) is the head import of the
    uncontrolled schedule [kW]; batteries discharge ``head - threshold_kw`` (shared by
    rating) and charge up to ``charge_below_kw - head`` (default ``0.8 threshold``)."""
    base = uncontrolled_schedule(fleet)
    a = fleet_arrays(fleet)
    T, dt = fleet.horizon.n_steps, a.dt_h
    ch_lim = 0.8 * threshold_kw if charge_below_kw is None else charge_below_kw
    p_max = a.bat_p_max_kw
    share = p_max / p_max.sum() if p_max.sum() > 0 else p_max
    e = a.bat_e0_kwh.copy()
    ch, dis, e_t = np.zeros((T, p_max.size)), np.zeros((T, p_max.size)), np.zeros((T, p_max.size))
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
        e_t[t] = e
    n_pv = a.pv_s_kva.size
    p = base.p_kw.copy()
    p[:, n_pv:n_pv + p_max.size] = ch - dis
    return replace(base, p_kw=p, charge_kw=ch, discharge_kw=dis, e_kwh=e_t)


def static_export_limit(fleet: Fleet, limit_frac: float = 0.5) -> Schedule:
    """PV output capped at ``limit_frac x s_kva`` (a fixed per-system export limit)."""
    base = uncontrolled_schedule(fleet)
    a = fleet_arrays(fleet)
    pv = np.minimum(a.pv_avail_kw, limit_frac * a.pv_s_kva)
    p = base.p_kw.copy()
    p[:, :pv.shape[1]] = -pv
    return replace(base, p_kw=p, pv_kw=pv, curtail_kw=a.pv_avail_kw - pv)
