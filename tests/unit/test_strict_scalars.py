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
