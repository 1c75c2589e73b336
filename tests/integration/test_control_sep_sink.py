"""Control-loop commands become IEEE 2030.5 DERControls the device sees (no duplicates)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from derms.control.commands import CommandMode, DeviceCommand, command_id
from derms.control.sep_sink import SepCommandSink
from derms.protocols.ieee2030_5 import InMemoryRepository
from tests.integration.test_ieee2030_5_management import LFDI_1, LFDI_2, Q, _sep_get

def _cmd(cycle: str, der: str, mode: CommandMode, p_kw: float) -> DeviceCommand:
    """A command valid from now for 5 minutes (now at the call: the test may run long after
    the module was imported)."""
    t = datetime.now(UTC).replace(microsecond=0)
    return DeviceCommand(command_id(cycle, der), der, cycle, mode, p_kw, t,
                         t + timedelta(minutes=5), "overload l115 phase 1")


def _w(el, tag: str, ns: str = Q) -> float:
    found = el.find(f"{Q}DERControlBase/{ns}{tag}")
    return int(found.findtext(f"{Q}value")) * 10 ** int(found.findtext(f"{Q}multiplier"))


def test_commands_become_der_controls_once():
    repo = InMemoryRepository()
    pid = repo.add_program("derms control", 0).program_id
    fsa = repo.add_fsa("fleet", [pid]).fsa_id
    bat = repo.add_end_device(LFDI_1, der_id="bat-1", fsa_ids=[fsa]).edev_id
    pv = repo.add_end_device(LFDI_2, der_id="pv-1", fsa_ids=[fsa]).edev_id
    sink = SepCommandSink(repo, pid)
    cmds = [_cmd("c1", "bat-1", CommandMode.P_SETPOINT, -4.2),
            _cmd("c1", "pv-1", CommandMode.EXPORT_LIMIT, -2.5),
            _cmd("c1", "ev-7", CommandMode.IMPORT_LIMIT, 3.0)]
    assert sink.send(cmds) == 2 and sink.unmatched == {"ev-7"} and sink.created == 2
    derc = _sep_get(repo, LFDI_1, f"/edev/{bat}/derp/{pid}/derc").find(f"{Q}DERControl")
    assert derc.findtext(f"{Q}mRID") == cmds[0].command_id.upper()
    assert _w(derc, "opModTargetW") == 4200  # discharging 4.2 kW
    derc = _sep_get(repo, LFDI_2, f"/edev/{pv}/derp/{pid}/derc").find(f"{Q}DERControl")
    assert _w(derc, "opModGenLimW", "{https://csipaus.org/ns}") == 2500
    # re-sending the same commands (a restart, a retry) stores nothing twice
    assert sink.send(cmds) == 2 and sink.created == 2 and len(repo.controls(pid)) == 2
    # a new decision for the battery supersedes the old event on the device
    sink.send([_cmd("c2", "bat-1", CommandMode.P_SETPOINT, -1.0)])
    statuses = sorted(e.findtext(f"{Q}EventStatus/{Q}currentStatus") for e in
                      _sep_get(repo, LFDI_1, f"/edev/{bat}/derp/{pid}/derc"))
    assert statuses == ["1", "4"]
    with pytest.raises(ValueError, match="unknown"):
        SepCommandSink(repo, 999)


def test_a_release_supersedes_the_derms_event_with_an_empty_one():
    """A block's release: a DERControl with no modes (schema-valid) that supersedes the
    DERMS's earlier event, so the device's default control applies."""
    repo = InMemoryRepository()
    pid = repo.add_program("derms control", 0).program_id
    fsa = repo.add_fsa("fleet", [pid]).fsa_id
    pv = repo.add_end_device(LFDI_2, der_id="pv-1", fsa_ids=[fsa]).edev_id
    sink = SepCommandSink(repo, pid)
    sink.send([_cmd("c1", "pv-1", CommandMode.EXPORT_LIMIT, -2.5)])
    assert sink.send([_cmd("c2", "pv-1", CommandMode.RELEASE, 0.0)]) == 1
    listed = _sep_get(repo, LFDI_2, f"/edev/{pv}/derp/{pid}/derc")   # validated by _sep_get
    by_status = {e.findtext(f"{Q}EventStatus/{Q}currentStatus"): e for e in listed}
    assert set(by_status) == {"1", "4"}                 # the release active, the old superseded
    base = by_status["1"].find(f"{Q}DERControlBase")
    assert base is not None and len(base) == 0
