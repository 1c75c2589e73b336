"""Tap steps the plan causes at regulators set so high that one step up breaks the limit.

IEEE 8500's substation regulator holds its bus in 1.0458-1.0625 pu: a plan whose load
pulls the bus under the band's lower edge makes it step up by 0.00625 pu, over 1.05
(``ACNetwork._guard_step_up`` puts a lower limit on that bus for this). When the AC check
still finds such a regulator's tap above the base case's in an interval with violations,
re-centring that interval's rows on the plan's AC result linearises it *after* the step:
its rows then see an overvoltage at the bus that only less voltage could cure, and the
LP answered with more load or absorbed kvar (IEEE 8500, 21:30 local: 1 Mvar absorbed by
PV inverters at night), which makes the regulator step up again. :func:`hold_steps`
instead centres those intervals on the base case (the tap where the base has it; the
rows of an interval depend on that interval's point only), adds the guard rows there,
tightened by ``STEP_HOLD_MARGIN_PU`` each time (the linear model was optimistic about
the guard), and names the DERs that pull the voltage down in those intervals (import or
absorbed kvar) so a local repair can move them (:func:`step_movers`).
"""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np

from derms.dispatch.network import Reference

log = logging.getLogger(__name__)

STEP_HOLD_MARGIN_PU = 0.002  # guard tightened by this much per stepped interval found


def stepped_intervals(centre: Reference, base: Reference,
                      over: dict[str, np.ndarray]) -> np.ndarray:
    """(T,) bool: intervals where a hazard regulator's tap in ``centre``'s AC run is above
    the base case's and the run breaks a row (``over``: (T, n) masks per row kind)."""
    if centre.taps is None or base.taps is None or centre.taps.shape[1] == 0:
        return np.zeros(centre.v_pu.shape[0], dtype=bool)
    up = (centre.taps > base.taps).any(axis=1)
    broken = np.logical_or.reduce([m.any(axis=1) for m in over.values()])
    if log.isEnabledFor(logging.DEBUG):
        k = np.flatnonzero(broken & (centre.taps != base.taps).any(axis=1))
        log.debug("dispatch hazard taps differ where rows break: %s",
                  {int(i): (centre.taps[i].tolist(), base.taps[i].tolist()) for i in k})
    return up & broken


def with_intervals(ref: Reference, other: Reference, rows: np.ndarray) -> Reference:
    """``ref`` with the intervals ``rows`` ((T,) bool) taken from ``other``."""

    def mix(a, b):
        if a is None or b is None:
            return a
        out = np.array(a, copy=True)
        out[rows] = b[rows]
        return out

    flows = {e: mix(v, other.element_kw.get(e)) for e, v in ref.element_kw.items()}
    return replace(ref, p_kw=mix(ref.p_kw, other.p_kw), q_kvar=mix(ref.q_kvar, other.q_kvar),
                   v_pu=mix(ref.v_pu, other.v_pu), i_a=mix(ref.i_a, other.i_a),
                   head_kw=mix(ref.head_kw, other.head_kw), element_kw=flows,
                   cap_on=mix(ref.cap_on, other.cap_on),
                   ctl_kvar=mix(ref.ctl_kvar, other.ctl_kvar), taps=mix(ref.taps, other.taps))


def step_movers(centre: Reference, hit: np.ndarray, tol: float = 0.1) -> np.ndarray:
    """(n_der,) bool: DERs that pull the voltage down in the stepped intervals ``hit`` of
    ``centre`` (before it is re-centred on the base): importing more than ``tol`` kW
    (charging, consuming) or absorbing more than ``tol`` kvar (net import positive)."""
    if not hit.any():
        return np.zeros(centre.p_kw.shape[1], dtype=bool)
    pull = np.maximum(centre.p_kw[hit], 0.0) + np.maximum(centre.q_kvar[hit], 0.0)
    return pull.max(axis=0) > tol


def hold_steps(net, hit: np.ndarray, nodes: np.ndarray) -> int:
    """Guard rows (``v_min`` at the hazard regulators' ``nodes``) in the intervals ``hit``,
    tightened by ``STEP_HOLD_MARGIN_PU``; returns the number of rows added."""
    mask = np.zeros(net.margin["v_min"].shape, dtype=bool)
    mask[np.ix_(hit, nodes)] = True
    added = net.add("v_min", mask)
    net.margin["v_min"][mask] += STEP_HOLD_MARGIN_PU
    log.info("dispatch step_hold intervals=%s rows_added=%d", np.flatnonzero(hit).tolist(),
             added)
    return added


__all__ = ["STEP_HOLD_MARGIN_PU", "hold_steps", "step_movers", "stepped_intervals",
           "with_intervals"]
