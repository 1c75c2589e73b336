"""The EV energy shift of the AC repair: energy kept, window and rate respected."""

from __future__ import annotations

import numpy as np

from derms.dispatch.ac_repair_rows import ev_room_kw, shift_ev_energy


def test_the_cut_goes_to_the_latest_intervals_with_room():
    ev = np.array([[7.0, 3.0], [7.0, 3.0], [2.0, 3.0], [0.0, 3.0], [0.0, 0.0]])
    window = np.array([[1, 1], [1, 1], [1, 1], [1, 1], [0, 1]], dtype=bool)
    out = shift_ev_energy(ev, np.array([5.0, 2.0]), window, np.array([7.0, 3.0]), 1)
    np.testing.assert_allclose(out.sum(axis=0), ev.sum(axis=0))
    np.testing.assert_allclose(out[:, 0], [7.0, 2.0, 2.0, 5.0, 0.0])  # t=4 outside window
    np.testing.assert_allclose(out[:, 1], [3.0, 1.0, 3.0, 3.0, 2.0])
    assert np.all(out <= 7.0 + 1e-12) and np.all(out[:, 1] <= 3.0 + 1e-12)


def test_the_room_is_what_later_intervals_of_the_session_can_take():
    ev = np.array([[7.0, 3.0], [7.0, 3.0], [2.0, 3.0], [0.0, 3.0], [0.0, 0.0]])
    window = np.array([[1, 1], [1, 1], [1, 1], [1, 1], [0, 1]], dtype=bool)
    p_max = np.array([7.0, 3.0])
    np.testing.assert_allclose(ev_room_kw(ev, window, p_max, 1), [12.0, 3.0])
    np.testing.assert_allclose(ev_room_kw(ev, window, p_max, 4), [0.0, 0.0])  # none after
    cut = np.minimum(np.maximum(ev[1], 0.0), ev_room_kw(ev, window, p_max, 1))
    out = shift_ev_energy(ev, cut, window, p_max, 1)  # the largest cut the room allows
    np.testing.assert_allclose(out.sum(axis=0), ev.sum(axis=0))
    assert np.all(out <= p_max + 1e-12) and np.all(out >= -1e-12)


def test_a_revert_that_would_break_a_session_gives_the_evs_the_plan_back():
    """Interval 0's cut (4 kW) went to interval 3; a later correction at interval 3 moved
    3 kW of it to interval 2. Undoing interval 0 alone would leave interval 3 at -3 kW:
    every EV goes back to the plan (energy kept), the reverted interval's PV too."""
    from derms.dispatch.ac_repair import _Correction

    plan_ev = np.array([[4.0], [0.0], [0.0], [0.0]])
    window, p_max = np.ones((4, 1), bool), np.array([7.0])
    after0 = shift_ev_energy(plan_ev, np.array([4.0]), window, p_max, 0)  # to interval 3
    ev1 = after0.copy()
    ev1[3] -= 3.0
    ev1[2] += 3.0
    c = object.__new__(_Correction)  # the state revert works on, without an engine
    c.ev_kw, c.ev_shift = ev1, {0: after0 - plan_ev}

    class Plan:  # the Schedule fields revert reads: 1 PV, 0 batteries, 1 EV
        pv_kw = np.zeros((4, 1))
        charge_kw = np.zeros((4, 0))
        ev_kw = plan_ev
        p_kw = np.c_[np.full(4, -2.0), plan_ev]
        q_kvar = np.zeros((4, 2))

    c.p = np.c_[np.full(4, -1.0), ev1]
    c.q = np.ones((4, 2))
    c.revert(Plan, np.array([0]))
    np.testing.assert_array_equal(c.ev_kw, plan_ev)
    np.testing.assert_array_equal(c.p[:, 1], plan_ev[:, 0])
    assert c.p[0, 0] == -2.0 and c.q[0, 0] == 0.0 and c.p[1, 0] == -1.0
    assert c.ev_shift == {}

