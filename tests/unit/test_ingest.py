import json

import numpy as np
import pandas as pd
import pytest

from derms.errors import InputError
from derms.ingest.parse import BatchError, parse_csv, parse_json
from derms.ingest.quality import Quality, quality_flags
from derms.ingest.units import canonical

ROWS = [
    {"device": "inv-1", "quantity": "p", "unit": "W", "t": "2026-11-25T10:00:00Z", "value": 1500},
    {"device": "inv-1", "quantity": "v", "unit": "V", "t": "2026-11-25T10:00:00+01:00",
     "value": 239.5},
    {"meter": "m-7", "quantity": "soc", "unit": "%", "t": "2026-11-25T10:00:00Z", "value": 55},
]


def test_units_are_translated_once():
    assert canonical("p", "MW") == ("p_kw", 1e3)
    assert canonical("p_kw", None) == ("p_kw", 1.0)
    with pytest.raises(InputError, match="'p'/'furlongs'"):
        canonical("p", "furlongs")


def test_per_phase_quantities_of_head_scada():
    """A feeder head's per-phase SCADA (what the monitor and the control loop read)."""
    assert canonical("p_a", "MW") == ("p_a_kw", 1e3)
    assert canonical("q_c", "var") == ("q_c_kvar", 1e-3)
    assert canonical("v_b", "kV") == ("v_b_v", 1e3)
    assert canonical("v_a_pu", None) == ("v_a_pu", 1.0)
    with pytest.raises(InputError):
        canonical("p_d", "kW")


def test_json_rows_and_columns_agree():
    rows = [dict(r) for r in ROWS]
    for r in rows:
        r["series"] = r.pop("device", None) or r.pop("meter")
    a = parse_json(json.dumps(rows))
    cols = {k: [r[k] for r in rows] for k in rows[0]}
    b = parse_json(json.dumps(cols))
    np.testing.assert_array_equal(a.value, b.value)
    assert list(a.quantity) == ["p_kw", "v_v", "soc_frac"]
    np.testing.assert_allclose(a.value, [1.5, 239.5, 0.55])
    assert a.t[1] == pd.Timestamp("2026-11-25T09:00:00Z")  # +01:00 normalised to UTC


def test_csv():
    text = "device,quantity,unit,timestamp,value\ninv-1,p,kW,2026-11-25T10:00:00Z,2.5\n"
    batch = parse_csv(text, known_series={"inv-1"})
    assert len(batch) == 1 and batch.quantity[0] == "p_kw"


@pytest.mark.parametrize("row,field,fragment", [
    ({"t": "2026-11-25T10:00:00"}, "t", "no zone"),
    ({"t": "yesterday Z"}, "t", "not ISO 8601"),
    ({"t": "yesterday"}, "t", "not ISO 8601 with a zone"),  # said "no zone"
    ({"value": "NaN"}, "value", "finite"),
    ({"value": float("inf")}, "value", "finite"),
    ({"value": "abc"}, "value", "finite"),
    ({"unit": "furlongs"}, "unit", "unknown quantity/unit"),
    ({"device": "ghost"}, "series", "unknown series id"),
    ({"device": ""}, "series", "missing"),
    ({"quality": -3}, "quality", "integer"),
])
def test_row_level_errors(row, field, fragment):
    rows = [dict(r) for r in ROWS[:2]] + [{**ROWS[0], **row}]
    with pytest.raises(BatchError) as exc:
        parse_json(json.dumps(rows), known_series={"inv-1"})
    errs = exc.value.errors
    assert [(e.row, e.field) for e in errs] == [(2, field)]
    assert fragment in errs[0].detail


def test_whole_batch_problems():
    with pytest.raises(InputError, match="not valid JSON"):
        parse_json(b"{not json")
    with pytest.raises(InputError, match="missing field"):
        parse_json(json.dumps([{"device": "a", "value": 1}]))
    with pytest.raises(BatchError, match="not a JSON object"):
        parse_json(json.dumps([ROWS[0], 5]))
    with pytest.raises(InputError, match="equal length"):
        parse_json(json.dumps({"series": ["a"], "value": [1, 2]}))
    with pytest.raises(InputError, match="not UTF-8"):
        parse_csv(b"\xff\xfe")


def test_quality_flags():
    t = (np.arange(20) * 60 * 1_000_000).astype(np.int64)
    t[15:] += 600 * 1_000_000  # a 10-minute gap before reading 15
    v = np.sin(np.arange(20) / 3.0)
    v[5] = 40.0  # spike
    v[8:14] = 0.25  # stuck for 6 readings
    v[17] = 5.0  # out of range for v_pu (0..2)
    s = np.array(["a"] * 20, dtype=object)
    q = np.array(["v_pu"] * 20, dtype=object)
    perm = np.random.default_rng(0).permutation(20)  # order must not matter
    flags = np.empty(20, dtype=np.int16)
    flags[perm] = quality_flags(s[perm], q[perm], t[perm], v[perm])
    assert flags[5] & Quality.SPIKE and flags[5] & Quality.OUT_OF_RANGE
    assert flags[13] & Quality.STUCK and not flags[12] & Quality.STUCK
    assert flags[15] & Quality.GAP and not flags[16] & Quality.GAP
    assert flags[17] & Quality.OUT_OF_RANGE
    clean = [0, 1, 2, 3, 10 - 8, 19]
    assert not any(flags[i] & Quality.SPIKE for i in clean)


def _one(t="2026-11-25T10:00:00Z", value=1.0, quantity="v", unit="pu"):
    return json.dumps([{"series": "m1", "quantity": quantity, "unit": unit, "t": t,
                        "value": value}])


@pytest.mark.parametrize("t", ["0001-01-01T00:00:00+05:00", "9999-12-31T23:59:59-05:00"])
def test_timestamp_out_of_range_in_utc_is_a_row_error(t):
    """The UTC instant must be a datetime (years 1..9999): the read routes refuse such
    times ("out of range in UTC"), so ingest must not store them."""
    with pytest.raises(BatchError) as exc:
        parse_json(_one(t=t))
    assert exc.value.errors[0].field == "t"
    assert "out of range" in exc.value.errors[0].detail


def test_value_outside_physical_range_is_flagged_out_of_range():
    """A voltage of 120 pu (volts sent as pu) is stored flagged OUT_OF_RANGE, so the
    monitor's good-quality reads skip it; values inside the range stay good."""
    rows = [{"series": "m1", "quantity": "v", "unit": "pu", "t": "2026-11-25T10:00:00Z",
             "value": v} for v in (120.0, -1.0, 1.02)]
    rows.append({"series": "m1", "quantity": "p", "unit": "kW", "t": "2026-11-25T10:00:00Z",
                 "value": 1e12})
    b = parse_json(json.dumps(rows))
    flagged = (b.quality & int(Quality.OUT_OF_RANGE)) != 0
    assert flagged.tolist() == [True, True, False, True]
