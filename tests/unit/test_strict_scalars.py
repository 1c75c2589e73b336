"""Request models: numbers are JSON numbers, booleans JSON booleans (lax pydantic took
``true`` for 1.0 kVA, ``"0.3"`` for 0.3 and ``"yes"`` for true)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from derms.api.routes_registry import DeviceIn

GOOD = {"der_id": "d1", "site_id": "s1", "der_type": "pv", "s_max_kva": 5,
        "p_gen_max_kw": 4.5}


@pytest.mark.parametrize("change", [{"s_max_kva": True}, {"s_max_kva": "5"},
                                    {"p_gen_max_kw": False}, {"e_max_kwh": "10"}])
def test_text_and_booleans_are_not_numbers(change):
    with pytest.raises(ValidationError, match=next(iter(change))):
        DeviceIn(**{**GOOD, **change})


def test_numbers_and_nulls_pass():
    d = DeviceIn(**{**GOOD, "e_max_kwh": None, "q_max_kvar": 2})
    assert d.s_max_kva == 5.0 and d.q_max_kvar == 2.0 and d.e_max_kwh is None


def test_lists_and_text_or_number_fields_are_checked_too():
    """Numbers inside lists (a volt-var curve's points) and a field that takes a number or
    one word (``group_size``: 4 or "auto") were left lax: ``true`` became 1."""
    from derms.api.routes_dispatch import PlanBody
    from derms.api.routes_ieee2030_5_events import CurveIn

    with pytest.raises(ValidationError, match="x: "):
        CurveIn.model_validate({"kind": "volt_var", "x": [True, "95", 105], "y": [44, 0, 0]})
    for bad in (True, "4", "some"):
        with pytest.raises(ValidationError, match="group_size"):
            PlanBody(feeder="ieee13", group_size=bad)
    assert PlanBody(feeder="ieee13", group_size="auto").group_size == "auto"
    assert PlanBody(feeder="ieee13", group_size=4).group_size == 4
