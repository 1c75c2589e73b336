"""Many small JSON batches validated together (the MQTT ingest's path) give what each
would give alone: the same readings, or the same errors with its own row numbers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from derms.errors import InputError
from derms.ingest.parse import (
    BatchError,
    json_document,
    parse_json,
    validate_documents,
)

GOOD = {"series": "inv-1", "quantity": "p", "unit": "kW", "t": "2026-11-25T10:00:00Z",
        "value": 3.5}
# (field, bad or odd value) a row may carry
ODD = [("value", "nan"), ("value", True), ("value", "3.25"), ("value", 10**400),
       ("value", None), ("t", "2026-11-25T10:00:00"), ("t", "2026-11-25"), ("t", "soon"),
       ("t", "2026-11-25T10:00:00+01"), ("t", "2026-11-25t10:00:00z"), ("unit", "kWh"),
       ("unit", "MW"), ("quantity", ""), ("series", ""), ("series", 17), ("series", 17.0),
       ("series", "ghost"), ("quality", -1), ("quality", 3), ("value", 1e308)]


def _doc(rng: np.random.Generator, k: int) -> str:
    rows = []
    for i in range(int(rng.integers(1, 6))):
        row = dict(GOOD, series=f"inv-{rng.integers(0, 4)}", value=float(k + i))
        row["t"] = f"2026-11-25T10:{i:02d}:{k % 60:02d}Z"
        if rng.random() < 0.3:
            field, value = ODD[int(rng.integers(len(ODD)))]
            row[field] = value
        if rng.random() < 0.05:
            row.pop("unit")
        rows.append(row)
    form = rng.integers(4)
    if form == 0 and len(rows) == 1:
        return json.dumps(rows[0])
    if form == 1:
        keys = list(dict.fromkeys(k for r in rows for k in r))
        return json.dumps({k: [r.get(k) for r in rows] for k in keys})
    if form == 2:
        return json.dumps({"readings": rows})
    if form == 3 and rng.random() < 0.3:  # the alias for series
        rows = [{("device" if k == "series" else k): v for k, v in r.items()} for r in rows]
    return json.dumps(rows)


def _same(a, b) -> None:
    if isinstance(a, InputError) or isinstance(b, InputError):
        assert type(a) is type(b), (a, b)
        assert str(a) == str(b)
        assert [vars(e) if not hasattr(e, "__slots__") else (e.row, e.field, e.detail)
                for e in getattr(a, "errors", [])] == \
               [vars(e) if not hasattr(e, "__slots__") else (e.row, e.field, e.detail)
                for e in getattr(b, "errors", [])]
        return
    assert a.source == b.source
    for name in ("series", "quantity", "t_us", "value", "quality"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


@pytest.mark.parametrize("seed", range(6))
def test_validated_together_equals_validated_alone(seed):
    rng = np.random.default_rng(seed)
    bodies = [_doc(rng, k) for k in range(80)]
    known = {"inv-0", "inv-1", "inv-2", "inv-3", "17", "17.0"}
    docs = [json_document(b) for b in bodies]
    together = validate_documents(docs, source="der", known_series=known)
    n_bad = 0
    for body, got in zip(bodies, together, strict=True):
        try:
            alone = parse_json(body, source="der", known_series=known)
        except InputError as exc:
            alone = exc
            n_bad += 1
        _same(got, alone)
    assert 0 < n_bad < len(bodies)  # both kinds were exercised


def test_a_json_object_naming_a_field_twice_is_refused():
    """The last one silently won: a reading stored under another series than meant."""
    with pytest.raises(InputError, match="'series' twice"):
        parse_json('{"series": "m-1", "quantity": "p", "unit": "kW", '
                   '"t": "2026-11-25T10:00:00Z", "value": 1, "series": "m-2"}')


def test_iso_8601_zones_and_what_has_none():
    def t(text):
        return parse_json(json.dumps(dict(GOOD, t=text))).t[0].isoformat()

    assert t("2026-11-25T10:00:00z") == "2026-11-25T10:00:00+00:00"
    assert t("2026-11-25t10:00:00+01") == "2026-11-25T09:00:00+00:00"
    assert t("2026-11-25 10:00:00-0500") == "2026-11-25T15:00:00+00:00"
    for naive in ("2026-11-25", "2026-11-25T10:00:00", "2026-11-25T10:00"):
        with pytest.raises(BatchError, match="has no zone"):
            parse_json(json.dumps(dict(GOOD, t=naive)))


def test_a_value_beyond_the_float_range_after_its_unit_is_a_row_error():
    """1e308 MW passed the parser as inf kW and the store refused the whole batch with a
    message about non-finite values and no row."""
    with pytest.raises(BatchError) as exc:
        parse_json(json.dumps([GOOD, dict(GOOD, unit="MW", value=1e308)]))
    assert [(e.row, e.field) for e in exc.value.errors] == [(1, "value")]
    assert "1e+308 MW" in exc.value.errors[0].detail


def test_the_count_is_of_rows_not_of_problems():
    with pytest.raises(BatchError, match=r"^2 invalid row\(s\) of 3 \(3 problems\)"):
        parse_json(json.dumps([GOOD, dict(GOOD, t="x", value="y"), dict(GOOD, unit="?")]))


def test_a_cut_error_list_still_gives_each_document_its_own():
    """The checker lists at most 1,000 rows per check: together, the first document's 900
    bad values left room for only 100 of the second's 300."""
    bad = dict(GOOD, value="x")
    bodies = [json.dumps([bad] * 900), json.dumps([GOOD] * 5), json.dumps([bad] * 300)]
    got = validate_documents([json_document(b) for b in bodies], source="der")
    for body, g in zip(bodies, got, strict=True):
        try:
            alone = parse_json(body, source="der")
        except InputError as exc:
            alone = exc
        _same(g, alone)
    assert len(got[2].errors) == 300


def test_texts_pandas_would_not_mix_cost_only_their_own_message():
    """A naive time beside one whose offset the zone pattern misses raised pandas'
    "Mixed timezones" (a ValueError): validated together, every message of the source
    was refused with it (a review), and alone such a body was a 500 on the REST API."""
    odd = [dict(GOOD, t="2026-07-01T00:00:00"), dict(GOOD, t="2026-07-01T00:00:00 +05:00")]
    bodies = [json.dumps([GOOD])] * 4 + [json.dumps([r]) for r in odd] + [json.dumps(odd)]
    got = validate_documents([json_document(b) for b in bodies], source="der")
    assert all(not isinstance(g, InputError) for g in got[:4])
    for g in got[4:]:
        assert isinstance(g, BatchError) and g.errors[0].field == "t", g
    with pytest.raises(BatchError):
        parse_json(bodies[-1])


def test_a_field_named_twice_is_refused_in_utf_16_too():
    """The duplicate-key fast path counted key ends in the raw bytes: in UTF-16 a key ends
    in '"\\x00:\\x00' (never counted) while U+3A22 encodes as '":': a repeated key passed
    (an independent review). Bodies that are not UTF-8 take the exact check."""
    for enc, ch in (("utf-16-le", "\u3a22"), ("utf-16-be", "\u223a"), ("utf-16", "\u3a22")):
        # five keys decoded, five '":' in the raw bytes (all inside the string)
        text = ('{"series": "%s", "series": "inv-2", "quantity": "p", "unit": "kW", '
                '"t": "2026-07-01T00:00:00Z", "value": 1.0}' % (ch * 5))
        with pytest.raises(InputError, match="'series' twice"):
            json_document(text.encode(enc))
        one = text.replace('"series": "inv-2", ', "")
        assert json_document(one.encode(enc)).n_rows == 1
