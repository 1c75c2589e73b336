"""Regression (found by test_live_restart.py): a DER re-commanded in the opposite direction
before the grace of its previous command ended, and following the new command at once, was
judged ``not_delivered`` on the old one (the reading was attributed to the command in
force one grace earlier). It must be ``superseded`` by the command it follows."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from derms.control.commands import DeviceCommand
from derms.control.tracking import CommandTracker, TrackingConfig
from derms.store.db import make_engine, make_session_factory
from derms.store.migrate import upgrade
from derms.store.models import DerDevice, DerSite, DerType, Feeder


def _cmd(cid: str, p_kw: float, t: datetime) -> DeviceCommand:
    return DeviceCommand(cid, "bat-1", "c", "p_setpoint", p_kw, t, t + timedelta(minutes=5),
                         "test")


def test_reading_that_follows_the_newer_command_supersedes_the_older(tmp_path):
    url = f"sqlite:///{tmp_path / 'derms.db'}"
    upgrade(url)
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    with sessions.begin() as s:
        s.add(Feeder(feeder_id="f1", name="f1"))
        s.flush()
        s.add(DerSite(site_id="site-1", feeder_id="f1", bus="1"))
        s.flush()
        s.add(DerDevice(der_id="bat-1", site_id="site-1", der_type=DerType.BATTERY,
                        s_max_kva=5.0, p_gen_max_kw=5.0, p_charge_max_kw=5.0))
    tr = CommandTracker(sessions, "f1", TrackingConfig(period_s=5.0))
    t0 = datetime(2026, 7, 1, 12, 0, tzinfo=UTC)
    old, new = _cmd("old", 4.0, t0), _cmd("new", -4.0, t0 + timedelta(seconds=7))
    for c in (old, new):
        tr.record([c], c.valid_from)
        tr.mark_sent([c.command_id], c.valid_from)
    # 11 s after the old command (grace 10 s) the DER discharges 4 kW: it follows "new"
    verdicts = tr.verify(t0 + timedelta(seconds=12), {"bat-1": (t0 + timedelta(seconds=11),
                                                                -4.0)}, {"bat-1": 5.0})
    by_id = {v.command_id: v.state for v in verdicts}
    assert by_id == {"old": "superseded"}, verdicts
    # once its own grace has passed, "new" is judged on its own
    verdicts = tr.verify(t0 + timedelta(seconds=19), {"bat-1": (t0 + timedelta(seconds=18),
                                                                -4.0)}, {"bat-1": 5.0})
    assert {v.command_id: v.state for v in verdicts} == {"new": "delivered"}, verdicts
    engine.dispose()
