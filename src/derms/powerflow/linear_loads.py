"""Voltage-dependent load currents of OpenDSS, linearised per load branch.

A *branch* is one phase of an element: what sits between two system nodes (a phase node
and the neutral or ground for wye, two phase nodes for delta and line-to-line loads).
OpenDSS draws the branch current ``I = conj(S(m) / V)``, ``V`` the branch voltage, where
the complex power ``S`` depends only on ``m = |V|``, through the load model and the voltage
region (``Load.pas`` of OpenDSS / DSS C-API):

* ``m <= Vlowpu``: constant Z at the nominal admittance ``Yeq`` (every model);
* ``Vlowpu < m <= Vminpu``: current magnitude interpolated linearly in ``m`` (models 1, 3,
  4, 5, 8), or constant Z (6, 7);
* ``m > Vmaxpu``: constant Z;
* otherwise the model's own law: 1 const PQ, 2 const Z (in every region), 3 const P +
  quadratic Q, 4 CVR exponents, 5 const |I|, 6 const P + fixed Q, 7 const P + fixed-X Q,
  8 ZIPV (with its low-voltage drop-out).

Every law is written ``S(m) = a0 + a1 m + a2 m^2 + w r^cw + j var r^cv`` (``r = m / Vbase``),
times the ZIPV drop-out where set, so ``dI = A dV + B conj(dV)`` follows in closed form for
all branches at once. Generators, PV systems and storage are taken as constant power at
their solved output (their Vmin/Vmax switching and inverter limits are not modelled).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from derms.errors import ModelError

log = logging.getLogger(__name__)

_SQRT3 = np.sqrt(3.0)
_NO_ZIPV = np.zeros(7)


@dataclass(frozen=True, slots=True)
class Branches:
    """Per-phase branches of voltage-dependent elements (arrays, one entry per branch).

    ``node_i``/``node_j``: 0-based indices in the engine's Y-node order (-1 = ground); the
    branch current flows from ``node_i`` through the element to ``node_j``.
    ``y_sys_s``: admittance [S] the element stamps into OpenDSS's system Y for the branch
    (its nominal ``Yeq``; the solver compensates it with injection currents).
    ``w_nom_w``/``var_nom_var``: nominal per-phase power [W], [var] as solved (multipliers
    included); ``var_fixed_var``: per-phase kvar base [var] used by models 6 and 7.
    ``v_base_v``: the element's per-branch voltage base [V]; ``*_pu`` its region limits.
    """

    element: np.ndarray
    node_i: np.ndarray
    node_j: np.ndarray
    y_sys_s: np.ndarray
    model: np.ndarray
    v_base_v: np.ndarray
    vlow_pu: np.ndarray
    vmin_pu: np.ndarray
    vmax_pu: np.ndarray
    w_nom_w: np.ndarray
    var_nom_var: np.ndarray
    var_fixed_var: np.ndarray
    cvr_p: np.ndarray
    cvr_q: np.ndarray
    zipv: np.ndarray  # (n_branch, 7)


def read_branches(engine, v_y: np.ndarray) -> Branches:
    """Collect the branches of every enabled load, generator, PV system and storage.

    Parameters
    ----------
    engine : OpenDSSEngine
        A solved engine.
    v_y : ndarray of complex, (n_nodes,)
        Solved node voltages [V] in the engine's Y-node order.

    Loops over elements, not nodes (≈ 50 ms for the 1,177 loads of IEEE 8500, mostly the
    engine reads). Nominal powers are calibrated to each element's solved power (see
    :func:`_calibrate`).
    """
    ckt = engine.circuit
    el = ckt.ActiveCktElement
    rows: list[tuple] = []
    s_elem: list[complex] = []
    loads = ckt.Loads
    mult = float(ckt.Solution.LoadMult)
    idx = loads.First
    vlow_prop = None  # vlowpu's property index (by index: ~3x cheaper than by name)
    while idx:
        if el.Enabled:
            if vlow_prop is None:  # Properties(int) is 0-based
                vlow_prop = [p.lower() for p in el.AllPropertyNames].index("vlowpu")
            nph, delta = int(loads.Phases), bool(loads.IsDelta)
            kv, model = float(loads.kV), int(loads.Model)
            v_base = kv * 1000.0 / (_SQRT3 if (nph in (2, 3) and not delta) else 1.0)
            zipv = _NO_ZIPV
            if model == 8:
                zipv = np.asarray(loads.ZIPV, dtype=float)
                if zipv.size != 7:
                    raise ModelError(f"load.{loads.Name}: model=8 needs 7 ZIPV values")
            # fixed/exempt loads ignore LoadMult (Status read only when it matters)
            factor = mult if mult == 1.0 or int(loads.Status) == 0 else 1.0
            w, var = 1000.0 * loads.kW / nph, 1000.0 * loads.kvar / nph
            law = (model, v_base, float(el.Properties(vlow_prop).Val), float(loads.Vminpu),
                   float(loads.Vmaxpu), w * factor, var * factor, var,
                   float(loads.CVRwatts), float(loads.CVRvars), zipv)
            s_elem.append(_add(rows, el, "load." + loads.Name, nph, delta, law, 1))
        idx = loads.Next
    for iface in (ckt.Generators, ckt.PVSystems, ckt.Storages):
        idx = iface.First
        while idx:
            if el.Enabled:
                nph = int(el.NumPhases)
                conn = str(el.Properties("conn").Val).strip().lower()
                p = np.asarray(el.Powers, dtype=float)
                s = 1000.0 * complex(p[0::2].sum(), p[1::2].sum()) / nph  # consumption sign
                law = (1, 1.0, 0.0, 0.0, np.inf, s.real, s.imag, s.imag, 1.0, 2.0, np.zeros(7))
                delta = conn.startswith(("d", "l"))
                s_elem.append(_add(rows, el, el.Name.lower(), nph, delta, law))
            idx = iface.Next
    br = _to_arrays(rows)
    _calibrate(br, np.abs(branch_voltage(v_y, br)), np.asarray(s_elem, dtype=complex))
    return br


def _add(rows: list, el, name: str, nph: int, delta: bool, law: tuple,
         n_terminals: int | None = None) -> complex:
    """Append the element's branches to ``rows``; return its solved total power [VA].

    Python scalars and lists throughout (a handful of values per element: numpy's
    per-call overhead was half of :func:`read_branches`' time)."""
    node_ref = el.NodeRef.tolist()
    n_terms = int(el.NumTerminals) if n_terminals is None else n_terminals
    n_conds = len(node_ref) // n_terms
    n_cols = n_conds * n_terms  # Yprim is (n_cols x n_cols), row-major (re, im) pairs
    yp = el.Yprim.tolist()
    for k in range(nph):
        a, b = (k, (k + 1) % n_conds) if delta else (k, n_conds - 1)
        o = 2 * (a * n_cols + b)
        # 1-based refs, 0 = ground
        rows.append((name, node_ref[a] - 1, node_ref[b] - 1, -complex(yp[o], yp[o + 1]), *law))
    p = el.Powers.tolist()
    return 1000.0 * complex(sum(p[0::2]), sum(p[1::2]))


def _to_arrays(rows: list[tuple]) -> Branches:
    fields = Branches.__slots__
    if not rows:  # typed as when filled: indices int, admittances complex (a feeder
        # without loads raised IndexError where the node indices index arrays)
        dtype = {"element": object, "node_i": np.int64, "node_j": np.int64,
                 "model": np.int64, "y_sys_s": complex}
        return Branches(*(np.zeros((0, 7)) if f == "zipv" else
                          np.zeros(0, dtype=dtype.get(f, float)) for f in fields))
    cols = list(zip(*rows))
    # row layout: name, i, j, y, model, vbase, vlow, vmin, vmax, w, var, var_fixed, cp, cq, zipv
    order = ["element", "node_i", "node_j", "y_sys_s", "model", "v_base_v", "vlow_pu",
             "vmin_pu", "vmax_pu", "w_nom_w", "var_nom_var", "var_fixed_var", "cvr_p",
             "cvr_q", "zipv"]
    data = {f: np.asarray(c) for f, c in zip(order, cols)}
    data["element"] = np.asarray(cols[0], dtype=object)
    for f in ("node_i", "node_j", "model"):
        data[f] = data[f].astype(np.int64)
    for f in order[5:14]:
        data[f] = data[f].astype(float)
    data["y_sys_s"] = data["y_sys_s"].astype(complex)
    data["zipv"] = np.array(cols[14], dtype=float).reshape(-1, 7)
    return Branches(**data)


def branch_voltage(v_y: np.ndarray, br: Branches) -> np.ndarray:
    """Branch voltages [V]: ``V[node_i] - V[node_j]`` (ground = 0)."""
    vi = np.where(br.node_i >= 0, v_y[np.maximum(br.node_i, 0)], 0.0)
    vj = np.where(br.node_j >= 0, v_y[np.maximum(br.node_j, 0)], 0.0)
    return vi - vj


def _calibrate(br: Branches, m: np.ndarray, s_elem: np.ndarray) -> None:
    """Rescale nominal W (and var, except models 6/7) so each element's laws sum to its
    solved power. P is proportional to ``w_nom`` in every region and model, Q to
    ``var_nom`` except the fixed-Q models; a mismatch above 0.1 % is logged."""
    if m.size == 0:
        return
    first = np.r_[True, br.element[1:] != br.element[:-1]]
    elem = np.cumsum(first) - 1
    s_b = branch_power(br, m)[0]
    s_law = np.bincount(elem, s_b.real, s_elem.size) + 1j * np.bincount(elem, s_b.imag, s_elem.size)
    with np.errstate(divide="ignore", invalid="ignore"):
        kp = np.where(np.abs(s_law.real) > 1e-9, s_elem.real / s_law.real, 1.0)
        kq = np.where(np.abs(s_law.imag) > 1e-9, s_elem.imag / s_law.imag, 1.0)
    kq = np.where(np.isin(br.model[first], (6, 7)), 1.0, kq)
    off = np.abs(s_law - s_elem) > 1e-3 * np.maximum(np.abs(s_elem), 1.0)
    if off.any():
        log.debug("linear_loads calibrated=%d elements first=%s", off.sum(),
                  br.element[first][off][0])
    br.w_nom_w[:] *= kp[elem]
    br.var_nom_var[:] *= kq[elem]


def _sc(c: np.ndarray, re: np.ndarray, im: np.ndarray) -> np.ndarray:
    """Scale real and imaginary parts separately (ZIPV coefficient pairs)."""
    return c.real * re + 1j * (c.imag * im)


def branch_power(br: Branches, m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Complex power ``S(m)`` [VA] drawn by each branch and ``dS/dm`` [VA/V].

    Parameters
    ----------
    br : Branches
    m : ndarray, (n_branch,)
        Branch voltage magnitudes [V].
    """
    vb = br.v_base_v
    vlow, v95, v105 = br.vlow_pu * vb, br.vmin_pu * vb, br.vmax_pu * vb
    yeq = (br.w_nom_w - 1j * br.var_nom_var) / vb**2
    y95 = np.where(br.vmin_pu != 0, yeq / np.where(br.vmin_pu != 0, br.vmin_pu, 1) ** 2, 0)
    vmx = np.where(br.vmax_pu != 0, br.vmax_pu, 1.0)
    y105 = yeq / vmx**2
    y105i = yeq / vmx
    i_low = yeq * vlow
    with np.errstate(divide="ignore", invalid="ignore"):
        span = np.where(v95 != vlow, v95 - vlow, np.inf)
    m95 = (y95 * v95 - i_low) / span
    m95i = (yeq * vb - i_low) / span
    yq_fixed = -br.var_fixed_var / vb**2
    model, z = br.model, br.zipv.T

    low = m <= vlow
    mid = ~low & (m <= v95)
    high = ~low & ~mid & (m > v105)
    norm = ~low & ~mid & ~high

    a0 = np.zeros(m.size, complex)
    a1 = np.zeros(m.size, complex)
    a2 = np.zeros(m.size, complex)

    def add_y(mask, y):  # constant admittance: S = conj(Y) m^2
        a2[mask] += np.conj(y)[mask]

    def add_interp(mask, i0, slope):  # I = (i0 + slope (m - vlow)) V / m: S = m conj(...)
        a1[mask] += np.conj(i0 - slope * vlow)[mask]
        a2[mask] += np.conj(slope)[mask]

    zpq = np.isin(model, (1, 3, 4))
    add_y(low | (model == 2) | ~np.isin(model, (1, 3, 4, 5, 6, 7, 8)), yeq)
    add_interp(mid & zpq, i_low, m95)
    add_y(high & zpq, y105)
    add_interp(mid & (model == 5), i_low, m95i)
    add_y(high & (model == 5), y105i)
    fq = np.isin(model, (6, 7))
    add_y(mid & fq, y95.real + 1j * yq_fixed)
    add_y(high & fq, y105.real + 1j * yq_fixed)
    zp = (model == 8) & ~low
    yz = _sc(yeq, z[0], z[3])
    add_y(zp & ~norm, yz)
    add_interp(zp & mid, _sc(i_low, z[2], z[5]), _sc(m95, z[2], z[5]))
    add_interp(zp & mid, _sc(i_low, z[1], z[4]), _sc(m95i, z[1], z[4]))
    add_y(zp & high, _sc(y105, z[2], z[5]) + _sc(y105i, z[1], z[4]))

    s_nom = br.w_nom_w + 1j * br.var_nom_var
    n = norm & (model != 2)
    a0[n & (model == 1)] += s_nom[n & (model == 1)]
    k = n & np.isin(model, (3, 6, 7))
    a0[k] += br.w_nom_w[k]
    k3 = n & (model == 3)
    a2[k3] += (1j * br.var_nom_var / vb**2)[k3]
    a0[n & (model == 6)] += 1j * br.var_fixed_var[n & (model == 6)]
    k7 = n & (model == 7)
    a2[k7] += (1j * br.var_fixed_var / vb**2)[k7]
    a1[n & (model == 5)] += (s_nom / vb)[n & (model == 5)]
    k8 = n & (model == 8)
    a2[k8] += np.conj(yz)[k8]
    a1[k8] += ((br.w_nom_w * z[1] + 1j * br.var_nom_var * z[4]) / vb)[k8]
    a0[k8] += (br.w_nom_w * z[2] + 1j * br.var_nom_var * z[5])[k8]

    s = a0 + a1 * m + a2 * m**2
    ds = a1 + 2 * a2 * m
    k4 = n & (model == 4)
    if k4.any():
        r = m[k4] / vb[k4]
        cp, cq = br.cvr_p[k4], br.cvr_q[k4]
        w, var = br.w_nom_w[k4], br.var_nom_var[k4]
        s[k4] += w * r**cp + 1j * var * r**cq
        ds[k4] += (w * cp * r ** (cp - 1) + 1j * var * cq * r ** (cq - 1)) / vb[k4]
    drop = (model == 8) & ~low & (z[6] > 0)
    if drop.any():
        vx = 500.0 * (m / vb - z[6])
        drop &= vx < 20
        t = np.tanh(vx[drop])
        yv, dyv = 0.5 * (1 + t), 0.5 * (1 - t**2) * 500.0 / vb[drop]
        ds[drop] = ds[drop] * yv + s[drop] * dyv
        s[drop] = s[drop] * yv
    return s, ds


def branch_jacobian(
    br: Branches, vd: np.ndarray, band_pu: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Linearised branch currents: ``dI = A dV + B conj(dV)`` net of the system-Y stamp.

    Parameters
    ----------
    br : Branches
    vd : ndarray of complex, (n_branch,)
        Branch voltages [V] at the operating point.
    band_pu : float
        0 for the tangent. Otherwise ``dS/dm`` is replaced by the central secant over
        ``m0 ± band_pu * Vbase``: identical for the PQ, Z and I laws (polynomials of degree
        <= 2), but it bridges the switches to constant Z at ``Vminpu``/``Vmaxpu``.

    Returns
    -------
    A, B : ndarray of complex, (n_branch,)
        [S]. ``A`` already has ``y_sys_s`` subtracted, so adding the stamps of ``A, B``
        to OpenDSS's system Y gives the Jacobian of the network's current balance.
    """
    dead = vd == 0  # de-energised: OpenDSS keeps such loads at Yeq (below Vlowpu)
    vd = np.where(dead, 1.0, vd)
    m = np.abs(vd)
    s, ds = branch_power(br, m)
    if band_pu > 0 and m.size:
        h = np.minimum(band_pu * br.v_base_v, 0.5 * m)
        ds = (branch_power(br, m + h)[0] - branch_power(br, m - h)[0]) / (2 * h)
    cv = np.conj(vd)
    a = np.conj(ds) / (2 * m)
    b = np.conj(ds) * vd / (2 * m * cv) - np.conj(s) / cv**2
    return np.where(dead, 0.0, a - br.y_sys_s), np.where(dead, 0.0, b)
