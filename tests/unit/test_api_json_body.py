"""Strict JSON bodies (duplicate keys, REST sweep D14), the scope a route needs (D9's 403)
and CSV rows pandas cannot read (D13): the pieces, without a database."""

from __future__ import annotations

import json
from typing import Annotated

import pytest
from fastapi import Depends, FastAPI

from derms.api.auth import Principal, require, scope_needed
from derms.api.json_body import decode
from derms.errors import InputError
from derms.ingest.parse import BatchError, parse_csv


@pytest.mark.parametrize("text", [
    '{"a": 1, "a": 2}',
    '{"a": {"b": 1, "b" : 2}}',
    '[{"x": 1}, {"y": [1, {"z": 0, "z": 0}]}]',
    '{"a": 1,\n "a"\t:\r\n2}',
])
def test_a_repeated_key_anywhere_is_refused(text):
    with pytest.raises(InputError, match="twice"):
        decode(text.encode())


@pytest.mark.parametrize("doc", [
    {"a": 'x": 1, "a": 2'},          # key-like text inside a string
    {"a": ["b", "c"], "b": {"a": 1}},  # the same name in different objects
    [], {}, "s", 1.5, None, [{"k": '":'}, {"k": '"  :'}],
])
def test_no_false_alarm(doc):
    assert decode(json.dumps(doc).encode()) == doc


@pytest.mark.parametrize("enc", ["utf-16-le", "utf-16-be", "utf-16", "utf-32"])
def test_a_repeated_key_is_refused_in_utf_16_and_32_bodies(enc):
    """Key ends were counted in the raw bytes: in UTF-16 a key ends in '"\\x00:\\x00'
    (never counted) while U+3A22 (LE) or U+223A (BE) encodes as '":', so one such
    character made the counts agree and the repeated key pass (as in the ingest's
    json_document, an independent review). Counted on the UTF-8 text now."""
    ch = "\u223a" if enc == "utf-16-be" else "\u3a22"
    text = '{"a": "' + ch + '", "a": 1}'
    with pytest.raises(InputError, match="twice"):
        decode(text.encode(enc))
    assert decode(('{"a": "' + ch + '"}').encode(enc)) == {"a": ch}


def test_invalid_json_is_left_to_fastapi():
    with pytest.raises(ValueError) as info:
        decode(b"{")
    assert not isinstance(info.value, InputError)


def test_scope_needed_reads_the_require_dependency():
    app = FastAPI()

    @app.post("/x")
    def x(p: Annotated[Principal, Depends(require("operate"))]):
        return {}

    @app.get("/open")
    def open_():
        return {}

    routes = {r.path: r for r in app.router.routes if hasattr(r, "dependant")}
    assert scope_needed(routes["/x"]) == "operate"
    assert scope_needed(routes["/open"]) is None


HEAD = "device,quantity,unit,t,value\n"


@pytest.mark.parametrize("rows,bad", [
    (["inv-1,p,kW,2026-01-01T00:00:00Z,1", "inv-1,p,kW,2026-01-01T00:00:01Z,1,extra"], [1]),
    (["inv-1,p,kW,2026-01-01T00:00:00Z,1,x", "", "inv-1,p,kW,2026-01-01T00:00:01Z,1,y,z"],
     [0, 1]),  # a blank line is no row (pandas skips it too)
    (['inv-1,p,"kW,2026-01-01T00:00:00Z,1', "inv-1,p,kW,2026-01-01T00:00:01Z,1"], [0]),
])
def test_csv_rows_pandas_cannot_read_are_listed(rows, bad):
    with pytest.raises(BatchError) as info:
        parse_csv(HEAD + "\n".join(rows) + "\n")
    assert [e.row for e in info.value.errors] == bad
