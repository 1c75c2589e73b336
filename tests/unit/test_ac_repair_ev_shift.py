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
