"""Load-growth scenario and its device profiles (EV, heat pump, PV) on one representative year.

Time base: ``steps_per_day * 365`` intervals starting at local-standard midnight of 1 January
(``utc_offset_h``), reported in UTC. Every profile is on this grid, so interval ``k`` is the
same local hour for the load shapes, the weather and the PV.

Customers: a load of ``p_kw`` (its peak, the bundled shapes peak at 1) stands for
``n = max(1, round(p_kw / customer_peak_kw))`` customers of ``p_kw / n`` each (IEEE 13/123
spot loads aggregate many houses; IEEE 8500 loads are single houses). Adoption draws one
random rank per customer and technology with the seed: customer ``c`` has the device in year
``y`` iff ``rank[c] < round(share[y] * n_customers)``, so adoption is cumulative and stable.

Device models (all consumption-positive kW; PV output ``p_gen_kw >= 0`` is subtracted):

* EV home charging: charger kW from a discrete distribution (3.7 / 7.4 / 11 kW with
  probabilities 0.25 / 0.65 / 0.10); on each day with probability ``plug_in_prob`` the car
  arrives at ``N(arrival_h_mean, arrival_h_sd)`` local time (clipped to 14-23.75 h) needing
  ``Gamma(mean e_kwh_day_mean, cv e_kwh_day_cv)`` kWh (≤ 60 kWh) and charges at full power
  until done (≤ 14 h). Energy is spread exactly over the intervals the session overlaps.
* Heat pump (heating only, degree-hour model): temperature from pvlib's bundled TMY3 file of
  Greensboro NC (``723170TYA.CSV``, hour-ending, local standard time). Heat demand per unit
  ``h = (T_bal - T) / (T_bal - T_design)`` (≥ 0), ``T_design`` the 1 % coldest hour;
  electric power per unit of rated kW ``min(1, h * COP(T_design) / COP(T))`` with
  ``COP(T) = max(cop_min, cop_at_0c + cop_slope_per_c * T)``. Rated kW = ``U(size_per_peak)``
  x the customer's peak; balance temperature ``N(balance_c_mean, balance_c_sd)`` per
  customer, in 0.5 degC bins.
* PV: measured AC output of PVDAQ system 50 (Golden CO, bundled in ``derms/data/measured``,
  year 2013; its logger followed daylight saving time, shifted back to MST here), normalised
  by its 99.9th percentile and clipped to 1, gaps filled with the same time of day of the
  surrounding week; mapped onto the study year by local-standard time of year. Rating
  (AC kW at a profile value of 1) = ``U(size_per_peak)`` x the customer's peak.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from derms.errors import InputError
from derms.grid.bundled import data_dir
from derms.grid.model import FeederModel
from derms.studies.profiles_library import load_shapes_at

DAYS = 365
PROFILE_KINDS = ("flat", "load", "ev", "heat_pump", "pv")


@dataclass(frozen=True)
class Adoption:
    """Share of customers (0..1) that own a technology, per year index 0..years (cumulative)."""

    shares: tuple[float, ...]

    @classmethod
    def logistic(cls, initial: float, final: float, years: int, *,
                 midpoint: float | None = None, steepness: float = 0.8) -> Adoption:
        """S-curve from ``initial`` (year 0) to ``final`` (year ``years``), exact at both ends.

        ``s(y) = initial + (final - initial) * (L(y) - L(0)) / (L(years) - L(0))`` with
        ``L(y) = 1 / (1 + exp(-steepness * (y - midpoint)))``, midpoint ``years / 2`` by default.
        """
        y = np.arange(years + 1, dtype=float)
        mid = years / 2 if midpoint is None else midpoint
        curve = 1.0 / (1.0 + np.exp(-steepness * (y - mid)))
        span = curve[-1] - curve[0]
        frac = (curve - curve[0]) / span if span > 0 else y / max(years, 1)
        return cls(tuple(float(v) for v in initial + (final - initial) * frac))

    @classmethod
    def none(cls, years: int) -> Adoption:
        return cls((0.0,) * (years + 1))


@dataclass(frozen=True)
class EVParams:
    """EV home charging (see module docstring). kW, kWh, local hours."""

    charger_kw: tuple[float, ...] = (3.7, 7.4, 11.0)
    charger_prob: tuple[float, ...] = (0.25, 0.65, 0.10)
    e_kwh_day_mean: float = 10.0
    e_kwh_day_cv: float = 0.5
    arrival_h_mean: float = 18.0
    arrival_h_sd: float = 1.5
    plug_in_prob: float = 0.8


@dataclass(frozen=True)
class HeatPumpParams:
    """Heat pump degree-hour model (see module docstring). degC, per-unit sizes."""

    size_per_peak: tuple[float, float] = (0.4, 0.8)
    balance_c_mean: float = 15.5
    balance_c_sd: float = 1.0
    cop_at_0c: float = 2.8
    cop_slope_per_c: float = 0.08
    cop_min: float = 1.5


@dataclass(frozen=True)
class PVParams:
    """PV rating per unit of the customer's peak kW, uniform in ``size_per_peak``."""

    size_per_peak: tuple[float, float] = (0.5, 1.2)


