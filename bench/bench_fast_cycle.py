"""Fast corrective cycle benchmark (issue 9): IEEE 8500, 10,000 simulated DERs, N cycles.

Scenario (seeded, ``--seed``):

* **Feeder**: the bundled IEEE 8500, compiled twice — the DERMS model and the "field" —
  each solved once with controls acting at 60 % of the base load, then taps and
  capacitors frozen (at the full base load the taps make every node above 1.05 pu at 60 %).
* **Fleet**: ``--ders`` (10,000) devices, each at a customer load drawn uniformly (1,177
  loads: ≈ 8.5 devices per customer, i.e. per service point; 2,354 DER injection nodes):
  50 % PV, 25 % batteries, 25 % EV chargers. Sizes relative to the customer's peak kW
  divided by the number of devices of that kind at the customer: PV ``U(0.3, 0.8)`` x
  peak (inverter kVA 1.1 x that, Q within ±0.3 x kVA), battery ``U(0.3, 0.6)`` x peak,
  EV ``U(0.4, 0.8)`` x peak. Delivery scores ``U(0.5, 1)``, 5 % of the devices at 0.2.
* **Cycles** (``--cycles`` 30, 5 s apart, run back to back): customer loads at 60 % of the
  base (midday; taps settled there), each with its own ±3 % random walk; PV available
  power ramps from 40 % to 100 % of its size over cycles 0–9 (cloud clearing: the
  **overvoltage**); from cycle 15, the EVs of 1/12 of the EV customers (seeded) start
  charging at full rate (the **overload**: the line whose current they raise most,
  relative to its present current — with seed 0 a service triplex — gets, in both models,
  a rating of 1.05 x its current just before the surge). DERs
  obey the commands in force (PV export limits, EV import limits, battery setpoints, Q).
* **Each cycle** (timed, ``FastCycle.run``): DER telemetry into the model, WLS state
  estimate from the field (AMI voltage at every service transformer + SCADA head V/P/Q,
  0.2 % noise for V and head, AMI kW of every customer at 1 %; pseudo loads at the 60 %
  profile, 30 % sigma), the interval's base case (DERs at zero: pre-existing
  violations held), detection (present + trend), arbitration, adjoint sensitivities of
  the selected rows, the LP, the model's AC check (≤ 3 rounds), commands to the in-memory
  sink.
* **Not timed**: the field's solve and measurements (that is the world), the AC
  confirmation (the field solved with the new setpoints at the same loads: the counts
  in the table), and one plain AC power flow of the field per cycle (the reference: a
  warm re-solve of an already solved state, the cheapest an AC flow gets).

Run: ``.venv/bin/python bench/bench_fast_cycle.py [--ders 10000] [--cycles 30]``
(OpenBLAS pinned to one thread, ``--blas-threads``).
"""

from __future__ import annotations

import argparse
import sys

from _setup import prepare


