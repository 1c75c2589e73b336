"""DER aggregation: DERs of one kind, compatible parameters and nearby locations planned
as one DER whose members move in fixed proportion.

A group's members each take a fixed ``share`` (summing to 1) of every quantity of the
group: net import, reactive power, PV output, battery charge/discharge and energy, EV
charging, shed and rebound. The group's parameters are chosen so that every member's
share of any feasible group dispatch is feasible for that member (an inner restriction,
never a relaxation): power limits are ``min_i(limit_i / share_i)``, energies and
baselines add up. Members are grouped only where their parameters make that restriction
cheap: the same SOC fractions and efficiencies and nearly the same duration (batteries),
proportional forecast shapes and nearly the same kVA-to-peak ratio (PV), the same
departure and an arrival in the same hour (EV sessions: the group is plugged in from its
members' last arrival, shares by energy need, and is formed only where its energy takes
at most 80 % of that window at the group's rate), proportional baselines and the same
window (flexible loads). Generators, and DERs named in a VPP request, stay single.

Location comes from the caller as one feature vector per DER (e.g. its column of the
feeder's voltage sensitivities): within a compatible set, DERs are clustered by k-means
on those vectors (complete linkage under a relative distance, then k-means where a
cluster is larger than ``size``). The network sees a group's
sensitivity as the share-weighted sum of its members' (exact for the restriction: linear
model rows stay exact, the AC check injects each member's share at its own bus).

Pure data and math (layer 3): no power-flow imports.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from dataclasses import dataclass, replace
from datetime import timedelta

import numpy as np
import scipy.sparse as sp
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.cluster.vq import kmeans2
from scipy.spatial.distance import cdist, squareform

from derms.der.models import Connection, Fleet, Horizon, _window_mask
from derms.errors import InputError

_KINDS = ("pv", "batteries", "evs", "flex", "generators")
_EV_FILL = 0.8  # a group of EV sessions needs at most this share of its window at full rate
AUTO_GROUP_MIN_DERS = 500  # ``size=None`` (auto): fleets of at least this many DERs ...
AUTO_GROUP_SIZE = 4  # ... are planned in groups of about this many (every DER on its own below)


def auto_group_size(n_ders: int) -> int:
    """Group size of ``size=None`` (auto) for a fleet of ``n_ders``: 1 (every DER on its
    own) below ``AUTO_GROUP_MIN_DERS``, else ``AUTO_GROUP_SIZE``. Measured (bench/README,
    sessions 17, 22, 23): IEEE 8500's 882 DERs plan in 120-156 s in groups of 4 against
    243-360 s each on its own, with summed violations within the verify loop's scatter;
    EPRI ckt24's 2,918 DERs do not finish the rolling study in 25 min each on its own
    (459 s in groups of 4); below a few hundred DERs the plan takes seconds either way
    and groups only restrict it."""
    return AUTO_GROUP_SIZE if n_ders >= AUTO_GROUP_MIN_DERS else 1


@dataclass(frozen=True)
class AggregationConfig:
    """``size``: target members per group (1 turns aggregation off); ``spread``: the largest
    relative distance between two members' location vectors (``|f_i - f_j|`` over their
    mean norm; the default 1.0 only keeps apart DERs on different parts of the feeder:
    within that, k-means on ``size`` makes the groups local); ``ratio_step``: width
    of the bins (relative, log scale) of a battery's duration and a PV's kVA over its
    peak inside which DERs may share a group (the price of the restriction: a member's
    power limit can be used only to ``1 / (1 + ratio_step)``).
    ``size=None``: chosen from the fleet's size (:func:`auto_group_size`, see
    :meth:`resolved`).
    ``pv_by_capacity``: PV curtailment is to be shared in proportion to kVA (the
    "proportional_to_capacity" policy): PVs then share a group only with the same kVA
    over peak (to 1e-6), the one case where every member's share of its group's
    curtailment is its own kVA's share (and the group's the sum of its members' kVA)."""

    size: int | None = 8
    spread: float = 1.0
    ratio_step: float = 0.1
    seed: int = 0
    pv_by_capacity: bool = False

    def __post_init__(self) -> None:
        if ((self.size is not None and self.size < 1) or not 0 < self.ratio_step < 1
                or self.spread <= 0):
            raise InputError(f"aggregation size {self.size} must be >= 1, spread "
                             f"{self.spread} > 0 and ratio_step {self.ratio_step} in (0, 1)")

    def resolved(self, n_ders: int) -> AggregationConfig:
        """This configuration with a concrete ``size`` for a fleet of ``n_ders`` (``size``
        None: :func:`auto_group_size`)."""
        return self if self.size is not None else replace(self, size=auto_group_size(n_ders))


