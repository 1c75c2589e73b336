"""The arbiter: precedence, expiry, scopes, ties and bad input (pure, no I/O)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone

import pytest

from derms.control.arbiter import (
    APPLIED,
    CLAMPED,
    OVERRIDDEN,
    SUPERSEDED,
    SUPPRESSED,
    Arbiter,
    RequestConflict,
)
from derms.control.requests import (
    CommandKind,
    ControlRequest,
    DeviceLocation,
    Scope,
    ScopeKind,
    Source,
)
from derms.errors import InputError

T0 = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
H = timedelta(hours=1)
LOC = DeviceLocation("bat-1", feeder_id="f1", bus="671.1.2", connection_point="site-1")
OTHER = DeviceLocation("pv-9", feeder_id="f2", bus="671", connection_point="site-9")


def req(rid, source, kind, scope=None, value=None, start=T0, expiry=T0 + H, **kw):
    return ControlRequest(rid, Source(source), CommandKind(kind), scope or Scope.device("bat-1"),
                          start, expiry, value_kw=value, **kw)


def opt(rid="opt", value=-5.0, **kw):
    return req(rid, "optimisation", "optimisation_setpoint", value=value, **kw)


def oper(rid="op", value=3.0, **kw):
    return req(rid, "operator", "operator_setpoint", value=value, **kw)


def block(rid, source="adms", scope=None, **kw):
    return req(rid, source, "block_dispatch", scope or Scope.feeder("f1"), **kw)


# ------------------------------------------------------------------------- precedence


def test_adms_block_overrides_operator_which_overrides_optimisation():
    arb = Arbiter([opt(), oper()])
    d = arb.resolve(LOC, T0)
    assert (d.setpoint_kw, d.setpoint_by, d.blocked) == (3.0, "op", False)
    assert d.ruling("opt").outcome == OVERRIDDEN and d.ruling("opt").by == "op"
    arb.submit(block("adms-b"))
    d = arb.resolve(LOC, T0 + timedelta(minutes=1))
    assert d.blocked and d.blocked_by == "adms-b" and d.setpoint_kw is None
    assert d.ruling("op").outcome == OVERRIDDEN and d.ruling("op").by == "adms-b"
    assert d.ruling("opt").outcome == OVERRIDDEN and d.ruling("opt").by == "adms-b"
    assert "blocked by adms-b" in d.reason


def test_safety_outranks_adms_and_operator_block_stops_only_its_level_and_below():
    arb = Arbiter([block("adms-b"), block("safe-b", source="safety", scope=Scope.device("bat-1"))])
    assert arb.resolve(LOC, T0).blocked_by == "safe-b"
    assert arb.resolve(LOC, T0).ruling("adms-b").outcome == SUPERSEDED
    arb = Arbiter([oper(), opt(), block("op-b", source="operator")])
    d = arb.resolve(LOC, T0)
    assert d.blocked_by == "op-b" and d.setpoint_kw is None
    assert d.ruling("op").by == "op-b" and d.ruling("opt").by == "op-b"


def test_limits_highest_authority_wins_per_target_tightest_within_a_level():
    f1 = Scope.feeder("f1")
    arb = Arbiter([
        req("opt-l", "optimisation", "limit_export", f1, value=10.0),
        req("adms-l1", "adms", "limit_export", f1, value=500.0),
        req("adms-l2", "adms", "limit_export", f1, value=300.0),
        req("op-imp", "operator", "limit_import", Scope.point("site-1"), value=7.0),
    ])
    d = arb.resolve(LOC, T0)
    assert d.limit(CommandKind.LIMIT_EXPORT, ScopeKind.FEEDER) == 300.0
    assert d.ruling("adms-l2").outcome == APPLIED
    assert d.ruling("adms-l1").outcome == SUPERSEDED and d.ruling("adms-l1").by == "adms-l2"
    assert d.ruling("opt-l").outcome == OVERRIDDEN and d.ruling("opt-l").by == "adms-l2"
    assert d.limit(CommandKind.LIMIT_IMPORT, ScopeKind.CONNECTION_POINT) == 7.0
    assert d.limit(CommandKind.LIMIT_IMPORT) is None  # no device-scoped limit


def test_device_limit_clamps_a_lower_setpoint_and_yields_to_a_higher_one():
    dev = Scope.device("bat-1")
    arb = Arbiter([opt(value=-8.0), req("adms-x", "adms", "limit_export", dev, value=2.0)])
    d = arb.resolve(LOC, T0)
    assert d.setpoint_kw == -2.0 and d.ruling("opt").outcome == CLAMPED
    assert d.ruling("opt").by == "adms-x"
    # an optimisation device limit does not bind an operator override that breaks it ...
    arb = Arbiter([oper(value=-8.0), req("opt-x", "optimisation", "limit_export", dev, value=2.0)])
    d = arb.resolve(LOC, T0)
    assert d.setpoint_kw == -8.0 and d.ruling("opt-x").outcome == OVERRIDDEN
    assert d.limit(CommandKind.LIMIT_EXPORT) is None
    # ... and one the setpoint respects stays in force
    arb = Arbiter([oper(value=1.0), req("opt-x", "optimisation", "limit_export", dev, value=2.0)])
    assert arb.resolve(LOC, T0).limit(CommandKind.LIMIT_EXPORT) == 2.0
    # import limits clamp charging (positive) setpoints
    arb = Arbiter([opt(value=9.0), req("s-i", "safety", "limit_import", dev, value=4.0)])
    assert arb.resolve(LOC, T0).setpoint_kw == 4.0


def test_abnormal_configuration_suppresses_plans_made_before_it_not_replans():
    abn = req("abn", "adms", "abnormal_configuration", Scope.feeder("f1"),
              start=T0 + 10 * timedelta(minutes=1), expiry=T0 + 2 * H)
    old = opt("old", value=-5.0, start=T0 + 20 * timedelta(minutes=1), issued_at=T0)
    arb = Arbiter([abn, old])
    d = arb.resolve(LOC, T0 + 30 * timedelta(minutes=1))
    assert d.setpoint_kw is None and d.ruling("old").outcome == SUPPRESSED
    assert d.abnormal_by == ("abn",)
    arb.submit(opt("new", value=-1.0, start=T0 + 20 * timedelta(minutes=1),
                   issued_at=T0 + 15 * timedelta(minutes=1)))
    d = arb.resolve(LOC, T0 + 30 * timedelta(minutes=1))
    assert (d.setpoint_kw, d.setpoint_by) == (-1.0, "new")
    # an operator override is not a plan: the abnormal configuration leaves it alone
    arb = Arbiter([abn, oper(value=2.0, issued_at=T0)])
    assert arb.resolve(LOC, T0 + 30 * timedelta(minutes=1)).setpoint_kw == 2.0


# ----------------------------------------------------------------------------- expiry


def test_expiry_restores_the_next_level_and_is_half_open():
    arb = Arbiter([opt(expiry=T0 + 3 * H), oper(expiry=T0 + 2 * H), block("b", expiry=T0 + H)])
    assert arb.resolve(LOC, T0 + H - timedelta(microseconds=1)).blocked
    d = arb.resolve(LOC, T0 + H)  # [start, expiry): the block no longer applies at its expiry
    assert not d.blocked and d.setpoint_by == "op"
    assert arb.resolve(LOC, T0 + 2 * H).setpoint_by == "opt"
    d = arb.resolve(LOC, T0 + 3 * H)
    assert d.setpoint_kw is None and d.rulings == () and "default control" in d.reason
    assert arb.resolve(LOC, T0 - timedelta(seconds=1)).rulings == ()  # not started yet


def test_withdrawal_and_prune():
    arb = Arbiter([oper(), opt()])
    w, changed = arb.withdraw("op", T0 + timedelta(minutes=5))
    assert changed and w.withdrawn_at == T0 + timedelta(minutes=5)
    assert arb.resolve(LOC, T0 + timedelta(minutes=4)).setpoint_by == "op"
    assert arb.resolve(LOC, T0 + timedelta(minutes=5)).setpoint_by == "opt"
    assert arb.withdraw("op", T0 + timedelta(minutes=6))[1] is False  # idempotent
    assert arb.withdraw("opt", T0 + 2 * H)[1] is False  # already expired
    gone = arb.prune(T0 + H)
    assert {r.request_id for r in gone} == {"op", "opt"} and len(arb) == 0
    with pytest.raises(InputError, match="unknown control request 'nope'"):
        arb.withdraw("nope", T0)


# ----------------------------------------------------------------------------- scopes


def test_scopes_cover_the_right_devices():
    sec = Scope.section("f1", "zone-3", ["671", "692"])
    arb = Arbiter([block("b-sec", scope=sec)])
    assert arb.resolve(LOC, T0).blocked  # bus 671.1.2 normalised to 671
    assert not arb.resolve(DeviceLocation("x", feeder_id="f1", bus="680"), T0).blocked
    assert not arb.resolve(OTHER, T0).blocked  # bus 671 but another feeder
    assert not arb.resolve(DeviceLocation("x", feeder_id="f1"), T0).blocked  # bus unknown
    arb = Arbiter([block("b-cp", scope=Scope.point("site-9")), block("b-f", scope=Scope.feeder("f1"))])
    assert arb.resolve(OTHER, T0).blocked_by == "b-cp"
    assert arb.resolve(LOC, T0).blocked_by == "b-f"
    assert not arb.resolve(DeviceLocation("lost"), T0).blocked


# ------------------------------------------------------------------------------- ties


def test_ties_are_deterministic():
    # same level, same time: the newest issued wins, then the later start, then the larger id
    a = oper("op-a", value=1.0, issued_at=T0)
    b = oper("op-b", value=2.0, issued_at=T0 + timedelta(seconds=1))
    assert Arbiter([a, b]).resolve(LOC, T0).setpoint_by == "op-b"
    assert Arbiter([b, a]).resolve(LOC, T0).ruling("op-a").outcome == SUPERSEDED
    c, d = oper("op-c", value=1.0), oper("op-d", value=2.0)
    assert Arbiter([c, d]).resolve(LOC, T0).setpoint_by == "op-d"
    assert Arbiter([d, c]).resolve(LOC, T0).setpoint_by == "op-d"
    # equal limits at one level: the smaller id applies, the other is superseded
    f1 = Scope.feeder("f1")
    e = req("lim-b", "adms", "limit_import", f1, value=5.0)
    f = req("lim-a", "adms", "limit_import", f1, value=5.0)
    dec = Arbiter([e, f]).resolve(LOC, T0)
    assert [lim.request_id for lim in dec.limits] == ["lim-a"]
    assert dec.ruling("lim-b").outcome == SUPERSEDED


def test_idempotent_resend_and_conflict():
    arb = Arbiter([oper()])
    assert arb.submit(oper()) is False
    with pytest.raises(RequestConflict, match="exists with other content"):
        arb.submit(oper(value=4.0))


# -------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs, match", [
    ({"start": datetime(2026, 11, 25, 12)}, "naive datetime"),
    ({"expiry": datetime(2026, 11, 25, 13)}, "naive datetime"),
    ({"expiry": T0}, "expiry .* is not after start"),
    ({"expiry": T0 - H}, "is not after start"),
    ({"value": float("nan")}, "not finite"),
    ({"value": None}, "needs value_kw"),
    ({"value": True}, "needs value_kw"),
])
def test_bad_setpoints_raise_clear_errors(kwargs, match):
    with pytest.raises(InputError, match=match):
        oper(**kwargs)


def test_bad_kinds_sources_scopes_and_values():
    with pytest.raises(InputError, match="limits are magnitudes"):
        req("x", "adms", "limit_export", Scope.feeder("f1"), value=-1.0)
    with pytest.raises(InputError, match="source optimisation may not ask block_dispatch"):
        block("x", source="optimisation")
    with pytest.raises(InputError, match="source adms may not ask operator_setpoint"):
        req("x", "adms", "operator_setpoint", value=1.0)
    with pytest.raises(InputError, match="applies to one device"):
        req("x", "operator", "operator_setpoint", Scope.feeder("f1"), value=1.0)
    with pytest.raises(InputError, match="feeder or a section"):
        req("x", "adms", "abnormal_configuration", Scope.device("bat-1"))
    with pytest.raises(InputError, match="takes no value_kw"):
        block("x", value=3.0)
    with pytest.raises(InputError, match="source 'ems' unknown"):
        ControlRequest("x", "ems", CommandKind.BLOCK_DISPATCH, Scope.feeder("f1"), T0, T0 + H)
    with pytest.raises(InputError, match="scope kind 'substation' unknown"):
        Scope.from_dict({"kind": "substation", "feeder_id": "f1"})
    with pytest.raises(InputError, match="scope kind None unknown"):
        Scope.from_dict({"feeder_id": "f1"})
    with pytest.raises(InputError, match="unknown field"):
        Scope.from_dict({"kind": "feeder", "feeder_id": "f1", "regulator": "reg1"})
    with pytest.raises(InputError, match="give its buses"):
        Scope.section("f1", "z", [])
    with pytest.raises(InputError, match="buses must be a list"):
        Scope.section("f1", "z", "671")
    with pytest.raises(InputError, match="der_id does not apply"):
        Scope(ScopeKind.FEEDER, feeder_id="f1", der_id="d")
    with pytest.raises(InputError, match="feeder scope feeder_id"):
        Scope.feeder("")
    with pytest.raises(InputError, match="scope must be a Scope"):
        ControlRequest("x", Source.ADMS, CommandKind.BLOCK_DISPATCH, {"kind": "feeder"},  # type: ignore[arg-type]
                       T0, T0 + H)
    with pytest.raises(InputError, match="naive datetime"):
        Arbiter().resolve(LOC, datetime(2026, 11, 25, 12))
    with pytest.raises(InputError, match="expected a DeviceLocation"):
        Arbiter().resolve("bat-1", T0)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["open_switch", "switch", "regulator_tap", "capacitor_on",
                                  "set_tap", "close_switch"])
def test_the_derms_has_no_switch_regulator_or_capacitor_command(kind):
    assert not [k for k in CommandKind if re.search("switch|regulat|capacitor|tap", k.value)]
    with pytest.raises(InputError, match="never commands switches, regulators or capacitors"):
        ControlRequest("x", Source.ADMS, kind, Scope.feeder("f1"), T0, T0 + H)  # type: ignore[arg-type]


def test_times_in_other_zones_are_converted_to_utc():
    cet = timezone(timedelta(hours=1))
    r = oper(start=datetime(2026, 11, 25, 13, 0, tzinfo=cet))
    assert r.start == T0 and r.start.tzinfo is UTC
    assert r.to_dict()["scope"] == {"kind": "device", "der_id": "bat-1"}
