"""Step hold (derms.dispatch.step_hold): intervals where the plan stepped a hazard
regulator's tap up are re-centred on the base case, with tightened guard rows."""

from __future__ import annotations

import numpy as np

from derms.dispatch.network import Reference
from derms.dispatch.step_hold import (
    STEP_HOLD_MARGIN_PU,
    hold_steps,
    step_movers,
    stepped_intervals,
    with_intervals,
)

T, N_DER, N_NODE, N_BR = 4, 3, 5, 2


def _ref(fill: float, taps=None) -> Reference:
    return Reference(p_kw=np.full((T, N_DER), fill), q_kvar=np.full((T, N_DER), -fill),
                     v_pu=np.full((T, N_NODE), 1.0 + fill / 100), i_a=np.full((T, N_BR), fill),
                     head_kw=np.full(T, 10 * fill), element_kw={"line.a": np.full(T, fill)},
                     cap_on=np.full((T, 1), fill), ctl_kvar=np.full((T, 1), fill), taps=taps)


def test_only_intervals_with_a_tap_above_the_base_and_a_broken_row_are_stepped():
    base = _ref(0.0, taps=np.array([[1], [1], [1], [2]]))
    centre = _ref(1.0, taps=np.array([[2], [2], [1], [2]]))
    over = {"v_max": np.zeros((T, N_NODE), dtype=bool), "v_min": np.zeros((T, N_NODE), bool)}
    over["v_max"][0, 3] = True  # stepped and broken
    over["v_min"][2, 1] = True  # broken, tap as the base's
    # interval 1: stepped, nothing broken; interval 3: same tap
    np.testing.assert_array_equal(stepped_intervals(centre, base, over),
                                  [True, False, False, False])
    # no taps recorded (no hazard regulator): nothing is stepped
    assert not stepped_intervals(_ref(1.0), base, over).any()


def test_with_intervals_takes_every_array_of_the_chosen_intervals_only():
    a, b = _ref(1.0, taps=np.ones((T, 1), dtype=int)), _ref(0.0, taps=np.zeros((T, 1), int))
    rows = np.array([False, True, False, True])
    out = with_intervals(a, b, rows)
    for name in ("p_kw", "q_kvar", "v_pu", "i_a", "head_kw", "cap_on", "ctl_kvar", "taps"):
        got, want_a, want_b = (getattr(x, name) for x in (out, a, b))
        np.testing.assert_array_equal(got[rows], want_b[rows], err_msg=name)
        np.testing.assert_array_equal(got[~rows], want_a[~rows], err_msg=name)
    np.testing.assert_array_equal(out.element_kw["line.a"], [1.0, 0.0, 1.0, 0.0])
    assert a.p_kw[1, 0] == 1.0  # the input is not changed


def test_step_movers_are_the_ders_pulling_the_voltage_down_in_the_stepped_intervals():
    c = Reference(p_kw=np.zeros((T, 5)), q_kvar=np.zeros((T, 5)), v_pu=np.ones((T, N_NODE)),
                  i_a=np.zeros((T, N_BR)), head_kw=np.zeros(T))
    c.p_kw[2, 0] = 5.0     # DER 0 imports (charges) in the stepped interval
    c.q_kvar[2, 2] = 3.0   # DER 2 absorbs kvar there
    c.p_kw[0, 1] = 7.0     # DER 1 imports only outside it
    c.p_kw[2, 3] = -4.0    # DER 3 exports there (a PV by day): raises the voltage
    c.q_kvar[2, 4] = -2.0  # DER 4 injects kvar there
    np.testing.assert_array_equal(step_movers(c, np.array([False, False, True, False])),
                                  [True, False, True, False, False])


class _Net:
    def __init__(self):
        self.margin = {"v_min": np.zeros((T, N_NODE))}
        self.added = None

    def add(self, kind, mask, score=None):
        assert kind == "v_min"
        self.added = mask.copy()
        return int(mask.sum())


def test_hold_steps_adds_and_tightens_guard_rows_at_the_regulator_nodes_only():
    net = _Net()
    hit = np.array([False, True, False, True])
    assert hold_steps(net, hit, np.array([3])) == 2
    want = np.zeros((T, N_NODE), dtype=bool)
    want[[1, 3], 3] = True
    np.testing.assert_array_equal(net.added, want)
    np.testing.assert_allclose(net.margin["v_min"], np.where(want, STEP_HOLD_MARGIN_PU, 0.0))
    hold_steps(net, hit, np.array([3]))  # found again: tightened again
    assert net.margin["v_min"][1, 3] == 2 * STEP_HOLD_MARGIN_PU