@dataclass(frozen=True)
class Aggregation:
    """A fleet of groups (``fleet``) standing for ``members``.

    ``group_of`` (n_member,): index of each member's group in ``fleet`` order;
    ``share`` (n_member,): its fixed share of every quantity of the group;
    ``parts`` (n_group,): each group's members' connections and shares.
    """

    members: Fleet
    fleet: Fleet
    group_of: np.ndarray
    share: np.ndarray
    parts: tuple[tuple[tuple[Connection, float], ...], ...]

    def expand(self, x: np.ndarray) -> np.ndarray:
        """Group values (..., n_group) -> member values (..., n_member)."""
        return np.asarray(x)[..., self.group_of] * self.share

    def collect(self, x: np.ndarray) -> np.ndarray:
        """Member values (..., n_member) -> group totals (..., n_group)."""
        n, g = self.group_of.size, len(self.fleet.ders)
        m = sp.csr_matrix((np.ones(n), (np.arange(n), self.group_of)), shape=(n, g))
        return np.asarray(np.asarray(x, dtype=float) @ m)

    def of_kind(self, kind: str) -> tuple[np.ndarray, np.ndarray]:
        """(group index within ``kind``, share) of that kind's members, kind order
        (``kind``: "pv", "batteries", "evs", "flex", "generators")."""
        m0 = _offset(self.members, kind)
        g0 = _offset(self.fleet, kind)
        n = len(getattr(self.members, kind))
        return self.group_of[m0:m0 + n] - g0, self.share[m0:m0 + n]

    def pv_follows_capacity(self, rel_tol: float = 1e-5) -> bool:
        """Whether every PV member's share of its group is its share of the group's kVA
        (what the "proportional_to_capacity" curtailment policy needs of a group)."""
        g, w = self.of_kind("pv")
        s = np.array([p.s_kva for p in self.members.pv])
        live = np.array([float(p.p_avail_kw.max()) > 0 for p in self.members.pv], bool)
        if not live.any():
            return True
        tot = np.bincount(g[live], weights=s[live], minlength=len(self.fleet.pv))
        return bool(np.allclose(w[live] * tot[g[live]], s[live], rtol=rel_tol, atol=0.0))

    @property
    def grouped(self) -> bool:
        """Whether any DERs were grouped (False: the identity, ``fleet is members``)."""
        return self.fleet is not self.members

    def of_members(self, fleet: Fleet) -> bool:
        """Whether ``fleet`` is the members of real groups (a schedule of it is per DER,
        not per planned group)."""
        return self.grouped and fleet is self.members

    @property
    def sizes(self) -> np.ndarray:
        return np.bincount(self.group_of, minlength=len(self.fleet.ders))


def _offset(fleet: Fleet, kind: str) -> int:
    return sum(len(getattr(fleet, k)) for k in _KINDS[:_KINDS.index(kind)])


def singletons(fleet: Fleet) -> Aggregation:
    """Every DER its own group (the identity aggregation)."""
    n = len(fleet.ders)
    return Aggregation(fleet, fleet, np.arange(n), np.ones(n),
                       tuple(((d.connection, 1.0),) for d in fleet.ders))


def _bin(x: float, step: float) -> int:
    return math.floor(math.log(max(x, 1e-12)) / math.log1p(step))


def _shape_key(y: np.ndarray, exact: bool) -> tuple:
    """A series' shape (normalised by its peak), rounded: equal keys = proportional."""
    y = np.asarray(y, dtype=float)
    peak = float(y.max()) if y.size else 0.0
    if peak <= 0:
        return ("zero",)
    return tuple(np.round(y / peak, 9 if exact else 6))


def _pv_ratio_key(p, cfg: AggregationConfig) -> object:
    """A PV's kVA over its peak: its bin, or (``cfg.pv_by_capacity``) the ratio itself to
    1e-6 relative (a PV that never produces: its kVA decides alone, as shares are then
    equal)."""
    peak = float(p.p_avail_kw.max())
    if not cfg.pv_by_capacity:
        return _bin(p.s_kva / max(peak, 1e-9), cfg.ratio_step)
    return ("zero",) if peak <= 0 else float(f"{p.s_kva / peak:.6e}")


