"""An ADMS switching report is stored once: the same switch in the same state at the same
time on the same feeder (from the same source) is one topology event.

``POST /v1/adms/messages`` with ``type`` ``switching`` read whether each reported switch
state was stored, then inserted it; nothing in the database held the key. Two identical
messages without a ``message_id`` (and without an expiry, so no control request either)
that both read "not there" both inserted: no error, but every switch state twice. The
sequential answer to a repeat is 200, ``created`` false, the stored events' ids; it holds
under concurrency now (migration 0010's unique index, inserts that skip a row another
request stored meanwhile). The same switch reported in another state at the same time is
not a repeat: it is stored as another event (201), one after the other or at once.

The race is made deterministic by a barrier right after each request's first lookup of a
switch state (:mod:`tests.integration.test_registry_concurrent_ids`).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from derms.api.app import create_app
from derms.config import get_settings
from derms.store.db import make_engine
from derms.store.migrate import current_revision, downgrade, head_revision, upgrade
from derms.store.models import AuditEntry, Base, TopologyEvent
from derms.store.types import UTCTimestamp
from tests.integration.conftest import mint_token
from tests.integration.test_registry_concurrent_ids import _at_once, _both_read_first

T = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
SW1_OPEN = [{"switch": "sw1", "state": "open"}]


@pytest.fixture
def api(db_url):
    app = create_app(get_settings(database_url=db_url))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield app, client, mint_token(db_url, "admin"), mint_token(db_url, "operate")


@pytest.fixture
def feeder(api) -> str:
    _app, c, admin, _ = api
    fid = f"f-{uuid.uuid4().hex[:6]}"
    assert c.post("/v1/feeders", headers=admin, json={"feeder_id": fid}).status_code == 201
    return fid


def _switching(fid: str, switches: list[dict], t: datetime = T) -> dict:
    """A switching message with neither ``message_id`` nor ``expiry``."""
    return {"type": "switching", "feeder_id": fid, "t": t.isoformat(), "switches": switches}


def _events(app, fid: str) -> list[tuple[str, str]]:
    with app.state.sessions() as s:
        return [(r.switch, r.state) for r in s.execute(
            select(TopologyEvent.switch, TopologyEvent.state)
            .where(TopologyEvent.feeder_id == fid).order_by(TopologyEvent.id))]


def _audits(app, fid: str) -> int:
    with app.state.sessions() as s:
        return s.scalar(select(func.count()).select_from(AuditEntry).where(
            AuditEntry.action == "switching", AuditEntry.entity_id == fid))


def _post_at_once(app, c, operator: dict, bodies: list[dict]) -> list:
    with _both_read_first(app.state.engine, "topology_events", "feeder_id",
                          n=len(bodies)) as met:
        answers = _at_once(*(lambda b=b: c.post("/v1/adms/messages", headers=operator, json=b)
                             for b in bodies))
    assert met == [True] * len(bodies)
    return answers


def _by_code(answers: list) -> list:
    return sorted(answers, key=lambda r: r.status_code)


def test_a_repeated_switching_report_is_stored_once(api, feeder):
    """201 then 200 with the same ids; the repeat may spell the switch in upper case and
    the time in another offset (the same instant)."""
    app, c, _, operator = api
    first = c.post("/v1/adms/messages", headers=operator, json=_switching(feeder, SW1_OPEN))
    assert first.status_code == 201 and first.json()["feeders_switched"] == [feeder]
    again = _switching(feeder, [{"switch": "SW1", "state": "open"}],
                       T.astimezone(timezone(timedelta(hours=2))))
    second = c.post("/v1/adms/messages", headers=operator, json=again)
    assert second.status_code == 200, second.text
    assert second.json()["created"] is False and second.json()["feeders_switched"] == []
    assert second.json()["topology_event_ids"] == first.json()["topology_event_ids"]
    assert _events(app, feeder) == [("sw1", "open")]
    assert _audits(app, feeder) == 1


@pytest.mark.parametrize("n,reverse", [(2, False), (4, False), (2, True)])
def test_the_same_switching_report_at_once_is_stored_once(api, feeder, n, reverse):
    """One 201, the others 200 with the same ids (as a repeat one after the other); one
    event per switch state, one audit entry. ``reverse``: the second message lists the
    switches in the other order (on PostgreSQL each insert waits for the other's)."""
    app, c, _, operator = api
    switches = [{"switch": "sw1", "state": "open"}, {"switch": "sw7", "state": "closed"}]
    bodies = [_switching(feeder, switches[::-1] if reverse and k % 2 else switches)
              for k in range(n)]
    answers = _post_at_once(app, c, operator, bodies)
    assert [r.status_code for r in _by_code(answers)] == [200] * (n - 1) + [201], \
        [r.text for r in answers]
    assert [r.json()["created"] for r in _by_code(answers)] == [False] * (n - 1) + [True]
    assert len({frozenset(r.json()["topology_event_ids"]) for r in answers}) == 1
    assert sorted(_events(app, feeder)) == [("sw1", "open"), ("sw7", "closed")]
    assert _audits(app, feeder) == 1


@pytest.mark.parametrize("at_once", [False, True])
def test_another_state_at_the_same_time_is_another_event(api, feeder, at_once):
    """Not a repeat: both stored (201 each), one after the other or at once."""
    app, c, _, operator = api
    bodies = [_switching(feeder, SW1_OPEN),
              _switching(feeder, [{"switch": "sw1", "state": "closed"}])]
    if at_once:
        answers = _post_at_once(app, c, operator, bodies)
    else:
        answers = [c.post("/v1/adms/messages", headers=operator, json=b) for b in bodies]
    assert [r.status_code for r in answers] == [201, 201], [r.text for r in answers]
    ids = [r.json()["topology_event_ids"] for r in answers]
    assert len(ids[0]) == len(ids[1]) == 1 and ids[0] != ids[1]
    assert sorted(_events(app, feeder)) == [("sw1", "closed"), ("sw1", "open")]
    assert _audits(app, feeder) == 2


def _old_events(url: str, fid: str) -> list[int]:
    """A feeder and topology events as a store before 0010 could hold them (duplicates
    included); their ids in insertion order."""
    feeders = sa.table("feeders", sa.column("feeder_id"), sa.column("name"),
                       sa.column("created_at", UTCTimestamp()))
    events = sa.table("topology_events", sa.column("id"), sa.column("feeder_id"),
                      sa.column("switch"), sa.column("state"), sa.column("t", UTCTimestamp()),
                      sa.column("source"))
    rows = [("sw1", "open", T, "adms"), ("sw1", "open", T, "adms"),
            ("sw1", "closed", T, "adms"), ("sw1", "open", T, "operator"),
            ("sw1", "open", T, "adms"), ("sw2", "open", T, "adms"),
            ("sw2", "open", T + timedelta(seconds=1), "adms")]
    eng = make_engine(url)
    try:
        with eng.begin() as conn:
            conn.execute(feeders.insert().values(feeder_id=fid, name="", created_at=T))
            return [conn.execute(events.insert().values(
                feeder_id=fid, switch=sw, state=st, t=t, source=src)
                .returning(events.c.id)).scalar_one() for sw, st, t, src in rows]
    finally:
        eng.dispose()


def test_migration_0010_keeps_the_earliest_of_duplicate_events(empty_db_url):
    """Duplicates stored before 0010 do not stop the upgrade: the earliest (lowest id) of
    each is kept, the rest deleted; the index matches the model, refuses a new duplicate,
    and goes down and up again."""
    url = empty_db_url
    upgrade(url, "0009")
    fid = f"old-{uuid.uuid4().hex[:6]}"
    ids = _old_events(url, fid)
    upgrade(url)
    eng = make_engine(url)
    try:
        with eng.connect() as conn:
            kept = conn.scalars(select(TopologyEvent.id).order_by(TopologyEvent.id)).all()
            diffs = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert kept == [ids[0], ids[2], ids[3], ids[5], ids[6]]
        assert [d for d in diffs if "topology_events" in repr(d)] == []
        with pytest.raises(IntegrityError), eng.begin() as conn:
            conn.execute(sa.insert(TopologyEvent).values(
                feeder_id=fid, switch="sw1", state="open", t=T, source="adms"))
        downgrade(url, "0009")
        upgrade(url)
        assert current_revision(url) == head_revision()
    finally:
        eng.dispose()


def test_one_message_with_a_switch_in_both_states_is_refused(api, feeder):
    """A switch is in one state at ``t``: 422 naming the entry, nothing stored; the same
    state listed twice (another spelling) is one event."""
    app, c, _, operator = api
    body = _switching(feeder, [{"switch": "sw1", "state": "open"},
                               {"switch": "sw7", "state": "closed"},
                               {"switch": "SW1 ", "state": "closed"}])
    r = c.post("/v1/adms/messages", headers=operator, json=body)
    assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"
    assert "switches[2]" in r.text and "both" in r.text, r.text
    assert _events(app, feeder) == []
    twice = _switching(feeder, [{"switch": "sw1", "state": "open"},
                                {"switch": "SW1", "state": "open"}])
    r = c.post("/v1/adms/messages", headers=operator, json=twice)
    assert r.status_code == 201, r.text
    assert _events(app, feeder) == [("sw1", "open")]
