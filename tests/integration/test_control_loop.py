"""The control loop as a service (derms.control.loop) on both backends, IEEE 123.

Truth: a second OpenDSS engine of the bundled IEEE 123 (``Field`` of
tests/validation/test_corrective.py: controls settled then frozen, base loads) with PV at
single-phase customer buses, large enough to raise an overvoltage. Every cycle the test
solves the field, writes what it shows into the store at the cycle's time (a voltage meter
at every DER bus, the head SCADA, each DER's ``p_kw``), then runs one cycle of the loop on
the test's thread. DERs obey the DERControls in force as export limits, except where a test
says otherwise. The loop reads everything from the store; commands reach an IEEE 2030.5
repository (in memory or persisted in the same database).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from derms.api.app import create_app
from derms.config import get_settings
from derms.control.commands import CommandMode, DeviceCommand, command_id
from derms.control.loop import ControlLoop, LoopConfig
from derms.control.tracking import CommandTracker, TrackingConfig, obeyed, score_of
from derms.grid.bundled import resolve_master
from derms.monitoring.feeder_monitor import head_meter_id
from derms.protocols.ieee2030_5 import InMemoryRepository
from derms.protocols.ieee2030_5.sql_repository import PersistentRepository
from derms.store import commands as cstore
from derms.store.db import make_engine, make_session_factory
from derms.store.models import (
    AuditEntry,
    DerDevice,
    DerSite,
    DerType,
    DeviceStatus,
    Feeder,
    FeederModelVersion,
    Meter,
    Phase,
)
from derms.store.timeseries import write_readings
from tests.integration.conftest import mint_token
from tests.validation.test_corrective import Field, customer_loads, frozen

T0 = datetime(2026, 7, 1, 12, 0, tzinfo=UTC)
MASTER = resolve_master("ieee123")
PHASE = {1: Phase.A, 2: Phase.B, 3: Phase.C}


def _single_phase_customers():
    eng = frozen(MASTER)
    try:
        return [c for c in customer_loads(eng) if len(c[2]) == 1]
    finally:
        eng.close()


class Scenario:
    """A registered IEEE 123 feeder (unique ids) with ``n`` PVs and a field that obeys."""

    def __init__(self, db_url: str, *, n: int = 30, seed: int = 1, kw=(30.0, 50.0)):
        self.db = make_engine(db_url)
        self.fid = fid = f"f123-{uuid.uuid4().hex[:6]}"
        rng = np.random.default_rng(seed)
        cust = _single_phase_customers()
        pick = rng.choice(len(cust), size=n, replace=False)
        self.ders = []  # (der_id, bus, node, kw)
        for k, j in enumerate(pick):
            name, bus, nodes, _, _ = cust[j]
            self.ders.append((f"{fid}-pv{k}", bus, nodes[0], float(rng.uniform(*kw))))
        self.der_ids = [d[0] for d in self.ders]
        with make_session_factory(self.db).begin() as s:
            s.add(Feeder(feeder_id=fid, name="IEEE 123"))
            s.flush()
            s.add(FeederModelVersion(feeder_id=fid, version=1, source_uri="ieee123",
                                     valid_from=T0 - timedelta(days=1)))
            s.add(Meter(meter_id=head_meter_id(fid), feeder_id=fid, bus="150", phase=Phase.ABC))
            buses = {}
            for der_id, bus, node, kw in self.ders:
                ph = PHASE[int(node.rsplit(".", 1)[1])]
                s.add(DerSite(site_id=f"{der_id}-site", feeder_id=fid, bus=bus))
                buses[(bus, ph)] = node
            s.flush()
            for der_id, bus, node, kw in self.ders:
                s.add(DerDevice(der_id=der_id, site_id=f"{der_id}-site", der_type=DerType.PV,
                                p_gen_max_kw=kw, s_max_kva=kw * 1.1, bus=bus,
                                phase=PHASE[int(node.rsplit(".", 1)[1])],
                                status=DeviceStatus.ACTIVE))
            self.meters = {}
            for (bus, ph), node in buses.items():
                mid = f"{fid}-m{bus}{ph.value}"
                s.add(Meter(meter_id=mid, feeder_id=fid, bus=bus, phase=ph))
                self.meters[mid] = node
        self.points = [(d[2],) for d in self.ders]
        self.field = Field(MASTER, self.points)
        self.natural = -np.array([d[3] for d in self.ders])  # net import, generating
        self.p = self.natural.copy()
        self.obey = np.ones(n, dtype=bool)

    def apply(self, commands: dict[str, DeviceCommand], now: datetime) -> None:
        """DERs that obey take the export limit in force at ``now``; others run free."""
        p = self.natural.copy()
        for j, d in enumerate(self.der_ids):
            c = commands.get(d)
            if c is not None and self.obey[j] and c.active_at(now):
                p[j] = max(self.natural[j], c.p_kw)
        self.p = p

    def write(self, now: datetime, *, der_age_s=None, meters=True) -> None:
        """Solve the field and write meters, head SCADA and DER p_kw at ``now`` (each DER's
        reading ``der_age_s[der_id]`` seconds older where given)."""
        self.field.set_ders(np.arange(len(self.ders)), self.p, np.zeros(len(self.ders)))
        v, _ = self.field.solve()
        pos = {s: i for i, s in enumerate(self.field.engine.node_names())}
        rows = []
        if meters:
            for mid, node in self.meters.items():
                rows.append((mid, None, "v_pu", float(v[pos[node]]), now))
            hp, hq = self.field.col.head_p_kw[0], self.field.col.head_q_kvar[0]
            for k, ph in enumerate("abc"):
                rows.append((head_meter_id(self.fid), None, f"p_{ph}_kw", float(hp[k]), now))
                rows.append((head_meter_id(self.fid), None, f"q_{ph}_kvar", float(hq[k]), now))
        for j, d in enumerate(self.der_ids):
            age = (der_age_s or {}).get(d, 0.0)
            if age is not None:
                rows.append((None, d, "p_kw", float(self.p[j]), now - timedelta(seconds=age)))
        frame = pd.DataFrame({"meter_id": [r[0] for r in rows], "der_id": [r[1] for r in rows],
                              "quantity": [r[2] for r in rows], "value": [r[3] for r in rows],
                              "t": pd.Series([r[4] for r in rows], dtype=object),
                              "source": "test"})
        for owner in ("meter_id", "der_id"):
            part = frame[frame[owner].notna()].drop(
                columns=["der_id" if owner == "meter_id" else "meter_id"])
            if len(part):
                write_readings(self.db, part)

    def register(self, repo) -> dict[str, int]:
        out = {}
        for k, d in enumerate(self.der_ids):
            lfdi = uuid.uuid5(uuid.NAMESPACE_DNS, d).hex[:20].upper() + f"{k:020X}"
            out[d] = repo.add_end_device(lfdi[:40], der_id=d).edev_id
        return out

    def close(self) -> None:
        self.field.close()
        self.db.dispose()


@pytest.fixture
def scenario(db_url):
    made = []

    def make(**kw):
        made.append(Scenario(db_url, **kw))
        return made[-1]

    yield make
    for s in made:
        s.close()


def _latest(loop: ControlLoop, now: datetime) -> dict[str, DeviceCommand]:
    return {c.der_id: c for c in loop.tracker.standing(now)}


def _tracked(db, fid) -> dict[str, cstore.ControlCommandRecord]:
    with make_session_factory(db)() as s:
        rows = s.scalars(select(cstore.ControlCommandRecord)
                         .where(cstore.ControlCommandRecord.feeder_id == fid)).all()
    return {r.command_id: r for r in rows}


# -- pure parts ----------------------------------------------------------------------------
def test_delivery_rules_and_score():
    assert obeyed("p_setpoint", -3.0, -2.6, 0.5) and not obeyed("p_setpoint", -3.0, -2.4, 0.5)
    assert obeyed("export_limit", -3.0, -1.0, 0.5) and not obeyed("export_limit", -3.0, -4.0, 0.5)
    assert obeyed("import_limit", 5.0, 5.4, 0.5) and not obeyed("import_limit", 5.0, 6.0, 0.5)
    cfg = TrackingConfig()
    assert score_of([], cfg) == pytest.approx(0.8)
    assert score_of(["not_delivered"], cfg) == pytest.approx(1.6 / 3)
    assert score_of(["delivered"], cfg) > 0.8 > score_of(["delivered", "not_delivered"], cfg)


def test_migration_0007_matches_the_model_and_goes_down_and_up(empty_db_url):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy import inspect

    from derms.store.migrate import current_revision, downgrade, head_revision, upgrade
    from derms.store.models import Base

    upgrade(empty_db_url)
    eng = make_engine(empty_db_url)
    with eng.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert [d for d in diffs if "control_commands" in repr(d)] == []
    downgrade(empty_db_url, "0006")
    assert "control_commands" not in inspect(eng).get_table_names()
    upgrade(empty_db_url)
    assert current_revision(empty_db_url) == head_revision()
    eng.dispose()


def test_migration_0008_admits_release_commands(empty_db_url):
    """A block's release is a command of its own mode: the CHECK constraint of 0007 would
    have refused it (and the tracker with it)."""
    from datetime import timedelta

    from sqlalchemy.exc import IntegrityError

    from derms.control.commands import CommandMode, DeviceCommand
    from derms.control.tracking import CommandTracker
    from derms.store.db import make_session_factory
    from derms.store.migrate import downgrade, upgrade

    upgrade(empty_db_url)
    eng = make_engine(empty_db_url)
    tracker = CommandTracker(make_session_factory(eng), "f-rel")
    rel = DeviceCommand("a" * 32, "der-1", "fc-1", CommandMode.RELEASE, 0.0, T0,
                        T0 + timedelta(minutes=5), "authority: dispatch blocked (adms-1)")
    tracker.record([rel], T0)
    assert _tracked(eng, "f-rel")["a" * 32].mode == "release"
    downgrade(empty_db_url, "0007")                 # its releases go with it
    assert _tracked(eng, "f-rel") == {}
    with pytest.raises(IntegrityError):
        tracker.record([rel], T0)
    upgrade(empty_db_url)
    eng.dispose()


# -- the loop ------------------------------------------------------------------------------
def test_overvoltage_commands_delivery_and_escalation(scenario):
    sc = scenario()
    repo = InMemoryRepository()
    edevs = sc.register(repo)
    loop = ControlLoop(sc.db, sc.fid, repo=repo)
    try:
        # the fail-safe program: FSA on every DER's end device, a default control
        pid, fsa = loop.program_id, loop.fsa_id
        assert all(fsa in repo.end_device(e).fsa_ids for e in edevs.values())
        dflt = repo.default_control(pid)
        assert dflt.limits.exp_lim_w == 1500.0 and dflt.set_grad_w == 27
        # cycle 1: the PVs raise an overvoltage → export limits, tracked and published
        now = T0
        sc.write(now)
        s1 = loop.run_once(now)
        assert s1["violations"]["overvoltage"] > 0, s1
        assert s1["commands"] > 0 and s1["status"] in ("resolved", "partial")
        tracked = _tracked(sc.db, sc.fid)
        assert set(tracked) == set(s1["command_ids"])
        assert {r.state for r in tracked.values()} == {"sent"}
        mrids = {c.mrid for c in repo.controls(pid)}
        assert mrids == {c.upper() for c in s1["command_ids"]}
        # the five DERs asked for most ignore their commands, the others obey
        cmds = _latest(loop, now)
        rogues = sorted(cmds, key=lambda d: cmds[d].p_kw - sc.natural[sc.der_ids.index(d)])[:5]
        for d in rogues:
            sc.obey[sc.der_ids.index(d)] = False
        rogue = rogues[0]
        # a device acknowledges through IEEE 2030.5 (status 1 received)
        ctrl = repo.control_by_mrid(cmds[rogue].command_id.upper())
        repo.add_response(ctrl.control_id, edevs[rogue], 1, now)
        summaries, field = [], []
        for k in (1, 2, 3, 4):
            now = T0 + timedelta(seconds=5 * k)
            if k == 4:  # the sun comes out further: every PV could give 25 % more
                sc.natural *= 1.25
            sc.apply(_latest(loop, now), now)
            sc.write(now)
            field.append(sc.field.violations(loop._cycle, *sc.field.solve()))
            summaries.append(loop.run_once(now))
        assert summaries[0]["acknowledged"] == 1
        tracked = _tracked(sc.db, sc.fid)
        by_cycle = [[tracked[c] for c in x["command_ids"]] for x in summaries]
        # cycle 2 (+5 s): the rows the rogues leave violated are relieved by others at once
        assert field[0]["overvoltage"] > 0 and summaries[0]["violations"]["overvoltage"] > 0
        assert any(r.der_id not in rogues for r in by_cycle[0])
        assert field[1] == {"overvoltage": 0, "undervoltage": 0, "thermal": 0}, field
        # cycle 3 (+10 s, the grace of 2 cycles): the first commands are judged
        first = [tracked[c] for c in s1["command_ids"]]
        for r in first:
            assert r.state == ("not_delivered" if r.der_id in rogues else "delivered"), \
                (r.der_id, r.state, r.detail)
        rogue_first = next(r for r in first if r.der_id == rogue)
        assert rogue_first.ack_status == 1 and rogue_first.acknowledged_at is not None
        assert rogue_first.measured_p_kw == pytest.approx(sc.natural[sc.der_ids.index(rogue)]
                                                          / 1.25)
        v3 = summaries[1]
        assert set(v3["escalated"]) == set(rogues)
        good = next(r.der_id for r in first if r.der_id not in rogues)
        assert v3["scores"][rogue] < 0.8 < v3["scores"][good]
        # cycle 5 (+20 s): a new overvoltage where the obeying DERs are already at zero:
        # the escalated DERs are held (not relied upon, not commanded) and the remainder is
        # reported, not hidden
        last, rep = summaries[3], loop.last_report
        assert field[3]["overvoltage"] > 0 and last["violations"]["overvoltage"] > 0
        assert last["n_fixed"] >= len(rogues) and last["status"] == "partial"
        held = np.isin(rep.corrective.der_id, rogues)
        assert not rep.corrective.moved[held].any()
        assert any("cannot reach" in n for n in last["notes"])
        assert not {r.der_id for x in by_cycle[1:] for r in x} & set(rogues)
        # audit: every command issued and every verdict, every active cycle
        with make_session_factory(sc.db)() as s:
            acts = s.execute(select(AuditEntry.action, AuditEntry.entity_id)
                             .where(AuditEntry.entity == "control_command")).all()
            cycles = s.scalar(select(func.count()).select_from(AuditEntry).where(
                AuditEntry.entity == "feeder", AuditEntry.entity_id == sc.fid,
                AuditEntry.action == "control_cycle"))
        issued = {e for a, e in acts if a == "command_issued"}
        assert issued == set(tracked)
        assert {e for a, e in acts if a == "command_not_delivered"} >= {
            r.command_id for r in first if r.der_id in rogues}
        assert cycles >= 2
    finally:
        loop.close()


def test_stale_telemetry_is_held_and_no_telemetry_is_no_action(scenario):
    sc = scenario(n=20, seed=3)
    loop = ControlLoop(sc.db, sc.fid)  # no 2030.5: an in-memory sink
    try:
        # nothing in the store yet: no action, noted
        s0 = loop.run_once(T0 - timedelta(hours=2))
        assert s0["status"] == "no_telemetry" and s0["commands"] == 0
        assert any("no action" in n for n in s0["notes"])
        stale = set(sc.der_ids[:5])
        sc.write(T0, der_age_s={d: 600.0 for d in stale})
        s1 = loop.run_once(T0)
        assert set(s1["stale"]) == stale
        assert s1["violations"]["overvoltage"] > 0 and s1["commands"] > 0
        commanded = {c.der_id for c in loop.inner_sink.commands}
        assert not commanded & stale
        assert s1["n_fixed"] >= len(stale)
        assert any("stale" in n for n in s1["notes"])
    finally:
        loop.close()


def test_restart_no_command_lost_or_sent_twice(scenario, db_url):
    sc = scenario(n=25, seed=7)
    repo = PersistentRepository(sc.db)
    sc.register(repo)
    cfg = LoopConfig()
    loop = ControlLoop(sc.db, sc.fid, repo=repo, config=cfg)
    try:
        sc.write(T0)
        s1 = loop.run_once(T0)
        assert s1["commands"] > 0
        pid = loop.program_id
    finally:
        loop.close()
    ids_before = set(_tracked(sc.db, sc.fid))
    # a crash between storing and sending: one command stored, never sent, still valid;
    # another stored and never sent whose validity has passed
    tracker = CommandTracker(make_session_factory(sc.db), sc.fid)
    commanded = {r.der_id for r in _tracked(sc.db, sc.fid).values()}
    d0, d1 = [d for d in sc.der_ids if d not in commanded][:2]
    pending = DeviceCommand(command_id("crash-cycle", d0), d0, "crash-cycle",
                            CommandMode.EXPORT_LIMIT, -1.0, T0, T0 + timedelta(minutes=5),
                            "test: stored before a crash")
    old = DeviceCommand(command_id("old-cycle", d1), d1, "old-cycle", CommandMode.EXPORT_LIMIT,
                        -1.0, T0 - timedelta(hours=1), T0 - timedelta(minutes=55),
                        "test: ended long ago")
    assert len(tracker.record([pending, old], T0)) == 2
    assert tracker.record([pending, old], T0) == []  # same ids: stored once
    # restart: a new repository and loop on the same database, same field state
    repo2 = PersistentRepository(sc.db)
    loop2 = ControlLoop(sc.db, sc.fid, repo=repo2, config=cfg)
    try:
        assert loop2.program_id == pid  # the program is found again, not duplicated
        assert [p.description for p in repo2.programs()].count("derms control") == 1
        now = T0 + timedelta(seconds=5)
        sc.write(now)
        s2 = loop2.run_once(now)
        # the standing decisions are not re-issued under new ids
        assert s2["commands"] == 0, (s2["command_ids"], s2["notes"])
        assert s2["violations"] == s1["violations"]  # the same field state
        tracked = _tracked(sc.db, sc.fid)
        assert set(tracked) == ids_before | {pending.command_id, old.command_id}
        assert tracked[pending.command_id].state == "sent"
        assert tracked[old.command_id].state == "expired"
        # every command in the repository exactly once; the expired one never sent
        mrids = [c.mrid for c in repo2.controls(pid)]
        assert len(mrids) == len(set(mrids))
        assert set(mrids) == {c.upper() for c in ids_before | {pending.command_id}}
        # audit: each command issued once
        with make_session_factory(sc.db)() as s:
            issued = s.execute(select(AuditEntry.entity_id, func.count())
                               .where(AuditEntry.entity == "control_command",
                                      AuditEntry.action == "command_issued",
                                      AuditEntry.entity_id.in_(list(tracked)))
                               .group_by(AuditEntry.entity_id)).all()
        assert dict(issued) == dict.fromkeys(tracked, 1)
    finally:
        loop2.close()


def test_topology_change_is_picked_up_next_cycle(scenario):
    from derms.store.models import SwitchState, TopologyEvent

    sc = scenario(n=10, seed=11, kw=(5.0, 10.0))
    loop = ControlLoop(sc.db, sc.fid)
    try:
        sc.write(T0)
        assert loop.run_once(T0)["topology_reloaded"] is None
        with make_session_factory(sc.db).begin() as s:
            s.add(TopologyEvent(feeder_id=sc.fid, switch="sw7", state=SwitchState.OPEN,
                                t=T0 + timedelta(seconds=2), source="adms"))
        now = T0 + timedelta(seconds=5)
        sc.write(now)
        rep = loop.run_once(now)["topology_reloaded"]
        assert rep is not None and rep["switches"] == {"sw7": "open"}
        assert loop.status()["topology"]["last_reload"]["t"] == now.isoformat()
    finally:
        loop.close()


def test_a_model_version_coming_into_force_rebuilds_the_loop_and_checks_placement(scenario):
    """A version registered for later: the loop kept the model it was built on until a
    topology or registry change. It now rebuilds when the version comes into force and
    raises that version's placement alarms (no monitoring cycle needed)."""
    from derms.store.models import Alarm

    sc = scenario(n=6, seed=12, kw=(5.0, 10.0))
    loop = ControlLoop(sc.db, sc.fid)
    try:
        sc.write(T0)
        loop.run_once(T0)
        assert loop.status()["model_version"] == 1
        with make_session_factory(sc.db).begin() as s:  # v2 from T0 + 10 s, lacking buses
            s.add(FeederModelVersion(feeder_id=sc.fid, version=2, source_uri="ieee123",
                                     valid_from=T0 + timedelta(seconds=10),
                                     elements={"buses": {"150": [1, 2, 3]},
                                               "transformers": []}))
        now = T0 + timedelta(seconds=5)
        sc.write(now)
        loop.run_once(now)
        assert loop.status()["model_version"] == 1
        now = T0 + timedelta(seconds=15)
        sc.write(now)
        loop.run_once(now)
        assert loop.status()["model_version"] == 2
        with make_session_factory(sc.db)() as s:
            kinds = set(s.scalars(select(Alarm.kind).where(Alarm.feeder_id == sc.fid,
                                                           Alarm.t_cleared.is_(None))).all())
            ders = s.scalars(select(DerDevice.der_id).join(
                DerSite, DerDevice.site_id == DerSite.site_id).where(
                DerSite.feeder_id == sc.fid)).all()
        assert len(ders) == 6
        assert {f"placement_unknown:{d}" for d in ders} <= kinds  # (and the meters')
    finally:
        loop.close()


