"""The arbiter's live state, rebuilt from the store: what the control loop owns.

:class:`ControlState` keeps an :class:`~derms.control.arbiter.Arbiter` loaded from the
``control_requests`` table (the store is the shared truth: the API and the ADMS
subscriber write there). :meth:`ControlState.refresh` records expiries (audited once) and
reloads the open requests; :meth:`ControlState.arbitrate` resolves devices and writes
each *changed* decision to the audit log with its reason. After a restart the first
decision of every device is written again (the previous one is not read back), then only
changes.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from sqlalchemy.orm import Session, sessionmaker

from derms.control import persistence
from derms.control.arbiter import Arbiter, Decision
from derms.control.requests import ControlRequest, DeviceLocation
from derms.store.types import ensure_utc


class ControlState:
    """An arbiter mirrored from the store, with audited decisions (module docstring)."""

    def __init__(self, sessions: sessionmaker[Session], *, actor: str = "arbiter") -> None:
        self.sessions, self.actor = sessions, actor
        self.arbiter = Arbiter()
        self._last: dict[str, tuple] = {}

    def refresh(self, now: datetime) -> list[ControlRequest]:
        """Audit the expiries up to ``now`` and reload the open requests; returns the
        requests that expired in this call."""
        now = ensure_utc(now, "now")
        with self.sessions.begin() as s:
            expired = persistence.sweep_expired(s, now, actor=self.actor)
            self.arbiter = Arbiter(persistence.load_open(s, now))
        return expired

    def arbitrate(self, now: datetime, locations: Iterable[DeviceLocation] | None = None
                  ) -> dict[str, Decision]:
        """Refresh, resolve every device (default: all registered) at ``now`` and audit
        the decisions that changed since the last call."""
        now = ensure_utc(now, "now")
        self.refresh(now)
        with self.sessions.begin() as s:
            locs = list(locations) if locations is not None else persistence.device_locations(s)
            decisions = self.arbiter.resolve_many(locs, now)
            for der_id, d in decisions.items():
                if self._last.get(der_id) != d.key():
                    persistence.audit_decision(s, d, actor=self.actor)
        for der_id, d in decisions.items():  # after the commit: a failed write is retried
            self._last[der_id] = d.key()
        return decisions
