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



def test_the_shift_fills_to_the_plans_own_rate_before_the_chargers():
    """An EV the plan held to 4 kW (its service transformer's limit; the charger takes 11)
    gets a cut back at up to 4 kW per interval, latest first, and only what does not fit
    there at the charger's rate (IEEE 8500 seed 3: 9.7 kW in the session's last interval,
    203 % of a 5 kVA transformer, where the plan had about 4 kW)."""
    window, p_max = np.ones((5, 1), bool), np.array([11.0])
    ev = np.array([[4.0], [4.0], [1.0], [0.0], [0.0]])
    out = shift_ev_energy(ev, np.array([4.0]), window, p_max, 0)
    np.testing.assert_allclose(out[:, 0], [0.0, 4.0, 1.0, 0.0, 4.0])  # not [.., 0, 0, 4]
    ev = np.array([[4.0], [1.0], [0.0], [0.0], [3.0]])
    out = shift_ev_energy(ev, np.array([4.0]), window, p_max, 0)  # t=4 takes 1, t=3 3
    np.testing.assert_allclose(out[:, 0], [0.0, 1.0, 0.0, 3.0, 4.0])
    full = np.full((5, 1), 4.0)  # no room at the plan's rate: the charger's
    out = shift_ev_energy(full, np.array([4.0]), window, p_max, 0)
    np.testing.assert_allclose(out[:, 0], [0.0, 4.0, 4.0, 4.0, 8.0])
    for plan in (ev, full):
        np.testing.assert_allclose(
            shift_ev_energy(plan, np.array([2.5]), window, p_max, 0).sum(), plan.sum())


def test_a_repair_may_move_the_cut_earlier_in_the_session():
    """``earlier`` (the whole-plan repair): a cut in the session's last interval with room
    at the plan's rate only before it goes there, nearest first; without ``earlier`` (an
    execution in sequence: the past is done) it can only go later, at the charger's rate.
    A partial cut caps the other intervals at the rate it leaves (IEEE 8500 seed 3: the
    plan's highest rate, 5.2 kW, was itself over the EV's transformer limit)."""
    window, p_max = np.ones((5, 1), bool), np.array([11.0])
    ev = np.array([[4.0], [0.0], [1.0], [4.0], [0.0]])
    # the cut leaves 1 kW at t=3: up to 1 kW later (t=4), then earlier (t=1; t=2 has it),
    # then the rest later at the charger's rate
    out = shift_ev_energy(ev, np.array([3.0]), window, p_max, 3, earlier=True)
    np.testing.assert_allclose(out[:, 0], [4.0, 1.0, 1.0, 1.0, 2.0])
    full = np.array([[4.0], [0.0], [1.0], [4.0], [4.0]])
    out = shift_ev_energy(full, np.array([4.0]), window, p_max, 4, earlier=True)
    np.testing.assert_allclose(out[:, 0], [4.0, 1.0, 4.0, 4.0, 0.0])  # t=2 then t=1
    np.testing.assert_allclose(ev_room_kw(full, window, p_max, 4, earlier=True), [7.0])
    np.testing.assert_allclose(ev_room_kw(full, window, p_max, 4), [0.0])
    np.testing.assert_allclose(ev_room_kw(full, window, p_max, 2, earlier=True),
                               [7.0 + 7.0 + 0.0 + 4.0])  # later to 11 kW, earlier to 4


def test_every_cut_the_room_allows_is_placed():
    """The room counts earlier intervals up to the plan's highest rate; the shift caps
    them at the rate the cut leaves first, and must still place the whole cut (energy
    was left unplaced: an EV short of its need)."""
    rng = np.random.default_rng(4)
    for _ in range(200):
        T = 8
        ev = np.round(rng.uniform(0, 6, (T, 1)) * (rng.random((T, 1)) < 0.6), 2)
        window, p_max = np.ones((T, 1), bool), np.array([7.0])
        t = int(rng.integers(0, T))
        room = ev_room_kw(ev, window, p_max, t, earlier=True)
        cut = np.minimum(ev[t], room) * rng.uniform(0.1, 1.0)
        out = shift_ev_energy(ev, cut, window, p_max, t, earlier=True)
        np.testing.assert_allclose(out.sum(), ev.sum(), atol=1e-9)
        assert (out <= p_max + 1e-9).all() and (out >= -1e-9).all()