def test_api_routes(scenario, db_url):
    sc = scenario(n=20, seed=5)
    loop = ControlLoop(sc.db, sc.fid)
    try:
        sc.write(T0)
        s1 = loop.run_once(T0)
        app = create_app(get_settings(database_url=db_url))
        client = TestClient(app, headers=mint_token(db_url, "read"))
        assert client.get("/v1/control/loop").status_code == 503
        app.state.control_loop = loop
        r = client.get("/v1/control/loop")
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["feeder_id"] == sc.fid and body["last_cycle"]["commands"] == s1["commands"]
        assert "total_s" in body["last_cycle"]["timings"]
        der = next(iter({c.der_id for c in loop.inner_sink.commands}))
        r = client.get("/v1/control/commands", params={"der_id": der, "state": "sent"})
        assert r.status_code == 200 and r.json()["total"] >= 1
        assert all(i["der_id"] == der for i in r.json()["items"])
        cid = r.json()["items"][0]["command_id"]
        assert client.get(f"/v1/control/commands/{cid}").json()["der_id"] == der
        assert client.get("/v1/control/commands/nope").status_code == 404
        assert client.get("/v1/control/commands", params={"der_id": "nope"}).status_code == 404
        assert client.get("/v1/control/commands", params={"state": "bogus"}).status_code == 422
        assert client.get("/v1/control/commands", params={"limit": 0}).status_code == 422
        assert client.get("/v1/control/commands", headers={"Authorization": ""}).status_code \
            == 401
    finally:
        loop.close()


