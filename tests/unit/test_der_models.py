"""DER models: validation, fleet arrays, EV/group feasibility messages, disaggregation."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from derms.der.models import (
    Battery,
    Connection,
    DERGroup,
    EVSession,
    Fleet,
    FlexibleLoad,
    GroupRequest,
    Horizon,
    PVInverter,
    check_group_requests,
    disaggregate,
    fleet_arrays,
)
from derms.errors import InfeasibleError, InputError

T0 = datetime(2026, 7, 1, tzinfo=UTC)
H = Horizon(T0, timedelta(minutes=15), 8)
C1 = Connection("b1", (1, 0), 1, 2.4)
C3 = Connection("b3", (1, 2, 3), 3, 4.16)
CD = Connection("b2", (1, 2), 1, 4.16, "delta")


def test_injection_nodes_leave_out_ground():
    assert C1.injection_nodes == ("b1.1",)
    assert C3.injection_nodes == ("b3.1", "b3.2", "b3.3")
    assert CD.injection_nodes == ("b2.1", "b2.2")


def test_validation_names_the_der():
    with pytest.raises(InputError, match="battery x"):
        Battery("x", C1, 5, 10, soc0_frac=0.05, soc_min_frac=0.1)
    with pytest.raises(InputError, match="EV e"):
        EVSession("e", C1, T0, T0, 5, 7)
    with pytest.raises(InputError, match="timezone"):
        Horizon(datetime(2026, 1, 1), timedelta(minutes=15), 4)
    with pytest.raises(InputError, match="used twice"):
        Fleet(H, batteries=(Battery("a", C1, 1, 2), Battery("a", C1, 1, 2)))


def test_fleet_arrays_windows_and_energy_bounds():
    ev = EVSession("ev", C1, T0 + timedelta(minutes=20), T0 + timedelta(hours=1), 3.0, 7.0)
    bat = Battery("b", C3, 5, 10, soc0_frac=0.5, soc_min_frac=0.1, reserve_frac=0.2)
    flex = FlexibleLoad("f", C1, np.full(8, 2.0), T0, T0 + timedelta(hours=1),
                        shed_max_frac=0.5)
    a = fleet_arrays(Fleet(H, batteries=(bat,), evs=(ev,), flex=(flex,)))
    # EV plugged in over [00:20, 01:00): whole intervals 00:30 and 00:45 only
    assert a.ev_window[:, 0].tolist() == [False, False, True, True, False, False, False, False]
    assert a.bat_e_min_kwh[0] == pytest.approx(2.0)  # reserve above soc_min
    assert a.flex_shed_max_kw[:4, 0].tolist() == [1.0] * 4 and a.flex_shed_max_kw[4:].sum() == 0


def test_ev_that_cannot_get_its_energy_is_explained():
    ev = EVSession("ev7", C1, T0, T0 + timedelta(minutes=30), 10.0, 7.0, eta_charge=1.0)
    with pytest.raises(InfeasibleError, match=r"EV ev7: needs 10.00 kWh .* at most 3.50 kWh"):
        fleet_arrays(Fleet(H, evs=(ev,)))


def test_ev_departing_after_horizon_needs_only_the_rest():
    ev = EVSession("ev", C1, T0, T0 + timedelta(hours=4), 10.0, 4.0, eta_charge=1.0)
    a = fleet_arrays(Fleet(H, evs=(ev,)))  # 2 h inside, 2 h after: 8 kWh can come later
    assert a.ev_e_required_kwh[0] == pytest.approx(2.0)


def test_group_request_beyond_capability():
    pv = PVInverter("pv", C1, 5.0, np.full(8, 4.0))
    bat = Battery("b", C1, 3.0, 10.0)
    f = Fleet(H, pv=(pv,), batteries=(bat,), groups=(DERGroup("g", ("pv", "b")),),
              requests=(GroupRequest("g", T0, T0 + timedelta(hours=1), 8.0),))
    with pytest.raises(InfeasibleError, match=r"group g: asked for 8.0 kW .* at most 7.0 kW"):
        check_group_requests(f)
    ok = Fleet(H, pv=(pv,), batteries=(bat,), groups=(DERGroup("g", ("pv", "b")),),
               requests=(GroupRequest("g", T0, T0 + timedelta(hours=1), 6.0),))
    check_group_requests(ok)


def test_disaggregate_by_headroom():
    out = disaggregate("g", 6.0, [1.0, 2.0, 3.0], ["a", "b", "c"])
    np.testing.assert_allclose(out, [1.0, 2.0, 3.0])
    with pytest.raises(InfeasibleError, match="group g: asked for 7.0 kW .* 6.0 kW"):
        disaggregate("g", 7.0, [1.0, 2.0, 3.0], ["a", "b", "c"])


def test_with_horizon_replaces_forecasts_and_soc():
    pv = PVInverter("pv", C1, 5.0, np.full(8, 4.0))
    bat = Battery("b", C1, 3.0, 10.0)
    f = Fleet(H, pv=(pv,), batteries=(bat,))
    h2 = Horizon(T0 + timedelta(hours=1), H.step, 8)
    g = f.with_horizon(h2, pv_avail_kw=np.full((8, 1), 2.0), soc0_frac=np.array([0.8]))
    assert g.pv[0].p_avail_kw.max() == 2.0 and g.batteries[0].soc0_frac == 0.8
