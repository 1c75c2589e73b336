"""Issue 9 acceptance, end to end on IEEE 123: a violation the DERs cause is cleared within
two fast cycles, with the devices answering over the real protocol path.

``derms serve --control-feeder ieee123 --control-period-s 5`` with its IEEE 2030.5
listener and ``derms sim --feeder-id ieee123`` (100 devices; subscriptions; real time, 1 s
steps) as subprocesses, in two scenarios:

* ``overload`` (evening, 60 % EV chargers): the EV chargers are off line until 25 s, then
  all start charging at once; the surge overloads the feeder-head section (``l115``,
  ``sw1``, ``l3``, ``l7``, ``l10``) beyond its base-case loading;
* ``overvoltage`` (noon, 70 % PV): the PV runs under thick cloud (15 %) until the sky
  clears in 5 s; the exports raise the voltages at the far end above 1.05 pu (slow).

The test takes the loop's first cycle after the trigger that sees a present violation
(its audit log) and checks, from the twin's **own** power flow (``timeseries.csv``: the
violations the devices cause, DESIGN.md's definition, base case = the same step without
them), that none is left two cycles later, that every device commanded acknowledged the
DERControl (IEEE 2030.5 responses → ``acknowledged_at``) and that the loop verified
delivery against the devices' mirrored telemetry (``delivered``, or ``superseded`` by a
newer command the device followed; none ``not_delivered``).
"""

from __future__ import annotations

import uuid

import pandas as pd
import pytest

from tests.e2e.live import LiveDerms, LiveSim, clearance, cloud_ramp

AT_S = 25
CASES = {
    "overload": dict(
        scenario={"events": [{"kind": "dropout", "share": 1.0, "kinds": ["ev"],
                              "start_s": 0, "end_s": AT_S}]},
        mix="pv=0.2,battery=0.2,ev=0.6", start="2026-07-02T04:30:00Z",  # 20:30 local
        trigger=lambda ts: ts.ev_p_out_kw < -1.0, kind="der_thermal"),
    "overvoltage": dict(
        scenario={"events": [cloud_ramp(AT_S)]}, mix="pv=0.7,battery=0.15,ev=0.15",
        start="2026-07-01T20:00:00Z",  # local noon
        trigger=lambda ts: ts.cloud > 0.151, kind="der_overvoltage"),
}


@pytest.mark.parametrize("case,telemetry", [
    ("overload", "ieee2030_5"), ("overload", "mqtt"),
    pytest.param("overvoltage", "ieee2030_5", marks=pytest.mark.slow)])
def test_violation_cleared_within_two_cycles(tmp_path, case, telemetry):
    """``telemetry``: the devices' readings reach the DERMS as IEEE 2030.5 mirror usage
    points or over MQTT (its ingest); the controls go over IEEE 2030.5 both ways."""
    spec = CASES[case]
    root = f"derms-e2e/{uuid.uuid4().hex[:8]}" if telemetry == "mqtt" else None
    derms = LiveDerms(tmp_path / "derms", period_s=5.0, mqtt_root=root)
    sim = LiveSim(derms, tmp_path / "sim", spec["scenario"], duration_s=AT_S + 30,
                  mix=spec["mix"], start=spec["start"], telemetry=telemetry)
    try:
        derms.start()
        derms.open_default_control()
        sim.launch()
        sim.wait(timeout_s=180)
        cmds = derms.commands()
        cycles = derms.cycles()
    finally:
        sim.kill()
        derms.stop()
    ts = sim.timeseries()
    if telemetry == "mqtt":  # the loop's telemetry came only that way (no mirror usage points)
        proto = sim.summary()["protocol"]
        assert proto["mqtt_readings"] > 0 and proto["readings_posts"] == 0, proto
    t_trigger = ts.wall_time[spec["trigger"](ts)].min()
    before = ts[ts.wall_time < t_trigger]
    assert len(before) > 10 and (before.der_violations.tail(5) == 0).all(), \
        before.der_violations.tolist()
    # the loop's first cycle after the trigger that sees a present violation
    hit = cycles[(cycles.t >= t_trigger) & (cycles.violations > 0)]
    assert len(hit), cycles.to_string()
    first = hit.iloc[0]
    t_detect = first.t
    assert first.commands > 0, first
    # the twin saw it too (before the devices reacted), of the kind the scenario makes
    seen = ts[(ts.wall_time >= t_trigger) & (ts[spec["kind"]] > 0)]
    assert len(seen), ts[spec["kind"]].tolist()
    t_clear = clearance(ts, t_detect)
    assert t_clear is not None, ts[ts.wall_time >= t_detect][["wall_time", "der_violations",
                                                               "der_violated"]].to_string()
    dt = (t_clear - t_detect).total_seconds()
    cycles_to_clear = dt / derms.period_s
    print(f"\n{case}: trigger {t_trigger}; twin first violation {seen.wall_time.iloc[0]} "
          f"({seen.der_violated.iloc[0]}); loop detection {t_detect} ({first.commands} "
          f"commands, {first.violations} rows); twin clear {t_clear}: {dt:.1f} s = "
          f"{cycles_to_clear:.2f} cycles after detection, "
          f"{(t_clear - seen.wall_time.iloc[0]).total_seconds():.1f} s after the twin's "
          f"first violation")
    assert cycles_to_clear <= 2.0, (t_detect, t_clear)
    assert (ts[ts.wall_time >= t_clear].der_violations == 0).all()
    # every command of that cycle reached its device, which answered, and delivered
    mine = [c for c in cmds if c["command_id"] in set(first.command_ids)]
    assert len(mine) == first.commands
    states = pd.Series([c["state"] for c in mine]).value_counts().to_dict()
    print(f"commands of the detection cycle: {states}")
    assert all(c["acknowledged_at"] is not None for c in mine), states
    assert set(states) <= {"delivered", "superseded"}, states
    assert states.get("delivered", 0) >= 0.8 * len(mine), states
    assert ts.active_controls.iloc[-1] >= len(mine) * 0.8
    proto = sim.summary()["protocol"]
    assert proto["errors"] == 0 and proto["notifications"] >= len(mine), proto