@dataclass(frozen=True)
class NewConnection:
    """A new customer connection: ``p_kw`` peak consumption (generation for ``pv``) at
    ``bus`` from calendar ``year`` on, with profile ``flat``, ``load`` (the bundled shapes'
    mean), ``ev`` (a diversified EV fleet), ``heat_pump`` or ``pv``; ``pf`` lagging."""

    bus: str
    p_kw: float
    profile: str = "load"
    year: int = 0
    pf: float = 1.0


def _fail(name: str, value, expected: str) -> None:
    raise InputError(f"GrowthScenario.{name} = {value!r}: expected {expected}")


@dataclass(frozen=True)
class GrowthScenario:
    """A load-growth scenario over year indices ``0..years`` (0 = base year ``start_year``).

    ``ev``/``hp``/``pv``: adoption shares per year index (``years + 1`` values, 0..1,
    non-decreasing); ``growth_pct``: organic growth of existing customers' base load per
    year [%/yr, compounding]; ``step_min``: profile step (15, 30 or 60 min).
    """

    years: int = 10
    start_year: int = 2026
    ev: Adoption | None = None
    hp: Adoption | None = None
    pv: Adoption | None = None
    growth_pct: float = 1.0
    new_connections: tuple[NewConnection, ...] = ()
    ev_params: EVParams = field(default_factory=EVParams)
    hp_params: HeatPumpParams = field(default_factory=HeatPumpParams)
    pv_params: PVParams = field(default_factory=PVParams)
    customer_peak_kw: float = 10.0
    step_min: int = 60
    utc_offset_h: float = -5.0
    seed: int = 1

    @classmethod
    def simple(cls, years: int = 10, *, ev_final: float = 0.5, hp_final: float = 0.3,
               pv_final: float = 0.4, **kw) -> GrowthScenario:
        """Logistic adoption from 0 in the base year to the final shares in the last year."""
        if not isinstance(years, int) or not 1 <= years <= 50:
            _fail("years", years, "an integer in 1..50")
        for name, v in (("ev", ev_final), ("hp", hp_final), ("pv", pv_final)):
            if not 0.0 <= v <= 1.0:
                _fail(f"{name} final share", v, "a share in 0..1")
        return cls(years=years, ev=Adoption.logistic(0.0, ev_final, years),
                   hp=Adoption.logistic(0.0, hp_final, years),
                   pv=Adoption.logistic(0.0, pv_final, years), **kw)

    def __post_init__(self) -> None:
        if not isinstance(self.years, int) or not 1 <= self.years <= 50:
            _fail("years", self.years, "an integer in 1..50")
        if not 1900 <= self.start_year <= 2200:
            _fail("start_year", self.start_year, "a calendar year")
        for name in ("ev", "hp", "pv"):
            a = getattr(self, name)
            if a is None:
                object.__setattr__(self, name, Adoption.none(self.years))
                continue
            s = np.asarray(a.shares, dtype=float)
            if len(s) != self.years + 1:
                _fail(f"{name}.shares", a.shares, f"{self.years + 1} values (years 0..{self.years})")
            if not np.isfinite(s).all() or (s < 0).any() or (s > 1).any():
                _fail(f"{name}.shares", a.shares, "shares in 0..1")
            if (np.diff(s) < -1e-12).any():
                _fail(f"{name}.shares", a.shares, "non-decreasing shares (adoption is cumulative)")
        if not -50.0 < self.growth_pct < 50.0:
            _fail("growth_pct", self.growth_pct, "a growth rate in (-50, 50) %/yr")
        if not self.customer_peak_kw > 0:
            _fail("customer_peak_kw", self.customer_peak_kw, "a positive kW")
        if self.step_min not in (15, 30, 60):
            _fail("step_min", self.step_min, "15, 30 or 60")
        ev = self.ev_params
        if len(ev.charger_kw) != len(ev.charger_prob) or not ev.charger_kw or \
                min(ev.charger_kw) <= 0 or abs(sum(ev.charger_prob) - 1) > 1e-6 or \
                min(ev.charger_prob) < 0:
            _fail("ev_params.charger_kw/charger_prob", (ev.charger_kw, ev.charger_prob),
                  "positive kW with probabilities summing to 1")
        if not (ev.e_kwh_day_mean > 0 and ev.e_kwh_day_cv > 0 and 0 < ev.plug_in_prob <= 1
                and ev.arrival_h_sd >= 0):
            _fail("ev_params", ev, "positive energy, cv and spread, plug_in_prob in (0, 1]")
        for name, rng in (("hp_params.size_per_peak", self.hp_params.size_per_peak),
                          ("pv_params.size_per_peak", self.pv_params.size_per_peak)):
            if len(rng) != 2 or not 0 < rng[0] <= rng[1]:
                _fail(name, rng, "(min, max) with 0 < min <= max")
        last = self.start_year + self.years
        for i, nc in enumerate(self.new_connections):
            where = f"new_connections[{i}]"
            if not 0 < nc.p_kw < math.inf:
                _fail(f"{where}.p_kw", nc.p_kw, "a positive, finite kW")
            if nc.profile not in PROFILE_KINDS:
                _fail(f"{where}.profile", nc.profile, " | ".join(PROFILE_KINDS))
            if not self.start_year <= nc.year <= last:
                _fail(f"{where}.year", nc.year, f"a calendar year in {self.start_year}..{last}")
            if not 0 < nc.pf <= 1:
                _fail(f"{where}.pf", nc.pf, "a power factor in (0, 1]")
            if not str(nc.bus).strip():
                _fail(f"{where}.bus", nc.bus, "a bus name")

    @property
    def steps_per_day(self) -> int:
        return 24 * 60 // self.step_min

    @property
    def n_steps(self) -> int:
        return DAYS * self.steps_per_day

    @property
    def dt_h(self) -> float:
        return self.step_min / 60.0

    def times_utc(self) -> pd.DatetimeIndex:
        """Interval starts of the representative year (UTC)."""
        start = pd.Timestamp(self.start_year, 1, 1, tz="UTC") - pd.Timedelta(
            hours=self.utc_offset_h)
        return pd.date_range(start, periods=self.n_steps, freq=f"{self.step_min}min")

    def growth_factor(self, year: int) -> float:
        """Organic growth multiplier of existing customers' base load in year index ``year``."""
        return (1.0 + self.growth_pct / 100.0) ** year

    def adopted(self, tech: str, n_customers: int) -> np.ndarray:
        """Number of adopters per year index (``years + 1`` ints, non-decreasing)."""
        shares = np.asarray(getattr(self, tech).shares, dtype=float)
        return np.round(shares * n_customers).astype(int)


