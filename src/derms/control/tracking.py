"""Command tracking: every command of the control loop stored once, followed from issue to
delivery (verified against telemetry), and each DER's delivery score.

States are those of :mod:`derms.store.commands` (``issued → sent → acknowledged →
delivered | not_delivered``, or ``superseded`` / ``expired``); every change is written to
the audit log (``entity="control_command"``, the command id, action ``command_<state>``)
in the transaction that makes it.

**Recording** (:meth:`CommandTracker.record`): commands are stored by id; an id already
stored is skipped (a resend, a restart), so one decision is one row.

**Acknowledgements** (:meth:`CommandTracker.take_responses`): IEEE 2030.5 responses whose
subject (the event mRID) is a tracked command: status 1 (received), 2 (started) or 3
(completed) — and the other positive codes of
:data:`derms.protocols.ieee2030_5.delivery.ACKNOWLEDGED` — make an open command
``acknowledged``; a declined or rejected answer (4, 8, 10, 12, ≥ 13) makes it
``not_delivered`` at once.

**Delivery verified against telemetry** (:meth:`CommandTracker.verify`). A DER is given
``grace_s`` (default 2 cycles: ``grace_cycles`` × ``period_s``) to follow. For its latest
``p_kw`` reading (import positive, taken at ``t_m``) the command judged is the one that was
in force at ``t_m − grace_s`` (the newest with ``valid_from <= t_m − grace_s`` and
``t_m < valid_until``); so a DER re-commanded every cycle is still judged, on the command it
had time to follow. A reading that does not obey that command but obeys a newer one
already in force at ``t_m`` (the DER was re-commanded, e.g. in the opposite direction, and
followed at once) does not count against it: the older command becomes ``superseded``.
With ``tol = max(min(abs_tol_kw, 10 % of the rating), rel_tol × rating_kw)`` (defaults
0.5 kW and 5 % of the DER's rating: metering class, inverter regulation and the change of
sun or demand between the command and the reading; the 0.5 kW floor is capped at a tenth
of the rating, so a 1.5 kW device is held to 0.15 kW):

* ``p_setpoint``: delivered when ``|p_m − p_kw| <= tol``;
* ``export_limit`` (generate at most ``−p_kw``): delivered when ``p_m >= p_kw − tol``
  (exporting less is fine);
* ``import_limit`` (consume at most ``p_kw``): delivered when ``p_m <= p_kw + tol``.

Older open commands of the DER become ``superseded``; an open command whose validity has
ended without a usable reading becomes ``expired`` (not counted in the score).

**Delivery score** (:meth:`CommandTracker.scores`): over the DER's latest ``score_window``
(20) verified commands, ``(delivered + prior × w) / (verified + w)`` with the prior
``prior_score`` = 0.8 and weight ``w`` = 2 (two notional commands): a new DER starts at
0.8, one failure takes it to 0.53, two to 0.4; one success to 0.87. The fast cycle's cost
per kW moved is ``1 / score``, so later dispatch prefers reliable DERs.

**Escalation** (:meth:`CommandTracker.escalated`): a DER whose latest verified command was
not delivered, verified within ``escalation_s`` (default 300 s), is not relied upon: the
next cycles hold it at its measured output (``FleetNow.fixed``) so the corrective step
moves the others; after that it may be commanded again, at its lower score.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from derms.control.commands import CommandMode, CommandSink, DeviceCommand
from derms.errors import InputError
from derms.protocols.ieee2030_5.delivery import ACKNOWLEDGED as ACK_CODES
from derms.protocols.ieee2030_5.delivery import DECLINED as DECLINED_CODES
from derms.store import commands as store
from derms.store.audit import append_audit
from derms.store.types import ensure_utc, utcnow

log = logging.getLogger(__name__)
ENTITY = "control_command"


@dataclass(frozen=True)
class TrackingConfig:
    """Delivery verification and scoring (module docstring); units in the names."""

    period_s: float = 5.0
    grace_cycles: float = 2.0
    abs_tol_kw: float = 0.5
    rel_tol: float = 0.05
    abs_cap_frac: float = 0.1  # the absolute floor at most this share of the rating
    score_window: int = 20
    prior_score: float = 0.8
    prior_weight: float = 2.0
    escalation_s: float = 300.0

    def __post_init__(self) -> None:
        if self.period_s <= 0 or self.grace_cycles < 0 or self.abs_tol_kw < 0 \
                or self.rel_tol < 0 or self.score_window < 1 or self.prior_weight <= 0 \
                or not 0 < self.prior_score <= 1 or self.escalation_s < 0:
            raise InputError(f"tracking config out of range: {self}")

    @property
    def grace_s(self) -> float:
        return self.grace_cycles * self.period_s


def tolerance_kw(rating_kw: float, config: TrackingConfig) -> float:
    """``max(min(abs_tol_kw, abs_cap_frac x rating), rel_tol x rating)`` [kW]: the absolute
    floor never exceeds a tenth of the rating (0.5 kW on a 0.2-1.5 kW LV device passed a PV
    told to export nothing as delivered at up to 0.5 kW of export)."""
    rating = max(float(rating_kw), 0.0)
    return max(min(config.abs_tol_kw, config.abs_cap_frac * rating) if rating > 0
               else config.abs_tol_kw, config.rel_tol * rating)


def obeyed(mode: str | CommandMode, p_cmd_kw: float, p_meas_kw: float, tol_kw: float) -> bool:
    """Whether a measured net import ``p_meas_kw`` obeys a command (module docstring)."""
    mode = CommandMode(mode)
    if mode is CommandMode.RELEASE:  # no expectation: the device's own behaviour
        return True
    if mode is CommandMode.P_SETPOINT:
        return abs(p_meas_kw - p_cmd_kw) <= tol_kw
    if mode is CommandMode.EXPORT_LIMIT:
        return p_meas_kw >= p_cmd_kw - tol_kw
    return p_meas_kw <= p_cmd_kw + tol_kw


def score_of(states: Sequence[str], config: TrackingConfig) -> float:
    """Smoothed share of delivered among verified ``states`` (module docstring)."""
    n = len(states)
    ok = sum(1 for s in states if s == store.DELIVERED)
    return (ok + config.prior_score * config.prior_weight) / (n + config.prior_weight)


def to_command(rec: store.ControlCommandRecord) -> DeviceCommand:
    return DeviceCommand(rec.command_id, rec.der_id, rec.cycle_id, CommandMode(rec.mode),
                         rec.p_kw, rec.valid_from, rec.valid_until, rec.reason, rec.q_kvar)


@dataclass(frozen=True)
class Verdict:
    command_id: str
    der_id: str
    state: str
    detail: str


class CommandTracker:
    """Tracked commands of one feeder's control loop in the store (module docstring)."""

    def __init__(self, sessions: sessionmaker[Session], feeder_id: str,
                 config: TrackingConfig | None = None, *, actor: str = "control-loop") -> None:
        self.sessions, self.feeder_id = sessions, feeder_id
        self.config = config or TrackingConfig()
        self.actor = actor
        self._seen_responses: set[int] = set()
        self._lock = threading.Lock()

    # -- audit --------------------------------------------------------------------------
    def _audit(self, s: Session, rec: store.ControlCommandRecord, action: str, t: datetime,
               **extra) -> None:
        detail = {"der_id": rec.der_id, "state": rec.state, "cycle_id": rec.cycle_id,
                  "mode": rec.mode, "p_kw": rec.p_kw, **extra}
        append_audit(s, actor=self.actor, action=action, entity=ENTITY,
                     entity_id=rec.command_id, detail=detail, t=t)

    def _set(self, s: Session, rec: store.ControlCommandRecord, state: str, t: datetime,
             detail: str = "", **fields) -> None:
        rec.state = state
        rec.updated_at = t
        if detail:
            rec.detail = detail
        for k, v in fields.items():
            setattr(rec, k, v)
        self._audit(s, rec, f"command_{state}", t, reason=detail or rec.reason)

    # -- life of a command ---------------------------------------------------------------
    def record(self, commands: Sequence[DeviceCommand], now: datetime | None = None
               ) -> list[DeviceCommand]:
        """Store the commands not stored yet (state ``issued``, each audited with its
        reason); returns those that were new."""
        now = ensure_utc(now or utcnow(), "now")
        if not commands:
            return []
        with self._lock, self.sessions.begin() as s:
            have = store.existing_ids(s, [c.command_id for c in commands])
            new = []
            for c in commands:
                if c.command_id in have:
                    continue
                have.add(c.command_id)
                rec = store.ControlCommandRecord(
                    command_id=c.command_id, der_id=c.der_id, feeder_id=self.feeder_id,
                    cycle_id=c.cycle_id, mode=c.mode.value, p_kw=float(c.p_kw),
                    q_kvar=c.q_kvar, valid_from=c.valid_from, valid_until=c.valid_until,
                    reason=c.reason, issued_at=now, state=store.ISSUED, detail="",
                    updated_at=now)
                s.add(rec)
                s.flush()
                self._audit(s, rec, "command_issued", now, reason=c.reason,
                            valid_from=c.valid_from.isoformat(),
                            valid_until=c.valid_until.isoformat(), q_kvar=c.q_kvar)
                new.append(c)
        return new

    def mark_sent(self, command_ids: Sequence[str], now: datetime | None = None) -> int:
        """``issued`` → ``sent`` for these ids; returns how many changed."""
        now = ensure_utc(now or utcnow(), "now")
        ids = list(dict.fromkeys(command_ids))
        if not ids:
            return 0
        n = 0
        with self._lock, self.sessions.begin() as s:
            for rec in store.open_commands(s, feeder_id=self.feeder_id):
                if rec.command_id in ids and rec.state == store.ISSUED:
                    self._set(s, rec, store.SENT, now, sent_at=now)
                    n += 1
        return n

    def take_responses(self, repo, now: datetime | None = None) -> int:
        """Acknowledgements (and refusals) from an IEEE 2030.5 repository's responses
        (module docstring); returns how many commands changed."""
        now = ensure_utc(now or utcnow(), "now")
        fresh = [r for r in repo.responses() if r.response_id not in self._seen_responses]
        if not fresh:
            return 0
        n = 0
        with self._lock, self.sessions.begin() as s:
            open_ = {r.command_id: r for r in store.open_commands(s, feeder_id=self.feeder_id)}
            by_prefix = {cid[:28]: r for cid, r in open_.items()}
            for resp in sorted(fresh, key=lambda r: (r.received_time, r.response_id)):
                mrid = resp.mrid.lower()
                rec = open_.get(mrid) or by_prefix.get(mrid[:28])
                if rec is None or rec.state not in store.OPEN_STATES:
                    continue
                code = resp.status
                t = ensure_utc(resp.received_time, "received_time")
                if code is not None and (code in DECLINED_CODES or code >= 13):
                    self._set(s, rec, store.NOT_DELIVERED, t, ack_status=code, verified_at=t,
                              detail=f"device refused the command (response status {code})")
                    n += 1
                elif code in ACK_CODES:
                    if rec.state != store.ACKNOWLEDGED:
                        self._set(s, rec, store.ACKNOWLEDGED, t, ack_status=code,
                                  acknowledged_at=t, sent_at=rec.sent_at or t)
                        n += 1
                    elif (rec.ack_status or 0) < code <= 3:
                        rec.ack_status = code  # started → completed: no new state
        self._seen_responses.update(r.response_id for r in fresh)
        return n

    def verify(self, now: datetime, latest: Mapping[str, tuple[datetime, float]],
               rating_kw: Mapping[str, float] | None = None) -> list[Verdict]:
        """Judge open commands against each DER's latest telemetry ``latest[der_id] =
        (t, p_kw)`` (module docstring); expire those that ended unverified."""
        now = ensure_utc(now, "now")
        cfg, grace = self.config, timedelta(seconds=self.config.grace_s)
        ratings = rating_kw or {}
        out: list[Verdict] = []
        with self._lock, self.sessions.begin() as s:
            by_der: dict[str, list[store.ControlCommandRecord]] = {}
            for rec in store.open_commands(s, feeder_id=self.feeder_id, for_update=True):
                by_der.setdefault(rec.der_id, []).append(rec)
            for der_id, recs in by_der.items():
                recs.sort(key=lambda r: (r.valid_from, r.issued_at, r.command_id))
                judged = -1
                m = latest.get(der_id)
                if m is not None:
                    t_m, p_m = ensure_utc(m[0], "t"), float(m[1])
                    cands = [k for k, r in enumerate(recs)
                             if r.valid_from + grace <= t_m < r.valid_until]
                    if cands:
                        judged = cands[-1]
                        r = recs[judged]
                        tol = tolerance_kw(ratings.get(der_id, 0.0), cfg)
                        ok = obeyed(r.mode, r.p_kw, p_m, tol)
                        newer = [x for x in recs[judged + 1:] if x.valid_from <= t_m
                                 and obeyed(x.mode, x.p_kw, p_m, tol)]
                        if not ok and newer:  # it follows its newer command already
                            self._set(s, r, store.SUPERSEDED, now,
                                      f"replaced by {newer[-1].command_id}, which the "
                                      f"reading at {t_m.isoformat()} follows",
                                      superseded_by=newer[-1].command_id)
                            out.append(Verdict(r.command_id, der_id, store.SUPERSEDED, ""))
                            cands = []
                    if cands:
                        state = store.DELIVERED if ok else store.NOT_DELIVERED
                        why = (f"measured {p_m:.3f} kW at {t_m.isoformat()} "
                               f"{'obeys' if ok else 'does not obey'} {r.mode} {r.p_kw:.3f} kW "
                               f"(tolerance {tol:.3f} kW)")
                        self._set(s, r, state, now, why, verified_at=now, measured_p_kw=p_m,
                                  measured_at=t_m)
                        out.append(Verdict(r.command_id, der_id, state, why))
                for k, r in enumerate(recs):
                    if k == judged:
                        continue
                    last = k == len(recs) - 1
                    if k < judged or (r.valid_until <= now and not last):
                        nxt = recs[k + 1]
                        self._set(s, r, store.SUPERSEDED, now,
                                  f"replaced by {nxt.command_id} before it was verified",
                                  superseded_by=nxt.command_id)
                        out.append(Verdict(r.command_id, der_id, store.SUPERSEDED, ""))
                    elif r.valid_until <= now:
                        why = ("validity ended before it was sent" if r.state == store.ISSUED
                               else "validity ended without telemetry to verify it")
                        self._set(s, r, store.EXPIRED, now, why)
                        out.append(Verdict(r.command_id, der_id, store.EXPIRED, why))
        return out

    # -- what the loop reads -------------------------------------------------------------
    def scores(self, der_ids: Sequence[str]) -> np.ndarray:
        """Delivery score per DER in ``der_ids`` order (module docstring)."""
        with self.sessions() as s:
            states = store.recent_verified(s, list(der_ids), per_der=self.config.score_window)
        return np.array([score_of(states.get(d, []), self.config) for d in der_ids])

    def escalated(self, der_ids: Sequence[str], now: datetime) -> set[str]:
        """DERs not to be relied upon at ``now`` (module docstring)."""
        now = ensure_utc(now, "now")
        since = now - timedelta(seconds=self.config.escalation_s)
        with self.sessions() as s:
            last = store.latest_verified(s, list(der_ids))
        return {d for d, r in last.items()
                if r.state == store.NOT_DELIVERED and r.verified_at is not None
                and r.verified_at > since}

    def standing(self, now: datetime) -> list[DeviceCommand]:
        """The latest command per DER still valid at ``now`` (what a restart seeds the
        issuer with: a decision that stands keeps its id)."""
        with self.sessions() as s:
            recs = store.valid_commands(s, now, feeder_id=self.feeder_id)
        latest: dict[str, store.ControlCommandRecord] = {}
        for r in recs:
            old = latest.get(r.der_id)
            if old is None or (r.valid_from, r.issued_at) >= (old.valid_from, old.issued_at):
                latest[r.der_id] = r
        return [to_command(r) for r in latest.values()]

    def unsent(self, now: datetime) -> list[DeviceCommand]:
        """Commands stored but never handed to the adapter that are still valid at ``now``
        (a crash between the two: a restart sends them, under their own ids)."""
        now = ensure_utc(now, "now")
        with self.sessions() as s:
            recs = [r for r in store.open_commands(s, feeder_id=self.feeder_id)
                    if r.state == store.ISSUED and r.valid_until > now]
        return [to_command(r) for r in recs]


class TrackingSink:
    """A :class:`CommandSink` that stores every command (idempotently, audited) before it
    hands it to ``inner`` and marks it sent after: a crash in between leaves it
    ``issued``, and the next start sends it (if still valid) under the same id. Commands
    ``inner`` could not place (:attr:`SepCommandSink.unmatched` DERs) stay ``issued``."""

    def __init__(self, tracker: CommandTracker, inner: CommandSink) -> None:
        self.tracker, self.inner = tracker, inner

    def send(self, commands: Sequence[DeviceCommand]) -> int:
        if not commands:
            return 0
        now = min(c.valid_from for c in commands)
        self.tracker.record(commands, now)
        n = self.inner.send(commands)
        unmatched = set(getattr(self.inner, "unmatched", ()) or ())
        self.tracker.mark_sent([c.command_id for c in commands if c.der_id not in unmatched],
                               now)
        return n


__all__ = ["ENTITY", "CommandTracker", "TrackingConfig", "TrackingSink", "Verdict", "obeyed",
           "score_of", "to_command", "tolerance_kw"]
