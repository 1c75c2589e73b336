"""Inputs of the state estimator: the measurement snapshot and its checks.

:class:`Measurements` is what a caller hands :func:`derms.analysis.state_estimation.
estimate_state`; the ``check_*`` functions validate it against the compiled feeder and
return the vectorised arrays the estimator works on, raising :class:`InputError` (bad
values, shapes, sigmas) or :class:`ModelError` (unknown nodes or loads) that name the
field and the first offending entry.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from derms.analysis.se_jacobian import activate_source
from derms.analysis.se_prior import PRIOR_SD_LOG_BETA
from derms.errors import InputError
from derms.naming import require_known

#: Pseudo-measurement sigma when a caller gives none: a fraction of |value|, with a floor
#: [kW or kvar]. See "Pseudo-measurement uncertainty" in derms.analysis.state_estimation.
DEFAULT_PSEUDO_SIGMA_FRAC = 0.3
DEFAULT_PSEUDO_SIGMA_MIN = 0.1



@dataclass(frozen=True)
class Measurements:
    """One snapshot of telemetry for a feeder (vectorised; all arrays 1-D).

    Voltages: ``v_nodes`` ("bus.node", case-insensitive), ``v_pu`` [pu of each bus's base],
    ``v_sigma_pu`` [pu]. Head: ``head_p_kw``/``head_q_kvar`` per phase of the Vsource
    (import into the feeder positive) with ``head_p_sigma_kw``/``head_q_sigma_kvar``, or
    ``None``. Pseudo-measurements: ``load_names`` (OpenDSS load names, with or without
    ``load.``), ``load_p_kw``/``load_q_kvar`` (consumption positive, the loads' kW/kvar
    properties) with ``load_p_sigma_kw``/``load_q_sigma_kvar``; these loads are the state.
    A pseudo sigma left ``None`` is ``DEFAULT_PSEUDO_SIGMA_FRAC`` x |value|, at least
    ``DEFAULT_PSEUDO_SIGMA_MIN`` (kW or kvar); give your profiles' own uncertainty instead
    where you know it (see derms.analysis.state_estimation, "Pseudo-measurement
    uncertainty": the estimator calibrates the scale of these sigmas by default).

    AMI power (optional): ``ami_p_loads`` name estimated loads (a subset of ``load_names``)
    whose meter reports active power ``ami_p_kw`` [kW, consumption positive: interval
    energy / interval length, the power the load draws, ``LoadMult`` and voltage law
    included] with standard deviation ``ami_p_sigma_kw``; likewise ``ami_q_loads``,
    ``ami_q_kvar``, ``ami_q_sigma_kvar`` for meters that report reactive power. The sigma
    should cover the meter class *and* the mismatch between an interval average and the
    instant being estimated.

    ``telemetry_loads`` name estimated loads whose pseudo values are telemetry, not
    profiles (e.g. a DER's measured output): ``prior_scale`` leaves their sigmas as given.
    """

    v_nodes: Sequence[str]
    v_pu: np.ndarray
    v_sigma_pu: np.ndarray
    load_names: Sequence[str]
    load_p_kw: np.ndarray
    load_q_kvar: np.ndarray
    load_p_sigma_kw: np.ndarray | None = None
    load_q_sigma_kvar: np.ndarray | None = None
    head_p_kw: np.ndarray | None = None
    head_q_kvar: np.ndarray | None = None
    head_p_sigma_kw: np.ndarray | None = None
    head_q_sigma_kvar: np.ndarray | None = None
    ami_p_loads: Sequence[str] = ()
    ami_p_kw: np.ndarray | None = None
    ami_p_sigma_kw: np.ndarray | None = None
    ami_q_loads: Sequence[str] = ()
    ami_q_kvar: np.ndarray | None = None
    ami_q_sigma_kvar: np.ndarray | None = None
    telemetry_loads: Sequence[str] = ()


def _arr(name: str, v, size: int | None = None) -> np.ndarray:
    a = np.asarray(v, dtype=float).ravel()
    if size is not None and a.size != size:
        raise InputError(f"{name} has {a.size} values, expected {size}")
    if not np.isfinite(a).all():
        bad = int(np.flatnonzero(~np.isfinite(a))[0])
        raise InputError(f"{name}[{bad}] is not finite ({a[bad]})")
    return a


def _sigma(name: str, v, size: int) -> np.ndarray:
    a = _arr(name, v, size)
    if (a <= 0).any():
        bad = int(np.flatnonzero(a <= 0)[0])
        raise InputError(f"{name}[{bad}] = {a[bad]} must be a positive standard deviation")
    return a


def check_voltages(meas: Measurements, pos: dict) -> tuple[list[str], np.ndarray, np.ndarray]:
    nodes = require_known(meas.v_nodes, pos, kind="meter node", field="v_nodes",
                          hint=" (expected 'bus.node')")
    return nodes, _arr("v_pu", meas.v_pu, len(nodes)), _sigma("v_sigma_pu", meas.v_sigma_pu,
                                                              len(nodes))


def check_loads(engine, meas: Measurements):
    all_loads = [s.lower() for s in engine.circuit.Loads.AllNames]
    if all_loads == ["none"]:
        all_loads = []
    at = {s: i + 1 for i, s in enumerate(all_loads)}
    names = require_known((str(s).strip().lower().removeprefix("load.")
                           for s in meas.load_names), at, kind="load", field="load_names")
    k = len(names)
    xp = np.r_[_arr("load_p_kw", meas.load_p_kw, k), _arr("load_q_kvar", meas.load_q_kvar, k)]
    sp_ = np.r_[_pseudo_sigma("load_p_sigma_kw", meas.load_p_sigma_kw, xp[:k]),
                _pseudo_sigma("load_q_sigma_kvar", meas.load_q_sigma_kvar, xp[k:])]
    idx = np.fromiter((at[s] for s in names), dtype=np.int64, count=k)
    return np.asarray(names, dtype=object), xp, sp_, idx


def check_scale(prior_scale) -> bool:
    """True for ``"auto"``; otherwise a finite positive number (not a bool) or InputError."""
    bad = InputError(f"prior_scale = {prior_scale!r}: expected 'auto' or a positive number")
    if isinstance(prior_scale, str):
        if prior_scale.strip().lower() == "auto":
            return True
        raise bad
    if isinstance(prior_scale, bool):
        raise bad
    try:
        v = float(prior_scale)
    except (TypeError, ValueError):
        raise bad from None
    if not np.isfinite(v) or v <= 0:
        raise bad
    return False


def telemetry_states(meas: Measurements, lnames: np.ndarray) -> np.ndarray:
    """(2k,) True for the P and Q states of ``meas.telemetry_loads``."""
    k = lnames.size
    out = np.zeros(2 * k, dtype=bool)
    names = [str(x).strip().lower().removeprefix("load.") for x in meas.telemetry_loads or ()]
    if not names:
        return out
    col = {s: j for j, s in enumerate(lnames)}
    missing = [x for x in names if x not in col]
    if missing:
        raise InputError(f"telemetry_loads: load {missing[0]!r} is not an estimated load "
                         "(not in load_names)")
    idx = np.fromiter((col[x] for x in names), dtype=np.int64, count=len(names))
    out[idx] = out[idx + k] = True
    return out


def check_log_scale(v) -> tuple[float, float]:
    """``(mean, sd)`` of log beta: the default, or finite with a positive sd."""
    if v is None:
        return 0.0, PRIOR_SD_LOG_BETA
    try:
        mean, sd = (float(x) for x in v)
    except (TypeError, ValueError):
        raise InputError(f"prior_log_scale = {v!r}: expected (mean, sd)") from None
    if not (np.isfinite(mean) and np.isfinite(sd) and sd > 0):
        raise InputError(f"prior_log_scale = {v!r}: mean must be finite, sd positive")
    return mean, sd


def _pseudo_sigma(name: str, v, x: np.ndarray) -> np.ndarray:
    if v is None:
        return np.maximum(DEFAULT_PSEUDO_SIGMA_FRAC * np.abs(x), DEFAULT_PSEUDO_SIGMA_MIN)
    return _sigma(name, v, x.size)


def check_ami(engine, meas: Measurements, lnames: np.ndarray):
    """AMI power rows: (state columns, values, sigmas, labels); P columns then Q columns."""
    k = lnames.size
    col = {s: j for j, s in enumerate(lnames)}
    all_loads = {s.lower() for s in engine.circuit.Loads.AllNames}
    out = [], [], [], []
    for kind, names, z, s, off, unit in (
            ("p", meas.ami_p_loads, meas.ami_p_kw, meas.ami_p_sigma_kw, 0, "kw"),
            ("q", meas.ami_q_loads, meas.ami_q_kvar, meas.ami_q_sigma_kvar, k, "kvar")):
        names = [] if names is None else list(names)
        if not names:
            if z is not None and np.asarray(z).size:
                raise InputError(f"ami_{kind}_{unit} given without ami_{kind}_loads")
            continue
        if z is None or s is None:
            raise InputError(f"ami_{kind}_loads needs ami_{kind}_{unit} and its sigma")
        names = require_known((str(x).strip().lower().removeprefix("load.") for x in names),
                              all_loads, kind="load", field=f"ami_{kind}_loads")
        missing = [x for x in names if x not in col]
        if missing:
            raise InputError(f"ami_{kind}_loads: load {missing[0]!r} is not an estimated load "
                             "(not in load_names)")
        out[0].append(np.fromiter((col[x] + off for x in names), np.int64, len(names)))
        out[1].append(_arr(f"ami_{kind}_{unit}", z, len(names)))
        out[2].append(_sigma(f"ami_{kind}_sigma_{unit}", s, len(names)))
        out[3].extend(f"ami_{kind}:{x}" for x in names)
    if not out[0]:
        return np.zeros(0, np.int64), np.zeros(0), np.zeros(0), []
    return np.concatenate(out[0]), np.concatenate(out[1]), np.concatenate(out[2]), out[3]


def check_head(engine, meas: Measurements) -> tuple[np.ndarray, np.ndarray, int]:
    given = [meas.head_p_kw is not None, meas.head_q_kvar is not None,
             meas.head_p_sigma_kw is not None, meas.head_q_sigma_kvar is not None]
    if not any(given):
        return np.zeros(0), np.zeros(0), 0
    if not all(given):
        raise InputError("head_p_kw, head_q_kvar and their sigmas go together")
    ckt = engine.circuit
    activate_source(ckt)
    nph = int(ckt.ActiveCktElement.NumPhases)
    z = np.r_[_arr("head_p_kw", meas.head_p_kw, nph), _arr("head_q_kvar", meas.head_q_kvar, nph)]
    s = np.r_[_sigma("head_p_sigma_kw", meas.head_p_sigma_kw, nph),
              _sigma("head_q_sigma_kvar", meas.head_q_sigma_kvar, nph)]
    return z, s, nph


__all__ = ["DEFAULT_PSEUDO_SIGMA_FRAC", "DEFAULT_PSEUDO_SIGMA_MIN", "Measurements", "check_ami",
           "check_head", "check_loads", "check_log_scale", "check_scale", "check_voltages",
           "telemetry_states"]