# -- weather and measured PV ----------------------------------------------------------------
def _hourly_to_grid(hourly: np.ndarray, steps_per_day: int) -> np.ndarray:
    """8760 hourly interval values onto the study grid (interpolated between hour centres)."""
    n = DAYS * steps_per_day
    x = (np.arange(n) + 0.5) * 24.0 / steps_per_day
    xp = np.arange(8760) + 0.5
    return np.interp(x, xp, hourly[:8760], period=8760.0)


@lru_cache(maxsize=1)
def tmy3_temperature_c() -> np.ndarray:
    """Hourly dry-bulb temperature [degC], 8760 values, of pvlib's Greensboro NC TMY3 file."""
    import pvlib

    path = Path(pvlib.__file__).parent / "data" / "723170TYA.CSV"
    data, _meta = pvlib.iotools.read_tmy3(str(path), map_variables=True)
    return data["temp_air"].to_numpy(dtype=float)[:8760]


@lru_cache(maxsize=1)
def measured_pv_15min() -> np.ndarray:
    """PVDAQ system 50, 2013, per unit, 15-min in MST (UTC-7): 35040 values (see module doc)."""
    df = pd.read_parquet(data_dir() / "measured" / "pvdaq_system50_ac_power.parquet")
    wall = pd.DatetimeIndex(df["measured_on"]).tz_localize(None)
    in_dst = (wall >= pd.Timestamp("2013-03-10 03:00")) & (wall < pd.Timestamp("2013-11-03 01:00"))
    mst = wall - pd.to_timedelta(np.where(in_dst, 1, 0), unit="h")
    s = pd.Series(df["ac_power_2"].to_numpy(dtype=float), index=mst)
    s = s[~s.index.duplicated()]
    grid = pd.date_range("2013-01-01", periods=DAYS * 96, freq="15min")
    s = s.reindex(grid)
    scale = np.nanpercentile(s.to_numpy(), 99.9)
    mat = pd.DataFrame((s.to_numpy() / scale).reshape(DAYS, 96))
    fill = mat.rolling(7, center=True, min_periods=1).mean()
    out = mat.fillna(fill).fillna(0.0).to_numpy().ravel()
    return np.clip(out, 0.0, 1.0)