def test_feeder_state_is_the_control_loops_estimate_without_a_monitor(scenario, db_url):
    """`derms serve --control-feeder F` without --monitor-period-s answered 503 at
    GET /v1/feeders/F/state although the loop estimates F's state every cycle: the state
    is now the loop's last estimate (source control_loop), marked stale when a later
    cycle has none; the monitor's state, when there is one, still comes first."""
    from derms.monitoring.cycle import MonitorResults, RunError

    sc = scenario(n=20, seed=5)
    loop = ControlLoop(sc.db, sc.fid)
    app = create_app(get_settings(database_url=db_url))
    client = TestClient(app, headers=mint_token(db_url, "read"))
    try:
        url = f"/v1/feeders/{sc.fid}/state"
        r = client.get(url)
        assert r.status_code == 503 and r.headers["content-type"] == "application/problem+json"
        app.state.control_loop = loop
        r = client.get(url)  # the loop runs but has not estimated yet
        assert r.status_code == 404 and "no state computed yet" in r.json()["detail"]
        assert client.get("/v1/feeders/other/state").status_code == 503  # not the loop's
        sc.write(T0)
        s1 = loop.run_once(T0)
        r = client.get(url)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["source"] == "control_loop" and body["stale"] is False
        assert body["feeder_id"] == sc.fid and body["t"] == T0.isoformat()
        # the overvoltage the cycle acted on is in the state it serves
        assert body["voltage"]["v_max_pu"] > 1.05
        assert {v["kind"] for v in body["violations"]} >= {"overvoltage"}
        assert body["estimation"]["method"] == "wls"
        assert body["estimation"]["control"]["cycle_id"] == s1["cycle_id"]
        assert body["availability"]["summary"]["n_online"] == 20
        assert len(body["nodes"]["v_pu"]) == len(body["nodes"]["node"]) > 200
        assert "nodes" not in client.get(url, params={"nodes": "false"}).json()
        # a later cycle without telemetry: the last estimate, marked stale
        s2 = loop.run_once(T0 + timedelta(hours=3))
        assert s2["status"] == "no_telemetry"
        body = client.get(url).json()
        assert body["stale"] is True and body["t"] == T0.isoformat()
        assert "no fresh telemetry" in body["last_error"]["error"]
        # a monitoring cycle with a state for the feeder comes first
        mon = MonitorResults()
        mon.monitors = {sc.fid}
        app.state.monitor = mon
        mon.record(sc.fid, None, RunError(T0, "boom"))
        assert client.get(url).json()["source"] == "control_loop"  # the monitor has none
        mon.record(sc.fid, loop.latest_state(sc.fid), None)
        assert client.get(url).json()["source"] == "monitor"
    finally:
        loop.close()


