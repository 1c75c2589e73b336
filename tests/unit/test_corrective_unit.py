"""Corrective LP (derms.dispatch.corrective) and commands (derms.control.commands) on small
synthetic cases: bad input, empty fleet, infeasible targets, fallback, explanations."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

import derms.dispatch.corrective as corrective
from derms.control.commands import CommandIssuer, CommandMode, DeviceCommand, InMemorySink
from derms.dispatch.corrective import (
    CorrectiveConfig,
    CurrentRows,
    DerState,
    VoltageRows,
    solve_corrective,
)
from derms.errors import InfeasibleError, InputError

T0 = datetime(2026, 7, 1, 20, 0, tzinfo=UTC)


def ders(n=3, p=-10.0, q_max=4.0, weight=None, fixed=None, point=None):
    return DerState(
        der_id=np.array([f"d{k}" for k in range(n)]),
        point=np.zeros(n, int) if point is None else np.asarray(point),
        p_kw=np.full(n, p), p_min_kw=np.full(n, min(p, 0.0)), p_max_kw=np.zeros(n),
        q_kvar=np.zeros(n), q_min_kvar=np.full(n, -q_max), q_max_kvar=np.full(n, q_max),
        weight=np.ones(n) if weight is None else np.asarray(weight, float),
        fixed=np.zeros(n, bool) if fixed is None else np.asarray(fixed, bool))


def vrows(v=1.06, s_p=-0.001, s_q=-0.0005, n_points=1):
    return VoltageRows(np.array(["n1.1"]), np.array([v]), np.array([0.95]), np.array([1.05]),
                       np.full((1, n_points), s_p), np.full((1, n_points), s_q))


def test_overvoltage_row_reaches_its_target_with_the_cheapest_change():
    res = solve_corrective(ders(), vrows(), None)
    assert res.status == "resolved" and res.method == "lp"
    assert res.acted.tolist() == [True]
    assert res.margin_before[0] == pytest.approx(-0.01)
    assert res.margin_after[0] == pytest.approx(0.003, abs=1e-9)  # limit - margin reached
    # Q costs 0.2 x P per unit and relieves half as much per unit: Q first, fully
    # (absorbing: more reactive import, q_kvar > 0)
    assert np.allclose(res.dq_kvar, 4.0)
    assert (res.dp_kw >= 0).all() and res.dp_kw.sum() > 0  # then curtail PV
    assert np.allclose(res.p_kw, -10.0 + res.dp_kw)
    assert set(res.explanations()) == {"d0", "d1", "d2"}
    assert "v_max at n1.1" in res.explanations()["d0"]


def test_nothing_violated_means_no_move():
    res = solve_corrective(ders(), vrows(v=1.02), None)
    assert res.status == "clear" and res.method == "none" and not res.moved.any()


def test_weights_order_the_ders():
    res = solve_corrective(ders(weight=[1.0, 5.0, 5.0], q_max=0.0), vrows(v=1.053), None)
    assert res.dp_kw[0] > 0 and np.allclose(res.dp_kw[1:], 0)


def test_fixed_ders_never_move():
    res = solve_corrective(ders(fixed=[True, False, False]), vrows(), None)
    assert res.dp_kw[0] == 0 and res.dq_kvar[0] == 0 and not res.moved[0]
    assert res.status == "resolved"


def test_infeasible_target_is_reported_not_raised():
    res = solve_corrective(ders(p=-1.0, q_max=0.0), vrows(v=1.10), None)
    assert res.status == "partial" and res.remaining == ["n1.1"]
    assert np.allclose(res.p_kw, 0.0)  # did what it could: every PV curtailed fully
    assert any("cannot reach" in n for n in res.notes)
    assert res.margin_after[0] < 0


def test_empty_fleet_and_all_fixed_are_reported():
    empty = DerState(*(np.zeros(0) for _ in range(9)), fixed=np.zeros(0, bool))
    empty = replace(empty, der_id=np.zeros(0, dtype=object), point=np.zeros(0, int))
    res = solve_corrective(empty, vrows(), None)
    assert res.status == "partial" and res.remaining == ["n1.1"] and res.moved.size == 0
    assert any("no free DER" in n for n in res.notes)
    res = solve_corrective(ders(fixed=[True, True, True]), vrows(), None)
    assert res.status == "partial" and not res.moved.any()


def test_no_rows_at_all():
    res = solve_corrective(ders(), None, None)
    assert res.status == "clear" and res.row_label.size == 0


@pytest.mark.parametrize("field,value", [("p_kw", np.nan), ("weight", np.inf),
                                         ("q_max_kvar", np.nan)])
def test_non_finite_der_input_is_an_input_error(field, value):
    d = ders()
    arr = getattr(d, field).copy()
    arr[1] = value
    with pytest.raises(InputError, match=field):
        solve_corrective(replace(d, **{field: arr}), vrows(), None)


def test_bad_rows_are_input_errors():
    with pytest.raises(InputError, match="v_pu"):
        solve_corrective(ders(), replace(vrows(), v_pu=np.array([np.nan])), None)
    with pytest.raises(InputError, match="dv_dp_pu_per_kw"):
        solve_corrective(ders(), replace(vrows(), dv_dp_pu_per_kw=np.array([[np.nan]])), None)
    with pytest.raises(InputError, match="shape"):
        solve_corrective(ders(), vrows(n_points=2), replace(
            CurrentRows(np.array(["l.1"]), np.array([1.0]), np.array([2.0]),
                        np.zeros((1, 3)), np.zeros((1, 3)))))
    with pytest.raises(InputError, match="point"):
        solve_corrective(ders(point=[0, 0, 3]), vrows(n_points=2), None)
    with pytest.raises(InputError, match="empty"):
        d = ders()
        solve_corrective(replace(d, p_min_kw=np.full(3, 5.0)), vrows(), None)
    with pytest.raises(InputError, match="weight"):
        solve_corrective(replace(ders(), weight=np.zeros(3)), vrows(), None)


def test_current_row_and_guard_row():
    # a thermal row relieved by less import; a voltage guard row (not violated) that the
    # action pushes down may not fall below its target
    d = DerState(np.array(["ev0", "ev1"]), np.array([0, 1]), np.array([10.0, 10.0]),
                 np.zeros(2), np.array([10.0, 10.0]), np.zeros(2), np.zeros(2), np.zeros(2),
                 np.ones(2), np.zeros(2, bool))
    i = CurrentRows(np.array(["line.a.1"]), np.array([110.0]), np.array([100.0]),
                    np.array([[1.0, 1.0]]), np.zeros((1, 2)))
    res = solve_corrective(d, None, i)
    assert res.status == "resolved"
    assert res.dp_kw.sum() == pytest.approx(-12.0)  # to 98 A (2 % margin)
    v = VoltageRows(np.array(["x.1"]), np.array([0.957]), np.array([0.95]), np.array([1.05]),
                    np.array([[0.0, 0.001]]), np.zeros((1, 2)), violated=np.array([False]))
    d = replace(d, weight=np.array([1.0, 0.5]))  # ev1 is cheaper but the guard holds it
    res = solve_corrective(d, v, i)
    assert res.status == "resolved"
    assert res.dp_kw[1] == pytest.approx(-4.0, abs=0.01)  # ev1 may lower v to 0.953
    assert res.dp_kw[0] == pytest.approx(-8.0, abs=0.01)
    # pre-existing rows are held to their limit without margin
    i_pre = replace(i, pre_existing=np.array([True]))
    assert solve_corrective(d, None, i_pre).dp_kw.sum() == pytest.approx(-10.0)


def test_greedy_fallback_when_the_lp_fails(monkeypatch):
    def broken(*a, **k):
        raise InfeasibleError("dispatch LP: Time limit reached")

    monkeypatch.setattr(corrective.HighsLP, "solve", broken)
    res = solve_corrective(ders(), vrows(), None)
    assert res.method == "greedy" and res.status == "resolved"
    assert res.margin_after[0] >= 0.003 - 1e-9
    assert any("greedy fallback" in n for n in res.notes)


def test_greedy_and_lp_agree_on_a_single_row():
    lp = solve_corrective(ders(weight=[1, 2, 3]), vrows(), None)
    gr = solve_corrective(ders(weight=[1, 2, 3]), vrows(), None, CorrectiveConfig(method="greedy"))
    assert gr.method == "greedy"
    assert np.allclose(lp.dp_kw, gr.dp_kw, atol=1e-6)
    assert np.allclose(lp.dq_kvar, gr.dq_kvar, atol=1e-6)


def test_lazy_rows_join_when_violated():
    # 5 identical rows: only one is a representative; the others are satisfied with it.
    # A sixth row on another point joins lazily when the first solve leaves it beyond.
    n_rows = 6
    s_p = np.zeros((n_rows, 2))
    s_p[:5, 0] = -0.001
    s_p[5, 1] = -0.001
    v = VoltageRows(np.array([f"n{k}.1" for k in range(n_rows)]), np.full(n_rows, 1.06),
                    np.full(n_rows, 0.95), np.full(n_rows, 1.05), s_p,
                    np.zeros((n_rows, 2)))
    d = ders(n=2, p=-30.0, q_max=0.0, point=[0, 1])
    res = solve_corrective(d, v, None, CorrectiveConfig(lp_rows0=1))
    assert res.status == "resolved" and (res.margin_after >= 0.003 - 1e-9).all()


# -- commands ------------------------------------------------------------------------------
def test_command_issuer_modes_and_one_decision_one_command():
    iss = CommandIssuer(hold_s=300, period_s=5, deadband_kw=0.1)
    first = iss.issue(T0, "c1", ["pv1", "ev1", "bat1"], ["pv", "ev", "battery"],
                      [-3.0, 2.0, -1.0], [np.nan, np.nan, 0.5], ["r"] * 3)
    assert [c.mode for c in first] == [CommandMode.EXPORT_LIMIT, CommandMode.IMPORT_LIMIT,
                                       CommandMode.P_SETPOINT]
    assert first[2].q_kvar == 0.5 and first[0].q_kvar is None
    assert first[0].valid_until - first[0].valid_from == timedelta(seconds=300)
    assert len({c.command_id for c in first}) == 3
    again = iss.issue(T0 + timedelta(seconds=5), "c2", ["pv1", "ev1"], ["pv", "ev"],
                      [-3.05, 1.0], [np.nan, np.nan], ["r"] * 2)
    assert [c.der_id for c in again] == ["ev1"]  # pv1 unchanged within the deadband
    late = iss.issue(T0 + timedelta(seconds=298), "c3", ["pv1"], ["pv"], [-3.0], [np.nan],
                     ["r"])
    assert len(late) == 1  # about to expire: refreshed, a new id
    assert late[0].command_id != first[0].command_id


def test_device_command_checks_and_sink():
    with pytest.raises(InputError, match="export limit"):
        DeviceCommand("id", "pv1", "c", CommandMode.EXPORT_LIMIT, 2.0, T0,
                      T0 + timedelta(minutes=5), "r")
    with pytest.raises(InputError, match="naive"):
        DeviceCommand("id", "pv1", "c", CommandMode.P_SETPOINT, 2.0, T0.replace(tzinfo=None),
                      T0 + timedelta(minutes=5), "r")
    with pytest.raises(InputError, match="not after"):
        DeviceCommand("id", "pv1", "c", CommandMode.P_SETPOINT, 2.0, T0, T0, "r")
    sink = InMemorySink()
    c = DeviceCommand("id", "bat1", "c", CommandMode.P_SETPOINT, -2.0, T0,
                      T0 + timedelta(minutes=5), "r")
    assert sink.send([c]) == 1 and len(sink) == 1
    assert sink.active(T0 + timedelta(minutes=1)) == {"bat1": c}
    assert sink.active(T0 + timedelta(minutes=6)) == {}
    assert c.to_dict()["mode"] == "p_setpoint"


def test_a_der_moved_to_hold_a_guard_row_names_it():
    # d0 clears the violated row a.3 but pushes the guard row b.1 (at its target) up; d2 is
    # moved only to hold b.1: its explanation names that row instead of "no acted row"
    d = ders(n=3, p=-20.0, point=[0, 1, 2])
    v = VoltageRows(np.array(["a.3", "b.1"]), np.array([1.06, 1.047]), np.full(2, 0.95),
                    np.full(2, 1.05), np.array([[-0.001, 0.0, 0.0], [0.0005, 0.0, -0.001]]),
                    np.zeros((2, 3)), violated=np.array([True, False]))
    res = solve_corrective(d, v, None)
    assert res.status == "resolved"
    assert res.dp_kw[0] == pytest.approx(13.0, rel=0.01)  # u-form: ~13 kW
    assert res.dp_kw[2] == pytest.approx(res.dp_kw[0] / 2, rel=0.01)
    assert not res.moved[1]
    why = res.explanations()
    assert "relieves v_max at a.3" in why["d0"]
    assert "no acted row" not in why["d2"]
    assert "holds v_max at b.1 at its target" in why["d2"]


def test_a_der_whose_whole_range_barely_moves_the_row_is_not_swung():
    """Live on EPRI ckt7 and IEEE 34 (independent test): with the EVs' range used up, a
    battery was swung from full discharge to full charge for a 1.1e-5 pu cross-phase
    relief of an undervoltage the others could not clear, every row unit beyond target
    being priced at 1e4. A DER direction whose whole range moves no row by
    ``min_effect`` (0.05 units: 5e-5 pu) is left out."""
    d = DerState(
        der_id=np.array(["ev", "bat"]), point=np.array([0, 1]),
        p_kw=np.array([7.0, -5.0]), p_min_kw=np.array([0.0, -5.0]),
        p_max_kw=np.array([7.0, 5.0]), q_kvar=np.zeros(2), q_min_kvar=np.zeros(2),
        q_max_kvar=np.zeros(2), weight=np.ones(2), fixed=np.zeros(2, bool))
    # 0.02 pu below target: the EV (1e-3 pu/kW) clears 0.007 of it; charging the battery
    # lifts this phase by 1e-6 pu/kW (1e-5 pu over its whole 10 kW swing)
    rows = VoltageRows(np.array(["n1.2"]), np.array([0.935]), np.array([0.95]),
                       np.array([1.05]), np.array([[-1e-3, 1e-6]]), np.zeros((1, 2)))
    res = solve_corrective(d, rows, None)
    assert res.dp_kw[0] == pytest.approx(-7.0)      # the EV stops charging
    assert res.dp_kw[1] == pytest.approx(0.0)       # the battery keeps discharging
    assert res.status == "partial"
    swung = solve_corrective(d, rows, None, CorrectiveConfig(min_effect=0.0))
    assert swung.dp_kw[1] == pytest.approx(10.0)    # the swing, as it was