def pv_pu(steps_per_day: int) -> np.ndarray:
    """Measured PV per unit of rating on the study grid (interval means) -> (T,)."""
    base = measured_pv_15min()
    per = 96 // steps_per_day
    return base.reshape(-1, per).mean(axis=1)


def heat_pump_pu(temp_c: np.ndarray, balance_c: np.ndarray, p: HeatPumpParams) -> np.ndarray:
    """Electric power per unit of rated kW -> (T, B) for temperatures (T,) [degC] and
    balance temperatures (B,) [degC] (degree-hour model, module docstring)."""
    t = np.asarray(temp_c, dtype=float)[:, None]
    bal = np.asarray(balance_c, dtype=float)[None, :]
    t_design = float(np.percentile(temp_c, 1.0))
    cop = np.maximum(p.cop_min, p.cop_at_0c + p.cop_slope_per_c * t)
    cop_design = max(p.cop_min, p.cop_at_0c + p.cop_slope_per_c * t_design)
    heat = np.clip((bal - t) / np.maximum(bal - t_design, 1.0), 0.0, None)
    return np.minimum(1.0, heat * cop_design / cop)


def ev_profiles_kw(charger_kw: np.ndarray, rng: np.random.Generator, p: EVParams,
                   steps_per_day: int) -> np.ndarray:
    """Home-charging power [kW] per EV -> (n_ev, T) float32 (sessions of module docstring).

    Each session charges at ``charger_kw`` over ``[start, start + duration)`` hours; the
    energy falling in each interval is computed exactly with difference arrays (a ramp of
    slope 1 per interval from the start, minus one from the end), sessions past the year's
    end wrap to its beginning.
    """
    n_ev = len(charger_kw)
    n = DAYS * steps_per_day
    if n_ev == 0:
        return np.zeros((0, n), dtype=np.float32)
    dt_h = 24.0 / steps_per_day
    plug = rng.random((n_ev, DAYS)) < p.plug_in_prob
    arrival = np.clip(rng.normal(p.arrival_h_mean, p.arrival_h_sd, (n_ev, DAYS)), 14.0, 23.75)
    k = 1.0 / p.e_kwh_day_cv ** 2
    e_kwh = np.minimum(rng.gamma(k, p.e_kwh_day_mean / k, (n_ev, DAYS)), 60.0)
    kw = np.broadcast_to(np.asarray(charger_kw, dtype=float)[:, None], (n_ev, DAYS))
    dur_h = np.minimum(e_kwh / kw, 14.0)
    ev_i, day = np.nonzero(plug)
    start = (day * 24.0 + arrival[ev_i, day]) / dt_h  # in intervals
    end = start + dur_h[ev_i, day] / dt_h
    rate = kw[ev_i, day]
    width = n + int(np.ceil(14.0 / dt_h)) + 3
    cells = np.zeros(n_ev * width)
    steps = np.zeros(n_ev * width)
    for pos, sign in ((start, 1.0), (end, -1.0)):
        i0 = np.floor(pos).astype(np.int64)
        base = ev_i.astype(np.int64) * width
        cells += np.bincount(base + i0, sign * rate * (i0 + 1 - pos), minlength=n_ev * width)
        steps += np.bincount(base + i0 + 1, sign * rate, minlength=n_ev * width)
    out = (cells.reshape(n_ev, width) + np.cumsum(steps.reshape(n_ev, width), axis=1))
    tail = out[:, n:]
    out = out[:, :n]
    out[:, : tail.shape[1]] += tail
    return out.astype(np.float32)


