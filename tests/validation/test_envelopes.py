"""Operating envelopes on IEEE 123: policies hold, a brute-force bisection agrees, and an
independent OpenDSS check (text interface, controls acting) finds no violation with every
connection point at its envelope.

The horizon is a day at 1 h (24 intervals) to keep the suite fast; bench/bench_envelopes.py
measures IEEE 8500 with 1,000 connection points over 288 five-minute intervals.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from derms.analysis.constraints import Limits
from derms.analysis.envelope_network import EnvelopeNetwork, connection_points
from derms.analysis.envelopes import EnvelopeCriteria, compute_envelopes
from derms.errors import InputError, ModelError
from derms.grid.bundled import resolve_master
from derms.grid.opendss_import import read_feeder
from derms.powerflow.engine import OpenDSSEngine
from derms.studies.qsts_study import StudyConfig, study_profiles

CFG = StudyConfig(step=timedelta(hours=1), start=datetime(2026, 7, 1, tzinfo=UTC), seed=3)
MASTER = resolve_master("ieee123")


def _setup(n_cp: int | None = 40, seed: int = 1):
    eng = OpenDSSEngine(MASTER)
    eng.solve_snapshot()
    model = read_feeder(eng.ctx, eng.source_master)
    prof, _ = study_profiles(model, CFG)
    names = [ld.name for ld in model.loads if ld.enabled]
    rng = np.random.default_rng(seed)
    pick = None if n_cp is None else [names[i] for i in
                                      sorted(rng.choice(len(names), n_cp, replace=False))]
    return eng, model, prof, connection_points(model, pick)


@pytest.fixture(scope="module", params=["equal", "proportional", "max_total"])
def solved(request):
    eng, model, prof, cps = _setup()
    res = compute_envelopes(eng, prof, cps, EnvelopeCriteria(policy=request.param))
    eng.close()
    return request.param, model, prof, cps, res


def test_policies_and_internal_ac_check(solved):
    policy, _model, _prof, cps, res = solved
    caps = np.array([c.capacity_kw for c in cps])
    for x in (res.export_kw, res.import_kw):
        assert np.isfinite(x).all() and (x >= 0).all() and (x <= caps + 1e-9).all()
        if policy == "equal":
            assert np.ptp(x, axis=1).max() < 1e-9
        elif policy == "proportional":
            assert np.ptp(x / caps, axis=1).max() < 1e-9
    iv = res.intervals
    assert iv["ac_converged"].all()
    assert iv["ac_v_excess_pu"].max() <= res.criteria.accept_v_pu
    assert iv["ac_thermal_excess_pct"].max() <= res.criteria.accept_thermal_pct
    assert res.static_ratio(5.0) > 1.0  # the feeder allows more than 5 kW each
    table = res.table()
    assert len(table) == len(cps) * len(res.times)


def test_max_total_gives_at_least_the_equal_total():
    eng, _m, prof, cps = _setup()
    eq = compute_envelopes(eng, prof, cps, EnvelopeCriteria(policy="equal"))
    eng.close()
    eng, _m, prof, cps = _setup()
    mt = compute_envelopes(eng, prof, cps, EnvelopeCriteria(policy="max_total"))
    eng.close()
    for d in ("export_kw", "import_kw"):
        t_eq, t_mt = getattr(eq, d).sum(axis=1), getattr(mt, d).sum(axis=1)
        assert (t_mt >= 0.97 * t_eq).all(), d


def test_independent_opendss_check(solved):
    """Fresh engine, plain OpenDSS commands, controls acting: the base case and the case
    with every connection point at its envelope (constant power); no node moves outside
    [0.95, 1.05] by more than 0.002 pu beyond the DESIGN tolerance, no conductor above its
    rating by more than 1 % beyond it, pre-existing violations held to their base value."""
    _policy, _model, prof, cps, res = solved
    lim = Limits()
    steps = [0, 6, 12, 18]
    import dss

    ctx = dss.DSS.NewContext()
    ctx.AllowForms = False
    eng = OpenDSSEngine(MASTER)  # only for its private staged copy of the feeder
    master = eng.master
    text, ckt = ctx.Text, None
    for d, x, qr in (("export", res.export_kw, 0.0), ("import", res.import_kw, 0.329)):
        s = -1.0 if d == "export" else 1.0
        for k in steps:
            text.Command = f"compile [{master}]"
            ckt = ctx.ActiveCircuit
            for j, el in enumerate(prof.elements):  # forecast of interval k
                ckt.SetActiveElement(el)
                ckt.Loads.Name = el.split(".", 1)[1]
                base_kw, base_kvar = ckt.Loads.kW, ckt.Loads.kvar
                ckt.Loads.kW = base_kw * prof.p_mult[k, j]
                ckt.Loads.kvar = base_kvar * prof.p_mult[k, j]
            text.Command = "set controlmode=static"
            ckt.Solution.Solve()
            v_base = np.asarray(ckt.AllBusVmagPu)
            i_base, norm = _currents(ckt)
            for j, cp in enumerate(cps):
                p = s * x[k, j]
                text.Command = (f"edit {cp.load} model=1 vminpu=0 vlowpu=0 vmaxpu=1000 "
                                f"kW={p} kvar={p * qr}")
            ckt.Solution.Solve()
            assert ckt.Solution.Converged
            v = np.asarray(ckt.AllBusVmagPu)
            live = v_base > 0.1
            hi = np.where(v_base > lim.v_max_pu + lim.v_tol_pu, v_base + lim.v_tol_pu,
                          lim.v_max_pu + lim.v_tol_pu)
            lo = np.where(v_base < lim.v_min_pu - lim.v_tol_pu, v_base - lim.v_tol_pu,
                          lim.v_min_pu - lim.v_tol_pu)
            over = (v - hi)[live] if d == "export" else (lo - v)[live]
            assert over.max() <= 0.002, (d, k, over.max())
            i, _ = _currents(ckt)
            rated = norm > 0
            th = lim.thermal_pct + lim.thermal_tol_pct
            cap = np.where(i_base / np.where(rated, norm, 1) * 100 > th,
                           i_base + norm * lim.thermal_tol_pct / 100, norm * th / 100)
            excess = ((i - cap) / np.where(rated, norm, 1) * 100)[rated]
            assert excess.max() <= 1.0, (d, k, excess.max())
    eng.close()


def _currents(ckt) -> tuple[np.ndarray, np.ndarray]:
    """Terminal-1 phase current magnitudes [A] and normal ratings of lines/transformers."""
    out_i, out_n = [], []
    for cls in (ckt.Lines, ckt.Transformers):
        k = cls.First
        while k > 0:
            el = ckt.ActiveCktElement
            nph = el.NumPhases
            mags = np.asarray(el.CurrentsMagAng)[0:2 * nph:2]
            out_i.extend(mags)
            out_n.extend([el.NormalAmps] * nph)
            k = cls.Next
    return np.asarray(out_i), np.asarray(out_n)


def test_brute_force_bisection_agrees():
    """Equal policy, controls frozen: per interval, the largest common envelope found by
    bisection with full AC solves bounds the fast result from above, and the fast result
    is within 10 % of it (the method stops refining within 0.002 pu / 2 % of a limit)."""
    crit = EnvelopeCriteria(policy="equal", controls="frozen", directions=("import",))
    eng, _m, prof, cps = _setup(n_cp=20, seed=5)
    res = compute_envelopes(eng, prof, cps, crit)
    eng.close()
    eng, _m, prof, cps = _setup(n_cp=20, seed=5)
    net = EnvelopeNetwork(eng, prof, cps)
    base = net.base()
    net.reference(act_every=None)
    n = len(cps)
    lim = crit.limits
    lo_band = lim.v_min_pu - lim.v_tol_pu
    live = (base.v_pu > 0.1).all(axis=0)
    v_lo = np.where(base.v_pu < lo_band, base.v_pu - lim.v_tol_pu, lo_band)
    norm = net.index.branch_norm_a
    rated = norm > 0
    th = lim.thermal_pct + lim.thermal_tol_pct
    pre = base.i_a / np.where(rated, norm, 1) * 100 > th
    i_cap = np.where(pre, base.i_a + norm * lim.thermal_tol_pct / 100, norm * th / 100)
    for k in (3, 12, 19):
        def excess(alpha: float, k=k) -> float:
            x = np.zeros((net.n_steps, n))
            x[k] = alpha
            st = net.check(x, 0.329 * x, [k], controls="frozen")
            ve = (v_lo[k] - st.v_pu[0])[live].max()
            te = ((st.i_a[0] - i_cap[k]) / np.where(rated, norm, 1) * 100)[rated].max()
            return max(ve, te / 100 * 0.2)  # 1 % thermal ~ 0.002 pu: same scale
        a_lo, a_hi = 0.0, float(min(c.capacity_kw for c in cps))
        if excess(a_hi) <= 0:
            a_lo = a_hi
        for _ in range(30):
            mid = 0.5 * (a_lo + a_hi)
            a_lo, a_hi = (mid, a_hi) if excess(mid) <= 0 else (a_lo, mid)
        fast = res.import_kw[k, 0]
        assert fast <= a_hi * 1.02 + 1e-6, (k, fast, a_hi)
        assert fast >= 0.9 * a_lo, (k, fast, a_lo)
    eng.close()


def test_bad_input():
    eng, model, prof, cps = _setup(n_cp=5)
    with pytest.raises(ModelError, match="no enabled load"):
        connection_points(model, ["no_such_load"])
    with pytest.raises(ModelError, match="capacity must be positive"):
        connection_points(model, [cps[0].load], capacity_kw={cps[0].id: -3.0})
    with pytest.raises(InputError, match="policy"):
        EnvelopeCriteria(policy="fair")
    with pytest.raises(InputError, match="directions"):
        EnvelopeCriteria(directions=("sideways",))
    with pytest.raises(InputError, match="no connection points"):
        compute_envelopes(eng, prof, [])
    eng.close()
