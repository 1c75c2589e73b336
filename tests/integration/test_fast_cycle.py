"""The fast cycle in a closed loop on IEEE 123 (field = a second OpenDSS engine whose DERs
obey the commands in force): a PV ramp causes an overvoltage in a section the ADMS has
blocked; while the block lasts its DERs are neither moved nor commanded and what the
others cannot clear is reported (status "partial"); one cycle after the block expires the
field is clean and stays clean; no decision is commanded twice."""

from __future__ import annotations

from datetime import timedelta

import numpy as np

from derms.control.arbiter import Arbiter
from derms.control.fast_cycle import FleetNow
from derms.control.requests import CommandKind, ControlRequest, Scope, Source
from tests.validation.test_corrective import T0, make_case, pv_fleet


def _obey(natural, cmd_p):
    has = ~np.isnan(cmd_p)
    return np.where(has, np.maximum(natural, cmd_p), natural)  # PV export limits


def test_closed_loop_pv_ramp_block_and_expiry():
    ders = pv_fleet(n=40, seed=5, kw=(20.0, 40.0))
    sizes = -np.array([d[3] for d in ders])
    case = make_case(ders)
    try:
        bus = np.array([loc.bus for loc in case.registry.locations])
        section = sorted(set(bus[:10]))
        blocked = np.isin(bus, section)
        block_end = T0 + timedelta(seconds=25)
        case.cycle.arbiter = Arbiter([ControlRequest(
            "adms-1", Source.ADMS, CommandKind.BLOCK_DISPATCH,
            Scope.section("ieee123", "z1", section), T0, block_end)])
        n = len(ders)
        cmd_p = np.full(n, np.nan)
        seen_ids, after_onset, blocked_cmds = set(), [], {True: 0, False: 0}
        status = []
        onset = None
        for c in range(10):
            now = T0 + timedelta(seconds=5 * c)
            avail = sizes * min(1.0, 0.2 + 0.2 * c)  # ramps to full output by cycle 4
            p = _obey(-avail, cmd_p)
            fleet = FleetNow(p, np.zeros(n), -avail, np.zeros(n), np.zeros(n), np.zeros(n),
                             np.ones(n))
            case.field.set_ders(case.registry.point, p, np.zeros(n))
            v, i_a = case.field.solve()
            meas = case.field.measurements(case.meters, case.rng)
            rep = case.cycle.run(now, fleet, measurements=meas)
            viol = case.field.violations(case.cycle, v, i_a)
            if onset is None and sum(viol.values()):
                onset = c
            if onset is not None:
                after_onset.append(sum(viol.values()))
            for cmd in rep.commands:
                assert cmd.command_id not in seen_ids
                seen_ids.add(cmd.command_id)
                j = int(np.flatnonzero(case.registry.der_id == cmd.der_id)[0])
                cmd_p[j] = cmd.p_kw
                blocked_cmds[now < block_end] += bool(blocked[j])
            if now < block_end and rep.corrective is not None:
                assert not rep.corrective.moved[blocked].any()
                assert (rep.status == "partial") == bool(rep.corrective.remaining)
            status.append(rep.status)
        assert onset is not None, "the ramp never caused a violation"
        assert blocked_cmds[True] == 0 and blocked_cmds[False] > 0
        k_end = int((block_end - T0).total_seconds() // 5)  # first cycle after expiry
        assert "partial" in status[:k_end]
        field = after_onset[k_end - onset + 1:]  # from one cycle after the block lifts
        assert field and all(x == 0 for x in field), after_onset
        # commands are not repeated while nothing changes: far fewer than cycles x DERs
        assert len(case.sink) < 3 * n
    finally:
        case.field.close()
        case.cycle.engine.close()
