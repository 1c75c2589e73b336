"""Hosting-capacity benchmark: fast method (linear sensitivities, AC-verified near the
limit) against the reference (AC bisection to 1 kW between 0 and 10 MW).

Per feeder and kind (pv, load), with the feeder compiled, its base case solved with
controls acting and then frozen (``controlmode=off``) — not counted; everything after it
is (limits from the base case, linear model build, closed-form sizes, AC verification):

* **buses**: sites (every energised primary bus, >= 1 kV line-to-neutral, but the source
  bus, with all its phases), or ``--buses N`` for the first N;
* **fast s / brute s / ratio**: CPU time (``time.process_time``, same process) of each
  method and brute / fast;
* **AC fast / AC brute**: AC solves used;
* **within**: share of sites where |fast - brute| <= max(5 % of brute, 10 kW) (the
  acceptance figure); **worst err**: the largest |fast - brute| [kW] and its relative error;
* **linear within**: the same share for the linear estimate alone (no AC verification),
  and **linear s** its CPU time.

Run: ``.venv/bin/python bench/bench_hosting_capacity.py [--feeders ieee13,ieee123]
[--kinds pv,load] [--buses N] [--no-brute] [--repeats 3]`` (``--repeats``: each row N
times, a fresh engine each, the run with the median ratio reported). 2-core machine; brute
force on IEEE 8500 takes hours, use ``--buses``, ``--sample`` or ``--no-brute`` there.

``--sample N --method fast-groups`` (for IEEE 8500): the fast method on *every* site, brute
force on N sites drawn with seed 0; "brute s" is then the brute-force time per site x the
number of sites (an estimate of brute force on all of them, from the sample), and "within"
is over the sample.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from derms.analysis.hosting_brute import hosting_capacity_brute
from derms.analysis.hosting_capacity import (
    hosting_capacity_fast,
    resolve_sites,
)
from derms.grid.bundled import resolve_master
from derms.powerflow.collect import build_index
from derms.powerflow.control_state import freeze_base_case
from derms.powerflow.engine import OpenDSSEngine


def _row(feeder: str, kind: str, n_buses: int | None, brute: bool, sample: int | None = None,
         method: str = "fast") -> dict:
    with OpenDSSEngine(resolve_master(feeder)) as engine:
        freeze_base_case(engine)
        sites = resolve_sites(engine)
        sites = sites[:n_buses] if n_buses else sites
        index = build_index(engine)
        t = time.process_time()
        fast = hosting_capacity_fast(engine, sites, kind, index=index,
                                     verify={"fast": True, "fast-groups": "groups",
                                             "model": "model"}[method])
        fast_s = time.process_time() - t
        if sample:
            return _sampled(engine, sites, kind, index, fast, fast_s, sample, feeder)
        t = time.process_time()
        lin = hosting_capacity_fast(engine, sites, kind, index=index, verify=False)
        lin_s = time.process_time() - t
        row = {"feeder": feeder, "kind": kind, "buses": len(sites), "fast_s": fast_s,
               "ac_fast": fast.n_ac_solves, "linear_s": lin_s}
        if not brute:
            return row
        t = time.process_time()
        ref = hosting_capacity_brute(engine, sites, kind, index=index)
        brute_s = time.process_time() - t
    b = ref.table["hc_kw"].to_numpy()
    tol = np.maximum(0.05 * b, 10.0)
    err = np.abs(fast.table["hc_kw"].to_numpy() - b)
    err_lin = np.abs(lin.table["hc_linear_kw"].to_numpy() - b)
    k = int(np.argmax(err))
    row.update(brute_s=brute_s, ac_brute=ref.n_ac_solves, ratio=brute_s / fast_s,
               within=float((err <= tol).mean()), worst_kw=float(err[k]),
               worst_rel=float(err[k] / max(b[k], 1e-9)),
               within_linear=float((err_lin <= tol).mean()),
               ratio_linear=brute_s / lin_s)
    return row


def _sampled(engine, sites, kind, index, fast, fast_s, n, feeder) -> dict:
    pick = np.sort(np.random.default_rng(0).choice(len(sites), min(n, len(sites)),
                                                   replace=False))
    t = time.process_time()
    ref = hosting_capacity_brute(engine, [sites[i] for i in pick], kind, index=index)
    per_site = (time.process_time() - t) / pick.size
    b = ref.table["hc_kw"].to_numpy()
    f = fast.table["hc_kw"].to_numpy()[pick]
    err = np.abs(f - b)
    k = int(np.argmax(err))
    brute_s = per_site * len(sites)
    return {"feeder": feeder, "kind": kind, "buses": len(sites), "fast_s": fast_s,
            "ac_fast": fast.n_ac_solves, "linear_s": float("nan"), "brute_s": brute_s,
            "ac_brute": ref.n_ac_solves, "ratio": brute_s / fast_s,
            "within": float((err <= np.maximum(0.05 * b, 10.0)).mean()),
            "worst_kw": float(err[k]), "worst_rel": float(err[k] / max(b[k], 1e-9)),
            "within_linear": float("nan"), "ratio_linear": float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--feeders", default="ieee13,ieee123")
    ap.add_argument("--kinds", default="pv,load")
    ap.add_argument("--buses", type=int, default=None, help="first N sites only")
    ap.add_argument("--no-brute", action="store_true")
    ap.add_argument("--sample", type=int, default=None,
                    help="brute force on N seeded sites only (fast on all)")
    ap.add_argument("--method", choices=["fast", "fast-groups", "model"], default="fast")
    ap.add_argument("--repeats", type=int, default=1,
                    help="run each row N times (fresh engine each) and report the run with "
                         "the median ratio")
    args = ap.parse_args()
    rows = []
    for f in args.feeders.split(","):
        for k in args.kinds.split(","):
            runs = [_row(f, k, args.buses, not args.no_brute, args.sample, args.method)
                    for _ in range(max(args.repeats, 1))]
            runs.sort(key=lambda r: r.get("ratio", r["fast_s"]))
            rows.append(runs[len(runs) // 2])
            if len(runs) > 1 and "ratio" in runs[0]:
                print(f"{f} {k}: ratios " + ", ".join(f"{r['ratio']:.1f}" for r in runs))
    head = (f"{'feeder':9s} {'kind':5s} {'buses':>5s} {'fast s':>7s} {'brute s':>8s} "
            f"{'ratio':>6s} {'AC fast':>7s} {'AC brute':>8s} {'within':>7s} "
            f"{'worst err':>17s} {'linear s':>8s} {'lin within':>10s} {'lin ratio':>9s}")
    print(head)
    for r in rows:
        if "brute_s" not in r:
            print(f"{r['feeder']:9s} {r['kind']:5s} {r['buses']:5d} {r['fast_s']:7.2f} "
                  f"{'-':>8s} {'-':>6s} {r['ac_fast']:7d} {'-':>8s} {'-':>7s} {'-':>17s} "
                  f"{r['linear_s']:8.2f}")
            continue
        print(f"{r['feeder']:9s} {r['kind']:5s} {r['buses']:5d} {r['fast_s']:7.3f} "
              f"{r['brute_s']:8.2f} {r['ratio']:6.1f} {r['ac_fast']:7d} {r['ac_brute']:8d} "
              f"{r['within']:7.1%} {r['worst_kw']:8.1f} kW {r['worst_rel']:5.1%} "
              f"{r['linear_s']:8.2f} {r['within_linear']:10.1%} {r['ratio_linear']:9.1f}")


if __name__ == "__main__":
    main()