def test_serve_runs_the_control_loop(scenario, db_url):
    """`derms serve --control-feeder` as a subprocess: the loop runs on its own thread,
    acts on the telemetry in the store, and its status and commands are served."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import httpx

    from tests.integration.test_control_serve import _free_port, _wait

    sc = scenario(n=20, seed=5)
    sc.write(datetime.now(UTC).replace(microsecond=0))
    headers = mint_token(db_url, "read")
    port = _free_port()
    env = {**os.environ, "DERMS_DATABASE_URL": db_url}
    proc = subprocess.Popen(
        [sys.executable, "-m", "derms.cli.main", "serve", "--port", str(port), "--no-mqtt",
         "--control-feeder", sc.fid, "--control-period-s", "1"], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    last_write = [time.monotonic()]
    try:
        def acted():
            if time.monotonic() - last_write[0] > 20:  # keep the telemetry fresh (< 60 s)
                sc.write(datetime.now(UTC).replace(microsecond=0))  # on a slow start
                last_write[0] = time.monotonic()
            try:
                r = httpx.get(f"{url}/v1/control/loop", headers=headers, timeout=2)
            except httpx.TransportError:
                return None
            last = r.json().get("last_cycle") if r.status_code == 200 else None
            return r.json() if last and last["commands"] > 0 else None

        status = _wait(acted, 90)
        assert status["running"] and status["feeder_id"] == sc.fid
        assert status["last_cycle"]["violations"]["overvoltage"] > 0
        r = httpx.get(f"{url}/v1/control/commands", headers=headers, timeout=5)
        assert r.status_code == 200 and r.json()["total"] >= status["last_cycle"]["commands"]
        time.sleep(1.5)  # more cycles: the same decisions are not re-issued
        again = httpx.get(f"{url}/v1/control/commands", headers=headers, timeout=5).json()
        assert again["total"] == r.json()["total"]
        # no --monitor-period-s: the feeder's state is the loop's estimate (was 503)
        st = httpx.get(f"{url}/v1/feeders/{sc.fid}/state", headers=headers,
                       params={"nodes": "false"}, timeout=5)
        assert st.status_code == 200, st.text
        assert st.json()["source"] == "control_loop" and st.json()["violations"]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    err = proc.stderr.read().decode()
    # uvicorn re-raises SIGTERM after a clean shutdown (the loop is closed in between)
    assert proc.returncode in (0, -signal.SIGTERM), err[-3000:]
    assert "Finished server process" in err and "Traceback" not in err, err[-3000:]


def test_fail_safe_default_is_set_once_and_an_operator_change_is_kept():
    """The loop publishes its fail-safe DefaultDERControl when the program has none; an
    operator's later change (management API) survives a restart of the loop."""
    from derms.control.loop import LoopConfig, ensure_control_program
    from derms.protocols.ieee2030_5 import InMemoryRepository
    from derms.protocols.ieee2030_5.model import DerLimits

    repo = InMemoryRepository()
    repo.add_end_device("A1" * 20, der_id="der-1")
    repo.add_end_device("B2" * 20)  # no der_id: not the loop's device
    pid, fsa = ensure_control_program(repo, LoopConfig())
    default = repo.default_control(pid)
    assert default.limits.exp_lim_w == 1500.0 and default.set_grad_w == 27
    assert [e.fsa_ids for e in repo.end_devices()] == [(fsa,), ()]
    repo.set_default_control(pid, DerLimits(exp_lim_w=5000.0), set_grad_w=10)
    assert ensure_control_program(repo, LoopConfig()) == (pid, fsa)  # a restart
    assert repo.default_control(pid).limits.exp_lim_w == 5000.0
    assert len(repo.programs()) == 1 and len(repo.fsas()) == 1
