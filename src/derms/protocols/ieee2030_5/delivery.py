"""Each end device's delivery record, from its responses to the events it was sent.

An event counts for a device once it has started (plus ``grace_s`` for the response to
arrive), when the device saw it (its own, its connection point's or a program-wide event of
a program in its function set assignments), it asked for a response, and it was neither
cancelled before its start nor superseded. Response status codes (IEEE 2030.5 ResponseType)
are grouped: *acknowledged* 1 received, 2 started, 3 completed, 5 opt-in, 9 partially
completed with opt-in, 11 user acknowledged; *declined* 4 opt-out, 8 partially completed
with opt-out, 10 completed without participation, 12 user declined; *rejected* 13 and above
(the CSIP rejection and abort codes such as 252–254). 6 (cancelled) and 7 (superseded) only
confirm receipt.

``score`` = (acknowledged and not declined or rejected + 1) / (events + 2): the share of
events honoured, with one notional success and one failure so that a new device starts at
0.5 and a few events move it gradually. Later dispatch weighs DERs by it (issue 9); what the
device then actually did is checked against telemetry there, not here.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from derms.protocols.ieee2030_5.events import superseded_times
from derms.protocols.ieee2030_5.model import ControlRecord, EndDeviceRecord, ResponseRecord

ACKNOWLEDGED = frozenset({1, 2, 3, 5, 9, 11})
DECLINED = frozenset({4, 8, 10, 12})


@dataclass(frozen=True)
class DeliveryRecord:
    edev_id: int
    lfdi: str
    events: int  # events due a response (see module doc)
    acknowledged: int  # of those, with a positive response
    completed: int  # of those, reported completed (status 3)
    declined: int
    rejected: int
    unanswered: int  # no response at all
    median_ack_s: float | None  # event start (or creation, if later) → first response
    score: float


def _due(control: ControlRecord, now: datetime, grace_s: float) -> bool:
    if not control.response_required:
        return False
    if control.cancelled_time is not None and control.cancelled_time <= control.start:
        return False
    return control.start <= now - timedelta(seconds=grace_s)  # (start + grace overflows at 9999)


def delivery_record(repo, edev: EndDeviceRecord, now: datetime, *, grace_s: float = 60.0
                    ) -> DeliveryRecord:
    """The delivery record of one end device at ``now`` (``repo``: a SepRepository)."""
    program_ids: list[int] = []
    for fsa_id in edev.fsa_ids:
        fsa = repo.fsa(fsa_id)
        program_ids += [p for p in (fsa.program_ids if fsa else ()) if p not in program_ids]
    due: list[ControlRecord] = []
    for pid in program_ids:
        seen = repo.device_controls(pid, edev.edev_id, edev.nmi)
        superseded = superseded_times(seen)
        due += [c for c in seen if c.control_id not in superseded and _due(c, now, grace_s)]
    by_control: dict[int, list[ResponseRecord]] = {}
    for r in repo.responses(edev_ids=[edev.edev_id]):
        by_control.setdefault(r.control_id, []).append(r)
    acknowledged = completed = declined = rejected = unanswered = 0
    delays: list[float] = []
    for c in due:
        answers = by_control.get(c.control_id, [])
        codes = {r.status for r in answers if r.status is not None}
        if not answers:
            unanswered += 1
            continue
        first = min(r.received_time for r in answers)
        delays.append(max(0.0, (first - max(c.start, c.creation_time)).total_seconds()))
        if codes & DECLINED:
            declined += 1
        elif any(code >= 13 for code in codes):
            rejected += 1
        elif codes & ACKNOWLEDGED:
            acknowledged += 1
            completed += 3 in codes
    delays.sort()
    median = (None if not delays else delays[len(delays) // 2] if len(delays) % 2
              else (delays[len(delays) // 2 - 1] + delays[len(delays) // 2]) / 2)
    return DeliveryRecord(edev.edev_id, edev.lfdi, len(due), acknowledged, completed,
                          declined, rejected, unanswered, median,
                          (acknowledged + 1) / (len(due) + 2))