# -- customers -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Customers:
    """Customers behind the feeder's loads and their device draws (one per technology).

    Arrays of length ``n`` (customers): ``load`` index of the load, ``peak_kw``,
    ``*_rank`` adoption ranks, ``hp_kw``/``pv_kw`` ratings [kW], ``hp_bin`` index into
    ``hp_balance_c``. ``ev_kw`` (n_ev_final, T) profiles of the ``n_ev_final`` customers that
    ever adopt an EV, row ``r`` for the customer with ``ev_rank == r``.
    """

    load: np.ndarray
    peak_kw: np.ndarray
    ev_rank: np.ndarray
    hp_rank: np.ndarray
    pv_rank: np.ndarray
    hp_kw: np.ndarray
    hp_bin: np.ndarray
    hp_balance_c: np.ndarray
    pv_kw: np.ndarray
    ev_kw: np.ndarray
    ev_charger_kw: np.ndarray

    @property
    def n(self) -> int:
        return len(self.load)


def draw_customers(load_p_kw: np.ndarray, sc: GrowthScenario) -> Customers:
    """Split loads into customers and draw their devices with the scenario's seed."""
    p = np.asarray(load_p_kw, dtype=float)
    n_per = np.where(p > 0, np.maximum(1, np.round(p / sc.customer_peak_kw)), 0).astype(int)
    load = np.repeat(np.arange(len(p)), n_per)
    peak = (p / np.maximum(n_per, 1))[load]
    n = len(load)
    rng = np.random.default_rng(sc.seed)
    ev_rank, hp_rank, pv_rank = (rng.permutation(n) for _ in range(3))
    hp_kw = rng.uniform(*sc.hp_params.size_per_peak, n) * peak
    bal = np.round(rng.normal(sc.hp_params.balance_c_mean, sc.hp_params.balance_c_sd, n) * 2) / 2
    bins, hp_bin = np.unique(bal, return_inverse=True)
    pv_kw = rng.uniform(*sc.pv_params.size_per_peak, n) * peak
    n_ev = int(sc.adopted("ev", n)[-1])
    ev = sc.ev_params
    charger = rng.choice(np.asarray(ev.charger_kw), size=n_ev, p=np.asarray(ev.charger_prob))
    ev_kw = ev_profiles_kw(charger, np.random.default_rng([sc.seed, 7]), ev, sc.steps_per_day)
    return Customers(load=load, peak_kw=peak, ev_rank=ev_rank, hp_rank=hp_rank,
                     pv_rank=pv_rank, hp_kw=hp_kw, hp_bin=hp_bin.astype(int),
                     hp_balance_c=bins, pv_kw=pv_kw, ev_kw=ev_kw, ev_charger_kw=charger)


@dataclass(frozen=True)
class ProfileSet:
    """Shapes on the study grid: ``load_shapes`` (T, 5) per unit of peak, ``temp_c`` (T,),
    ``hp_pu`` (T, B), ``pv_pu`` (T,), and ``new_kind`` (T, kinds) per unit of peak for new
    connections (column order :data:`PROFILE_KINDS`; ``pv`` is generation, subtracted)."""

    times: pd.DatetimeIndex
    load_shapes: np.ndarray
    temp_c: np.ndarray
    hp_pu: np.ndarray
    pv_pu: np.ndarray
    new_kind: np.ndarray


def build_profiles(sc: GrowthScenario, customers: Customers) -> ProfileSet:
    """All shapes of the scenario on the representative year (vectorised)."""
    times = sc.times_utc()
    shapes = load_shapes_at(times, sc.utc_offset_h)
    temp = _hourly_to_grid(tmy3_temperature_c(), sc.steps_per_day)
    hp = heat_pump_pu(temp, customers.hp_balance_c, sc.hp_params)
    pv = pv_pu(sc.steps_per_day)
    fleet_rng = np.random.default_rng([sc.seed, 11])
    ev = sc.ev_params
    fleet = ev_profiles_kw(fleet_rng.choice(np.asarray(ev.charger_kw), size=200,
                                            p=np.asarray(ev.charger_prob)),
                           fleet_rng, ev, sc.steps_per_day).sum(axis=0)
    mix = shapes.mean(axis=1)
    hp_mean = hp.mean(axis=1)
    kinds = {"flat": np.ones(len(times)), "load": mix / mix.max(),
             "ev": fleet / max(fleet.max(), 1e-9), "heat_pump": hp_mean / max(hp_mean.max(), 1e-9),
             "pv": -pv}
    return ProfileSet(times=times, load_shapes=shapes, temp_c=temp, hp_pu=hp, pv_pu=pv,
                      new_kind=np.column_stack([kinds[k] for k in PROFILE_KINDS]))


