"""Which model version of a feeder is the one to check names against: the highest
OpenDSS version whose ``valid_from`` has passed, else the feeder's latest (a feeder whose
only model starts later). Shared by the registry's placement check and the ADMS section
check, so both read the same version."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from derms.store.models import FeederModelVersion
from derms.store.types import utcnow


@dataclass(frozen=True)
class VersionRow:
    """A model version row without its (possibly large) elements."""

    vid: int
    feeder_id: str
    version: int
    source_uri: str


def version_in_force(s: Session, feeder_id: str, now: datetime | None = None
                     ) -> VersionRow | None:
    """The feeder's model version (module docstring) at ``now`` (default: the present), or
    None if it has none."""
    base = select(FeederModelVersion.id, FeederModelVersion.version,
                  FeederModelVersion.source_uri).where(
        FeederModelVersion.feeder_id == feeder_id, FeederModelVersion.source_format == "opendss")
    now = now or utcnow()
    row = s.execute(base.where(FeederModelVersion.valid_from <= now)
                    .order_by(FeederModelVersion.version.desc()).limit(1)).first()
    if row is None:
        row = s.execute(base.order_by(FeederModelVersion.version.desc()).limit(1)).first()
    return None if row is None else VersionRow(row[0], feeder_id, row[1], row[2])


def stored_elements(s: Session, vid: int) -> dict | None:
    """The stored elements JSON of model version ``vid`` (None: not worked out yet)."""
    return s.scalar(select(FeederModelVersion.elements).where(FeederModelVersion.id == vid))


__all__ = ["VersionRow", "stored_elements", "version_in_force"]
