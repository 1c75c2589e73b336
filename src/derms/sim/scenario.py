"""Scripted events of a simulation, read from a JSON file and validated with pydantic.

Times are seconds of simulated time since the start of the run (``t_s``). Example::

    {"events": [
      {"kind": "cloud", "points": [[0, 1.0], [600, 0.2], [1800, 0.2], [2400, 1.0]]},
      {"kind": "heat_wave", "points": [[0, 1.0], [3600, 1.4]]},
      {"kind": "overload", "bus": "67", "kw": 900, "start_s": 1200, "end_s": 2400},
      {"kind": "dropout", "share": 0.1, "start_s": 600},
      {"kind": "comm_loss", "devices": ["pv-1", "battery-2"], "start_s": 300, "end_s": 900},
      {"kind": "switch", "element": "line.sw1", "closed": false, "at_s": 3000}
    ]}

* ``cloud``: PV irradiance multiplier vs time (piecewise linear, held beyond the ends);
  several cloud events multiply.
* ``heat_wave``: customer load multiplier vs time (same form; multiply).
* ``overload``: extra load ``kw`` at ``bus`` over ``[start_s, end_s)`` (unity power factor).
* ``dropout``: devices stop producing and answering over ``[start_s, end_s)`` (``end_s``
  omitted: for good).
* ``comm_loss``: devices keep running but their agents stop talking to the server.
* ``switch``: open or close a switching element at ``at_s`` in the twin (the hook for ADMS
  switching; the DERMS is not told here — its ADMS interface is).

Devices are named by ``devices`` (ids), or drawn with the run's seed by ``share`` (a
fraction of the fleet, optionally only of ``kinds``). Invalid files raise
:class:`~derms.errors.InputError` naming the field (``events[2].points``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from derms.errors import InputError

KindName = Literal["pv", "battery", "ev", "flex"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Curve(_Strict):
    points: list[tuple[float, float]] = Field(min_length=1)

    @field_validator("points")
    @classmethod
    def _increasing(cls, points):
        t = [p[0] for p in points]
        if any(b <= a for a, b in zip(t, t[1:], strict=False)):
            raise ValueError("times must increase")
        if any(not (np.isfinite(m) and m >= 0) for _, m in points):
            raise ValueError("multipliers must be finite and >= 0")
        return points

    def at(self, t_s: float) -> float:
        t, m = zip(*self.points, strict=True)
        return float(np.interp(t_s, t, m))


class CloudEvent(_Curve):
    kind: Literal["cloud"]


class HeatWaveEvent(_Curve):
    kind: Literal["heat_wave"]


class _Window(_Strict):
    start_s: float = Field(ge=0)
    end_s: float | None = None

    @field_validator("end_s")
    @classmethod
    def _ordered(cls, end_s, info: ValidationInfo):
        start = info.data.get("start_s")
        if end_s is not None and start is not None and end_s <= start:
            raise ValueError(f"must be after start_s ({start:g})")
        return end_s

    def on(self, t_s: float) -> bool:
        return self.start_s <= t_s and (self.end_s is None or t_s < self.end_s)


class OverloadEvent(_Window):
    kind: Literal["overload"]
    bus: str = Field(min_length=1)
    kw: float = Field(gt=0, le=1e5)


class _DeviceEvent(_Window):
    devices: list[str] | None = None
    share: float | None = Field(None, gt=0, le=1)
    kinds: list[KindName] | None = None

    @model_validator(mode="after")
    def _one_selection(self):
        if (self.devices is None) == (self.share is None):
            raise ValueError("give either devices (a list of ids) or share (0-1)")
        return self


class DropoutEvent(_DeviceEvent):
    kind: Literal["dropout"]


class CommLossEvent(_DeviceEvent):
    kind: Literal["comm_loss"]


class SwitchEvent(_Strict):
    kind: Literal["switch"]
    element: str = Field(min_length=3, pattern=r"^[A-Za-z]+\.[^\s]+$")
    closed: bool
    at_s: float = Field(ge=0)


Event = Annotated[CloudEvent | HeatWaveEvent | OverloadEvent | DropoutEvent | CommLossEvent
                  | SwitchEvent, Field(discriminator="kind")]


class Scenario(_Strict):
    """A list of events (see module docstring)."""

    description: str = ""
    events: list[Event] = Field(default_factory=list)

    @property
    def overload_buses(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(e.bus.lower() for e in self.events
                                   if isinstance(e, OverloadEvent)))


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate a scenario file; InputError naming the file and field."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise InputError(f"scenario {path}: cannot be read ({exc.strerror})") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"scenario {path}: not JSON (line {exc.lineno}: {exc.msg})") from None
    return parse_scenario(data, str(path))


def parse_scenario(data: object, name: str = "scenario") -> Scenario:
    try:
        return Scenario.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = _loc(err["loc"])
        if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
            loc += ".kind"
        msg = str(err["msg"]).removeprefix("Value error, ")
        raise InputError(f"{name}: {loc}: {msg}"
                         + (f" ({len(exc.errors())} errors)" if len(exc.errors()) > 1 else "")
                         ) from None


def _loc(parts) -> str:
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif p in ("cloud", "heat_wave", "overload", "dropout", "comm_loss", "switch"):
            continue  # the discriminator's tag adds nothing
        else:
            out += f".{p}" if out else str(p)
    return out or "(document)"


class Timeline:
    """A scenario bound to a fleet: the multipliers, extra loads and device masks at each
    simulated second (arrays over the fleet's device order)."""

    def __init__(self, scenario: Scenario, der_ids: np.ndarray, kinds: np.ndarray,
                 seed: int = 0) -> None:
        self.scenario = scenario
        self.n = len(der_ids)
        pos = {d: i for i, d in enumerate(der_ids)}
        rng = np.random.default_rng(seed + 1009)
        from derms.sim.fleet import KINDS
        self._masks: list[tuple[_DeviceEvent, np.ndarray]] = []
        for k, ev in enumerate(scenario.events):
            if not isinstance(ev, _DeviceEvent):
                continue
            mask = np.zeros(self.n, bool)
            if ev.devices is not None:
                missing = [d for d in ev.devices if d not in pos]
                if missing:
                    raise InputError(f"scenario: events[{k}].devices: unknown device "
                                     f"{missing[0]!r}")
                mask[[pos[d] for d in ev.devices]] = True
            else:
                pool = np.arange(self.n)
                if ev.kinds is not None:
                    pool = pool[np.isin(kinds, [KINDS.index(x) for x in ev.kinds])]
                take = int(round(ev.share * len(pool)))
                mask[rng.choice(pool, size=take, replace=False)] = True
            self._masks.append((ev, mask))
        self._buses = scenario.overload_buses
        self._switch_done: set[int] = set()

    def cloud(self, t_s: float) -> float:
        return float(np.prod([e.at(t_s) for e in self.scenario.events
                              if isinstance(e, CloudEvent)] or [1.0]))

    def load_multiplier(self, t_s: float) -> float:
        return float(np.prod([e.at(t_s) for e in self.scenario.events
                              if isinstance(e, HeatWaveEvent)] or [1.0]))

    def overload_kw(self, t_s: float) -> np.ndarray:
        out = np.zeros(len(self._buses))
        for e in self.scenario.events:
            if isinstance(e, OverloadEvent) and e.on(t_s):
                out[self._buses.index(e.bus.lower())] += e.kw
        return out

    def _mask(self, cls, t_s: float) -> np.ndarray:
        out = np.zeros(self.n, bool)
        for ev, mask in self._masks:
            if isinstance(ev, cls) and ev.on(t_s):
                out |= mask
        return out

    def dropped(self, t_s: float) -> np.ndarray:
        return self._mask(DropoutEvent, t_s)

    def comm_lost(self, t_s: float) -> np.ndarray:
        return self._mask(CommLossEvent, t_s)

    def switching_due(self, t_s: float) -> list[SwitchEvent]:
        """Switch events whose time has come and that were not returned before."""
        due = []
        for k, e in enumerate(self.scenario.events):
            if isinstance(e, SwitchEvent) and e.at_s <= t_s and k not in self._switch_done:
                self._switch_done.add(k)
                due.append(e)
        return due