def _keys(fleet: Fleet, cfg: AggregationConfig) -> dict[str, list]:
    """Compatibility key of every DER per kind (None: stays single)."""
    in_request = set()
    gid = {g.group_id: g for g in fleet.groups}
    for r in fleet.requests:
        in_request.update(gid[r.group_id].members)
    s = cfg.ratio_step
    keys: dict[str, list] = {}
    keys["pv"] = [None if p.der_id in in_request else
                  (_shape_key(p.p_avail_kw, False), p.q_max_frac, p.curtail_cost_per_kwh,
                   _pv_ratio_key(p, cfg))
                  for p in fleet.pv]
    keys["batteries"] = [None if b.der_id in in_request else
                         (b.soc0_frac, b.soc_min_frac, b.soc_max_frac, b.reserve_frac,
                          b.soc_end_min_frac, b.eta_charge, b.eta_discharge,
                          b.cycle_cost_per_kwh, _bin(b.e_max_kwh / max(b.p_max_kw, 1e-9), s))
                         for b in fleet.batteries]
    keys["evs"] = [None if e.der_id in in_request else
                   (e.departure, e.eta_charge,
                    (e.arrival - fleet.horizon.start) // timedelta(hours=1))
                   for e in fleet.evs]
    keys["flex"] = [None if f.der_id in in_request else
                    (_shape_key(f.p_base_kw, True), f.window_start, f.window_end,
                     f.shed_max_frac, f.rebound_frac, f.p_rebound_max_kw is None,
                     f.shed_cost_per_kwh)
                    for f in fleet.flex]
    keys["generators"] = [None] * len(fleet.generators)
    return keys


def _clusters(idx: np.ndarray, features: np.ndarray, cfg: AggregationConfig
              ) -> list[np.ndarray]:
    """Split DERs ``idx`` (fleet order) into location clusters: complete linkage on the
    relative distance ``|f_i - f_j| / mean(|f_i|, |f_j|)`` cut at ``cfg.spread``, then
    clusters above ``cfg.size`` split by k-means."""
    if idx.size <= 1:
        return [idx]
    x = features[idx]
    norm = np.linalg.norm(x, axis=1)
    d = cdist(x, x) / np.maximum(0.5 * (norm[:, None] + norm[None, :]), 1e-300)
    lab = fcluster(linkage(squareform(d, checks=False), "complete"), cfg.spread,
                   "distance")
    out = []
    for c in np.unique(lab):
        members = idx[lab == c]
        k = math.ceil(members.size / cfg.size)
        if k <= 1:
            out.append(members)
            continue
        xm = features[members]
        # no more clusters than distinct locations (DERs at one bus share theirs):
        # k-means++ seeding divides by zero past them; an empty cluster is only dropped
        k = min(k, len(np.unique(xm, axis=0)))
        if k <= 1:
            out.append(members)
            continue
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "One of the clusters is empty")
            _c, sub = kmeans2(xm / (float(np.abs(xm).max()) or 1.0), k, seed=cfg.seed,
                              minit="++", iter=20)
        out += [members[sub == s] for s in np.unique(sub)]
    return out


def _weights(kind: str, ders: list) -> np.ndarray:
    if kind == "pv":
        w = np.array([float(p.p_avail_kw.max()) for p in ders])
    elif kind == "batteries":
        w = np.array([b.e_max_kwh for b in ders])
    elif kind == "evs":
        w = np.array([e.e_needed_kwh for e in ders])
    elif kind == "flex":
        w = np.array([float(f.p_base_kw.max()) for f in ders])
    else:
        w = np.array([g.p_max_kw for g in ders])
    return w / w.sum() if w.sum() > 0 else np.full(len(ders), 1.0 / len(ders))