def _args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ders", type=int, default=10_000)
    ap.add_argument("--cycles", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--blas-threads", type=int, default=1)
    ap.add_argument("--feeder", default="ieee8500")
    ap.add_argument("--profile", action="store_true")
    return ap.parse_args()


ARGS = _args() if __name__ == "__main__" else None
REPO = prepare(ARGS.blas_threads if ARGS is not None else None)

import subprocess
import time
from datetime import UTC, datetime, timedelta

import numpy as np

from derms.control.commands import CommandMode, InMemorySink
from derms.control.fast_cycle import STAGES, DerRegistry, FastCycle, FleetNow
from derms.control.requests import DeviceLocation
from derms.grid.bundled import resolve_master
from tests.validation.test_corrective import Field, customer_loads, frozen
from tests.validation.test_state_estimation import (
    HEAD_BUS,
    meter_nodes_service_transformers,
)

T0 = datetime(2026, 7, 1, 19, 0, tzinfo=UTC)
LOAD_LEVEL = 0.6


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def make_fleet(cust, n: int, seed: int):
    """Kinds, customer of each DER, sizes, scores (module docstring)."""
    rng = np.random.default_rng(seed)
    kind = rng.choice(np.array(["pv", "battery", "ev"]), size=n, p=[0.5, 0.25, 0.25])
    at = rng.integers(0, len(cust), size=n)
    peak = np.array([c[3] for c in cust])[at]
    share = np.zeros(n)
    for k in ("pv", "battery", "ev"):
        m = kind == k
        cnt = np.bincount(at[m], minlength=len(cust))
        share[m] = 1.0 / cnt[at[m]]
    size = np.select([kind == "pv", kind == "battery"],
                     [rng.uniform(0.3, 0.8, n), rng.uniform(0.3, 0.6, n)],
                     rng.uniform(0.4, 0.8, n)) * peak * share
    score = np.where(rng.random(n) < 0.05, 0.2, rng.uniform(0.5, 1.0, n))
    return kind, at, size, score


def main() -> None:
    a = ARGS
    print(f"uptime: {_uptime()}", file=sys.stderr)
    master = resolve_master(a.feeder)
    t_setup = time.perf_counter()
    tmp = frozen(master, LOAD_LEVEL)
    cust = customer_loads(tmp)
    tmp.close()
    kind, at, size, score = make_fleet(cust, a.ders, a.seed)
    points = sorted({c[2] for c in cust})
    pt_of = {p: k for k, p in enumerate(points)}
    point = np.array([pt_of[cust[j][2]] for j in at])
    ids = np.array([f"{k}-{i:05d}" for i, k in enumerate(kind)])
    locs = [DeviceLocation(d, feeder_id=a.feeder, bus=cust[j][1]) for d, j in zip(ids, at)]
    registry = DerRegistry(ids, kind, point, points, locs)
    rng = np.random.default_rng(a.seed + 1)

    # the overload: EVs of one region surge at cycle 15; pick the line they raise most
    field = Field(master, points, load_mult=LOAD_LEVEL)
    field.set_customers(field.base_p * LOAD_LEVEL, field.base_q * LOAD_LEVEL)
    ev = kind == "ev"
    region = np.array([cust[j][1] for j in at])
    ev_buses = np.unique(region[ev])
    surge_buses = set(rng.choice(ev_buses, size=max(1, ev_buses.size // 12), replace=False))
    surge = ev & np.isin(region, list(surge_buses))
    v0, i0 = field.solve()
    field.set_ders(point, np.where(surge, size, 0.0), np.zeros(a.ders))
    _, i1 = field.solve()
    field.set_ders(point, np.zeros(a.ders), np.zeros(a.ders))
    ix = field.index
    elem = ix.branch_element.astype(str)
    cand = (np.char.startswith(elem, "line.") & (ix.branch_norm_a > 0)
            & ~np.isin(ix.branch_bus1, ["sourcebus", HEAD_BUS[a.feeder]]) & (i0 > 1.0))
    rel = np.where(cand, (i1 - i0) / np.maximum(i0, 1.0), -np.inf)
    k_line = int(np.argmax(rel))
    line = elem[k_line]
    rating = 1.05 * float(i0[ix.branch_element == line].max())
    # rating at 1.05 x the pre-surge current: the surge itself (ramped PV aside) trips it
    field.close()
    edit = f"edit {line} normamps={rating:.2f}"
    field = Field(master, points, edits=(edit,), load_mult=LOAD_LEVEL)
    model = frozen(master, LOAD_LEVEL)
    model.command(edit)
    sink = InMemorySink()
    cycle = FastCycle(model, registry, sink, feeder_id=a.feeder)
    meters = list(dict.fromkeys(
        [s for s in field.engine.node_names() if s.rsplit(".", 1)[0] == HEAD_BUS[a.feeder]]
        + meter_nodes_service_transformers(field.engine)))
    t_setup = time.perf_counter() - t_setup

    n = a.ders
    walk = np.ones(field.base_p.size)
    cmd_p = np.full(n, np.nan)
    cmd_q = np.full(n, np.nan)
    rows, conf = [], []
    prof = None
    if a.profile:
        import cProfile
        prof = cProfile.Profile()
    for c in range(a.cycles):
        now = T0 + timedelta(seconds=5 * c)
        walk *= 1 + 0.03 * rng.standard_normal(walk.size) / np.sqrt(a.cycles)
        mult = LOAD_LEVEL * walk
        field.set_customers(field.base_p * mult, field.base_q * mult)
        pv_avail = np.where(kind == "pv", size * min(1.0, 0.4 + 0.6 * c / 9), 0.0)
        ev_on = surge if c >= 15 else np.zeros(n, bool)
        p_max = np.select([kind == "pv", kind == "battery"], [0.0 * size, size],
                          np.where(ev_on, size, 0.0))
        p_min = np.select([kind == "pv", kind == "battery"], [-pv_avail, -size], 0.0 * size)
        natural = np.select([kind == "pv", kind == "battery"], [-pv_avail, 0.0 * size],
                            np.where(ev_on, size, 0.0))
        p_now = _obey(kind, natural, p_min, p_max, cmd_p)
        q_lim = np.where(kind == "pv", 0.3 * 1.1 * size, 0.0)
        q_now = np.where(np.isnan(cmd_q), 0.0, np.clip(cmd_q, -q_lim, q_lim))
        field.set_ders(point, p_now, q_now)
        meas = field.measurements(meters, rng, ami_p=True, pseudo_mult=LOAD_LEVEL,
                                  pseudo_sigma=0.3)
        v_b, i_b = field.solve()
        field.set_ders(point, np.zeros(n), np.zeros(n))  # the field's own base case
        base = field.solve()
        field.set_ders(point, p_now, q_now)
        field.solve()
        fleet = FleetNow(p_kw=p_now, q_kvar=q_now, p_min_kw=p_min, p_max_kw=p_max,
                         q_min_kvar=-q_lim, q_max_kvar=q_lim, score=score)
        if prof is not None:
            prof.enable()
        rep = cycle.run(now, fleet, measurements=meas)
        if prof is not None:
            prof.disable()
        before = _counts(field, cycle, base, v_b, i_b)
        t_ac = time.perf_counter()
        field.engine.solve()  # the reference: one plain AC power flow of the feeder
        t_ac = time.perf_counter() - t_ac
        for cmd in rep.commands:
            j = _pos(ids)[cmd.der_id]
            cmd_p[j] = cmd.p_kw
            cmd_q[j] = np.nan if cmd.q_kvar is None else cmd.q_kvar
        after = before
        if rep.corrective is not None:  # AC confirmation: new setpoints, same loads
            p_new = _obey(kind, natural, p_min, p_max, cmd_p)
            q_new = np.where(np.isnan(cmd_q), 0.0, np.clip(cmd_q, -q_lim, q_lim))
            field.set_ders(point, p_new, q_new)
            after = _counts(field, cycle, base, *field.solve())
        rows.append({**rep.timings, "ac_ref_s": t_ac})
        conf.append((c, before, rep, after))
        print(f"cycle {c:2d}: total {rep.timings['total_s']:.2f} s  se {rep.timings['se_s']:.2f}"
              f"  rows {rep.n_rows:3d}  status {rep.status:8s}  commands "
              f"{len(rep.commands):4d}  field before {_fmt(before)}  after {_fmt(after)}"
              f"  ac rounds {rep.ac_check.get('rounds', 0)}", file=sys.stderr, flush=True)
    if prof is not None:
        import pstats
        pstats.Stats(prof, stream=sys.stderr).sort_stats("cumulative").print_stats(35)
    _report(a, rows, conf, sink, t_setup, line, rating, surge, cycle)
    cycle.engine.close()
    field.close()
    print(f"uptime: {_uptime()}", file=sys.stderr)


_POS: dict = {}


def _pos(ids):
    if not _POS:
        _POS.update({d: j for j, d in enumerate(ids)})
    return _POS


def _obey(kind, natural, p_min, p_max, cmd_p):
    """A DER's net import under the command in force (module docstring)."""
    has = ~np.isnan(cmd_p)
    c = np.where(has, cmd_p, 0.0)
    pv = np.where(has, np.maximum(natural, c), natural)  # export limit: at most -c
    ev = np.where(has, np.minimum(natural, c), natural)  # import limit
    bat = np.where(has, c, natural)
    p = np.select([kind == "pv", kind == "ev"], [pv, ev], bat)
    return np.clip(p, p_min, p_max)


def _counts(field, cycle, base, v, i_a) -> dict[str, int]:
    """Violations of the field against DESIGN limits, pre-existing ones (the field's
    base case at the same loads, DERs at zero) held to their base value."""
    lim, ix = cycle.config.limits, field.index
    bv, bi = base
    v_max = np.where(bv > lim.v_max_pu + lim.v_tol_pu, bv, lim.v_max_pu)
    v_min = np.where((bv < lim.v_min_pu - lim.v_tol_pu) & (bv >= lim.energised_min_pu), bv,
                     lim.v_min_pu)
    rated = ix.branch_norm_a > 0
    i_max = np.where(rated, ix.branch_norm_a * lim.thermal_pct / 100, np.inf)
    i_max = np.where(bi > i_max * (1 + lim.thermal_tol_pct / lim.thermal_pct), bi, i_max)
    live = (ix.node_phase <= 3) & (v >= lim.energised_min_pu)
    return {"overvoltage": int((live & (v > v_max + lim.v_tol_pu)).sum()),
            "undervoltage": int((live & (v < v_min - lim.v_tol_pu)).sum()),
            "thermal": int((i_a > i_max * (1 + lim.thermal_tol_pct / lim.thermal_pct)).sum())}


def _fmt(d) -> str:
    return f"{d['overvoltage']}/{d['undervoltage']}/{d['thermal']}"


def _report(a, rows, conf, sink, t_setup, line, rating, surge, cycle) -> None:
    keys = [*STAGES, "ac_ref_s"]
    arr = {k: np.array([r[k] for r in rows]) for k in keys}
    print(f"\nFast cycle, {a.feeder}, {a.ders} DERs ({int(surge.sum())} EVs in the surge), "
          f"{a.cycles} cycles; set-up (two compiles, index, branch map) {t_setup:.1f} s; "
          f"overload line {line} rated {rating:.1f} A from cycle 15\n")
    print("| stage | p50 s | p90 s | p99 s | max s |")
    print("|---|---:|---:|---:|---:|")
    names = {"se_s": "state estimate (+ DER telemetry into the model)",
             "detect_s": "interval base case + detection", "arbiter_s": "arbitration",
             "sensitivity_s": "adjoint sensitivities", "lp_s": "corrective LP",
             "ac_check_s": "model AC check (rounds)", "commands_s": "commands",
             "total_s": "**total cycle**", "ac_ref_s": "reference: one AC power flow"}
    for k in keys:
        x = arr[k]
        print(f"| {names[k]} | {np.percentile(x, 50):.3f} | {np.percentile(x, 90):.3f} | "
              f"{np.percentile(x, 99):.3f} | {x.max():.3f} |")
    ratio = arr["total_s"] / arr["ac_ref_s"]
    print(f"\ntotal / one AC power flow (same cycle): median {np.median(ratio):.0f}x, "
          f"max {ratio.max():.0f}x; cycles over 5 s: {int((arr['total_s'] > 5).sum())} of "
          f"{len(rows)}")
    acted = [(c, b, r, af) for c, b, r, af in conf if r.corrective is not None]
    print(f"\ncycles that acted: {len(acted)}; commands issued: {len(sink)} "
          f"(distinct DERs {len(sink.latest)}; modes "
          f"{ {m.value: sum(1 for x in sink.commands if x.mode is m) for m in CommandMode} })")
    print("\n| cycle | field before (over/under/thermal) | SE detected | status | method | "
          "DERs moved | commands | field after (AC) |")
    print("|---:|---|---|---|---|---:|---:|---|")
    for c, b, r, af in acted:
        res = r.corrective
        print(f"| {c} | {_fmt(b)} | {_fmt(r.violations)} (+{r.imminent} imminent) | {r.status} "
              f"| {res.method} | {int(res.moved.sum())} | {len(r.commands)} | {_fmt(af)} |")
    cleared = sum(1 for _, b, r, af in acted if sum(af.values()) == 0)
    print(f"\nAC confirmation: {cleared} of {len(acted)} acting cycles leave the field with no "
          f"violation (limits of the interval's base case, DESIGN tolerances)")


if __name__ == "__main__":
    main()