@dataclass(frozen=True)
class GrowthInputs:
    """Everything the screen needs, without an engine. Loads are the feeder's enabled loads
    with ``p_kw > 0`` followed by the new connections (``load.growth_<i>``)."""

    scenario: GrowthScenario
    model: FeederModel
    names: tuple[str, ...]  # engine names of the profiled loads
    bus: np.ndarray  # (n_ext,) bus name
    p_kw: np.ndarray  # (n_ext,) base kW of each engine load (existing: peak; new: p_kw)
    q_kvar: np.ndarray  # (n_existing,)
    shape: np.ndarray  # (n_existing,) bundled shape column per load
    customers: Customers
    profiles: ProfileSet
    n_existing: int

    def net_load_kw(self, year: int, rows=slice(None)) -> np.ndarray:
        """Net kW per load (n_ext, R) in year index ``year`` at interval ``rows`` (import +)."""
        sc, c, pr, n = self.scenario, self.customers, self.profiles, self.n_existing
        shapes = pr.load_shapes[rows]
        out = np.empty((len(self.names), shapes.shape[0]))
        out[:n] = (sc.growth_factor(year) * self.p_kw[:n])[:, None] * shapes[:, self.shape].T
        n_ev = int(sc.adopted("ev", c.n)[year])
        if n_ev:
            ev_load = c.load[np.argsort(c.ev_rank)[:n_ev]]
            m = sp.csr_matrix((np.ones(n_ev), (ev_load, np.arange(n_ev))), shape=(n, n_ev))
            out[:n] += m @ c.ev_kw[:n_ev, rows].astype(float)
        hp = c.hp_rank < sc.adopted("hp", c.n)[year]
        if hp.any():
            w = np.zeros((n, len(c.hp_balance_c)))
            np.add.at(w, (c.load[hp], c.hp_bin[hp]), c.hp_kw[hp])
            out[:n] += w @ pr.hp_pu[rows].T
        pv = c.pv_rank < sc.adopted("pv", c.n)[year]
        if pv.any():
            out[:n] -= np.bincount(c.load[pv], c.pv_kw[pv], minlength=n)[:, None] * \
                pr.pv_pu[rows][None, :]
        for i, nc in enumerate(sc.new_connections):
            on = year >= nc.year - sc.start_year
            out[n + i] = self.p_kw[n + i] * pr.new_kind[rows, PROFILE_KINDS.index(nc.profile)] \
                if on else 0.0
        return out

    def multipliers(self, year: int, rows) -> tuple[np.ndarray, np.ndarray]:
        """Engine load-shape multipliers (R, n_ext) of base kW and kvar (devices at pf 1)."""
        p = (self.net_load_kw(year, rows) / self.p_kw[:, None]).T
        q = p.copy()
        n = self.n_existing
        q[:, :n] = self.scenario.growth_factor(year) * self.profiles.load_shapes[rows][
            :, self.shape]
        return p, q


def prepare(model: FeederModel, scenario: GrowthScenario) -> GrowthInputs:
    """Customers, device draws and profiles of ``scenario`` on ``model`` (no engine)."""
    loads = [ld for ld in model.loads if ld.enabled and ld.p_kw > 0]
    if not loads:
        raise InputError(f"feeder {model.name} has no enabled loads with kW > 0 to grow")
    for i, nc in enumerate(scenario.new_connections):
        if nc.bus.lower() not in model.bus_index:
            raise InputError(f"GrowthScenario.new_connections[{i}].bus = {nc.bus!r}: not a bus "
                             f"of feeder {model.name}")
    p_kw = np.array([ld.p_kw for ld in loads])
    customers = draw_customers(p_kw, scenario)
    profiles = build_profiles(scenario, customers)
    shape = np.random.default_rng([scenario.seed, 3]).integers(
        0, profiles.load_shapes.shape[1], len(loads))
    new = scenario.new_connections
    return GrowthInputs(
        scenario=scenario, model=model,
        names=tuple(ld.name for ld in loads) + tuple(f"load.growth_{i}" for i in range(len(new))),
        bus=np.array([ld.bus for ld in loads] + [nc.bus.lower() for nc in new], dtype=object),
        p_kw=np.concatenate([p_kw, [nc.p_kw for nc in new]]),
        q_kvar=np.array([ld.q_kvar for ld in loads]), shape=shape, customers=customers,
        profiles=profiles, n_existing=len(loads))