def _merge(kind: str, ders: list, share: np.ndarray, gid: str, horizon: Horizon):
    """One DER standing for ``ders`` moving in ``share`` (see the module docstring); None
    where the members cannot share one (EV sessions whose common window is too short)."""
    d0 = ders[int(np.argmax(share))]
    if len(ders) == 1:
        return d0
    if kind == "pv":
        avail = np.min(np.column_stack([p.p_avail_kw for p in ders]) / share, axis=1)
        s_kva = min(p.s_kva / w for p, w in zip(ders, share, strict=True))
        return replace(d0, der_id=gid, s_kva=s_kva, p_avail_kw=np.minimum(avail, s_kva))
    if kind == "batteries":
        e = sum(b.e_max_kwh for b in ders)
        p = min(b.p_max_kw / w for b, w in zip(ders, share, strict=True))
        return replace(d0, der_id=gid, e_max_kwh=e, p_max_kw=p)
    if kind == "evs":  # plugged in together: from the last arrival (same departure)
        p = min(e.p_max_kw / w for e, w in zip(ders, share, strict=True))
        arr = max(e.arrival for e in ders)
        e_g = sum(e.e_needed_kwh for e in ders)
        # the hours the plan can charge in: whole intervals of the horizon inside the
        # shared window (an arrival or departure inside an interval loses it), then the
        # hours after the horizon's end
        hours = (_window_mask(horizon, arr, d0.departure).sum() * horizon.dt_h
                 + max(0.0, (d0.departure - horizon.end) / timedelta(hours=1)))
        if e_g > _EV_FILL * p * d0.eta_charge * hours:
            return None  # the shared window cannot take the energy comfortably
        return replace(d0, der_id=gid, e_needed_kwh=e_g, p_max_kw=p, arrival=arr)
    # flexible loads: proportional baselines, so the group's is their sum
    base = np.sum(np.column_stack([f.p_base_kw for f in ders]), axis=1)
    reb = None if d0.p_rebound_max_kw is None else min(
        f.p_rebound_max_kw / w for f, w in zip(ders, share, strict=True))
    return replace(d0, der_id=gid, p_base_kw=base, p_rebound_max_kw=reb)


def aggregate(fleet: Fleet, features: np.ndarray, config: AggregationConfig | None = None
              ) -> Aggregation:
    """Group ``fleet``'s DERs (see the module docstring). ``features`` (n_der, d): one
    location vector per DER, fleet order."""
    n = len(fleet.ders)
    cfg = (config or AggregationConfig()).resolved(n)
    features = np.asarray(features, dtype=float)
    if features.shape[0] != n:
        raise InputError(f"aggregation needs one feature row per DER ({n}), got "
                         f"{features.shape[0]}")
    if cfg.size <= 1 or n == 0:
        return singletons(fleet)
    keys = _keys(fleet, cfg)
    group_of, share = np.empty(n, dtype=np.int64), np.empty(n)
    parts: list[tuple[tuple[Connection, float], ...]] = []
    out: dict[str, list] = {k: [] for k in _KINDS}
    for kind in _KINDS:
        ders = list(getattr(fleet, kind))
        m0 = _offset(fleet, kind)
        by_key: dict[object, list[int]] = defaultdict(list)
        for j, key in enumerate(keys[kind]):
            by_key[("single", j) if key is None else key].append(j)
        for members in by_key.values():
            for cl in _clusters(np.asarray(members) + m0, features, cfg):
                loc = [int(c) - m0 for c in cl]
                w = _weights(kind, [ders[j] for j in loc])
                merged = _merge(kind, [ders[j] for j in loc], w, f"group_{kind}_{len(parts)}",
                                fleet.horizon)
                for sub, ws, d in ([(loc, w, merged)] if merged is not None else
                                   [([j], np.ones(1), ders[j]) for j in loc]):
                    g = len(parts)
                    out[kind].append(d)
                    group_of[np.asarray(sub) + m0] = g
                    share[np.asarray(sub) + m0] = ws
                    parts.append(tuple((ders[j].connection, float(x))
                                       for j, x in zip(sub, ws, strict=True)))
    # groups were numbered kind by kind, so ``parts`` is already in fleet order; VPP
    # groups are kept where all their members stayed single (those with requests do)
    ids = {d.der_id for k in _KINDS for d in out[k]}
    vpp = tuple(g for g in fleet.groups if set(g.members) <= ids)
    keep = {g.group_id for g in vpp}
    agg = replace(fleet, pv=tuple(out["pv"]), batteries=tuple(out["batteries"]),
                  evs=tuple(out["evs"]), flex=tuple(out["flex"]),
                  generators=tuple(out["generators"]), groups=vpp,
                  requests=tuple(r for r in fleet.requests if r.group_id in keep))
    return Aggregation(fleet, agg, group_of, share, tuple(parts))

