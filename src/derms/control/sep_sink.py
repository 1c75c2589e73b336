"""The IEEE 2030.5 outlet of the control loop: :class:`DeviceCommand` → DERControl.

Each command becomes one DERControl of one DER program for every end device pre-registered
with the command's ``der_id`` (``EndDeviceRecord.der_id``), over ``[valid_from,
valid_until)``, with mRID = ``command_id`` — so re-sending a command stores nothing new
(the repository is idempotent on mRID and content) and a new decision for the same interval
supersedes the older event on the device (IEEE 2030.5 supersession). Values (W, IEEE 2030.5
signs; ``p_kw`` is the DER's net import):

* ``p_setpoint`` → ``opModTargetW`` = −p_kw × 1000 (positive = generating/discharging);
* ``export_limit`` → ``opModGenLimW`` = −p_kw × 1000 (the DER's generation ceiling);
* ``import_limit`` → ``opModLoadLimW`` = p_kw × 1000 (its consumption ceiling);
* ``release`` → a DERControl with no modes (it supersedes the DERMS's earlier event, so
  the device's DefaultDERControl applies: a dispatch block).

Reactive-power setpoints are not expressed yet (logged once per command). ``send`` writes
to the repository only (local; the notifier and the devices' polls carry it out), so the
cycle never waits on the network.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Sequence

from derms.control.commands import CommandMode, DeviceCommand
from derms.protocols.ieee2030_5.model import ControlSpec, DerLimits
from derms.protocols.ieee2030_5.repository import SepAdminRepository

log = logging.getLogger(__name__)


def limits_of(command: DeviceCommand) -> DerLimits:
    """The DERControlBase values that express ``command`` (module docstring)."""
    w = command.p_kw * 1000.0
    if command.mode is CommandMode.RELEASE:  # an event with no modes: it supersedes the
        return DerLimits()                    # DERMS's own, the default control applies
    if command.mode is CommandMode.P_SETPOINT:
        return DerLimits(target_w=-w)
    if command.mode is CommandMode.EXPORT_LIMIT:
        return DerLimits(gen_lim_w=max(0.0, -w))
    return DerLimits(load_lim_w=max(0.0, w))


class SepCommandSink:
    """:class:`~derms.control.commands.CommandSink` into an IEEE 2030.5 repository's
    ``program_id``. ``unmatched``: DER ids commanded that have no registered end device."""

    def __init__(self, repo: SepAdminRepository, program_id: int,
                 description: str = "derms control") -> None:
        if repo.program(program_id) is None:
            raise ValueError(f"DER program {program_id}: unknown")
        self.repo, self.program_id, self.description = repo, program_id, description[:32]
        self._lock = threading.Lock()
        self._index_version: int | None = None
        self._edevs: dict[str, list[int]] = {}
        self.unmatched: set[str] = set()
        self.created = 0

    def _end_devices(self) -> dict[str, list[int]]:
        version = self.repo.version
        if version != self._index_version:
            index: dict[str, list[int]] = {}
            for e in self.repo.end_devices():
                if e.der_id is not None:
                    index.setdefault(e.der_id, []).append(e.edev_id)
            self._edevs, self._index_version = index, version
        return self._edevs

    def send(self, commands: Sequence[DeviceCommand]) -> int:
        """Store the commands as DERControls; returns how many commands reached at least one
        end device (the others' DERs are added to :attr:`unmatched`)."""
        with self._lock:
            index = self._end_devices()
            specs: list[ControlSpec] = []
            accepted = 0
            for cmd in commands:
                edevs = index.get(cmd.der_id)
                if not edevs:
                    if cmd.der_id not in self.unmatched:
                        log.warning("event=sep_command_unmatched der_id=%s", cmd.der_id)
                    self.unmatched.add(cmd.der_id)
                    continue
                if cmd.q_kvar is not None:
                    log.info("event=sep_command_q_ignored command=%s der_id=%s",
                             cmd.command_id, cmd.der_id)
                duration_s = math.ceil((cmd.valid_until - cmd.valid_from).total_seconds())
                limits = limits_of(cmd)
                for k, edev_id in enumerate(edevs):
                    # one event per end device; a DER behind two end devices gets two mRIDs
                    mrid = (cmd.command_id if k == 0 else
                            f"{cmd.command_id[:28]}{k:04X}").upper()
                    specs.append(ControlSpec(self.program_id, cmd.valid_from, duration_s,
                                             limits, self.description, edev_id=edev_id,
                                             mrid=mrid))
                accepted += 1
            results = self.repo.add_controls(specs) if specs else []
            self.created += sum(1 for _, new in results if new)
            return accepted
