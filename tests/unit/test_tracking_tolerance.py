"""Delivery tolerance of a command (``derms.control.tracking.tolerance_kw``).

The 0.5 kW floor made small LV devices unverifiable: a 1.5 kW PV told to export nothing
was "delivered" at up to 0.5 kW of export (independent live test on the European LV
case). The floor is capped at a tenth of the rating; larger DERs are unchanged."""

from __future__ import annotations

import pytest

from derms.control.tracking import TrackingConfig, tolerance_kw

CFG = TrackingConfig()


@pytest.mark.parametrize(("rating_kw", "tol_kw"), [
    (1.5, 0.15),     # LV PV: a tenth of its rating, not 0.5 kW
    (0.2, 0.02),
    (5.0, 0.5),      # from 5 kW on, the 0.5 kW floor as before
    (7.0, 0.5),
    (20.0, 1.0),     # 5 % of the rating above 10 kW
    (0.0, 0.5),      # no rating known: the floor
])
def test_tolerance(rating_kw, tol_kw):
    assert tolerance_kw(rating_kw, CFG) == pytest.approx(tol_kw)
