"""Read a compiled OpenDSS circuit into the engine-independent :class:`FeederModel`.

The importer takes a dss-python context (``DSS.NewContext()``) whose circuit is compiled;
it reads, never modifies, the circuit. OpenDSS names and units are translated here once:
lengths to km, names to lower case, loads to consumption-positive kW.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import dijkstra

from derms.errors import ModelError
from derms.grid.model import (
    Bus,
    Capacitor,
    FeederHead,
    FeederModel,
    Generator,
    Line,
    Load,
    PVSystem,
    Regulator,
    Storage,
    Switch,
    Transformer,
)

# OpenDSS length units code -> km (0 = "none": lengths taken as km and noted)
_KM_PER_UNIT = {0: 1.0, 1: 1.609344, 2: 0.3048, 3: 1.0, 4: 1e-3, 5: 0.3048e-3, 6: 0.0254e-3,
                7: 1e-5, 8: 1e-6}
_DEFAULT_NORM_A, _DEFAULT_EMERG_A = 400.0, 600.0


def _iterate(c, collection, cls: str) -> Iterator[None]:
    """Make each element of class ``cls`` active in turn, disabled ones included
    (the engine's First/Next iterators skip disabled elements)."""
    prefix = cls + "."
    for full in c.AllElementNames:
        if full.lower().startswith(prefix):
            collection.Name = full.split(".", 1)[1]
            yield None


def _bus_and_nodes(spec: str, default_nodes: tuple[int, ...]) -> tuple[str, tuple[int, ...]]:
    name, *nodes = spec.lower().split(".")
    return name, tuple(int(n) for n in nodes) if nodes else default_nodes


def _prop(ctx, name: str) -> str:
    return ctx.ActiveCircuit.ActiveDSSElement.Properties(name).Val


def _fprop(ctx, name: str, default: float = 0.0) -> float:
    try:
        return float(_prop(ctx, name))
    except (ValueError, TypeError):
        return default


def read_feeder(ctx, source_file: Path) -> FeederModel:
    """Build a :class:`FeederModel` from the compiled circuit of dss-python context ``ctx``."""
    c = ctx.ActiveCircuit
    if c is None or ctx.NumCircuits == 0:
        raise ModelError(f"{source_file}: no circuit is compiled")
    notes: list[str] = []
    ckt = c.ActiveCktElement

    def terminals() -> list[tuple[str, tuple[int, ...]]]:
        nphase = ckt.NumPhases
        default = tuple(range(1, nphase + 1))
        return [_bus_and_nodes(b, default) for b in ckt.BusNames]

    lines = _read_lines(c, ckt, terminals, notes)
    transformers, regulated = _read_transformers(c, ckt, terminals)
    regulators = _read_regulators(c)
    transformers = tuple(
        t if t.name.split(".", 1)[1] not in regulated else _replace_regulated(t)
        for t in transformers
    )
    head = _read_head(ctx, c, ckt)
    model = FeederModel(
        name=c.Name.lower(),
        source_file=source_file,
        head=head,
        buses=_read_buses(c, head.bus),
        lines=lines,
        transformers=transformers,
        regulators=regulators,
        capacitors=_read_capacitors(c, ckt, terminals),
        switches=_read_switches(c, ckt, lines),
        loads=_read_loads(ctx, c, ckt, terminals),
        pv_systems=_read_pv(ctx, c, ckt, terminals),
        storage=_read_storage(ctx, c, ckt, terminals),
        generators=_read_generators(c, ckt, terminals),
        n_nodes=c.NumNodes,
        notes=tuple(notes),
    )
    return model


def _replace_regulated(t: Transformer) -> Transformer:
    from dataclasses import replace

    return replace(t, regulated=True)


def _read_lines(c, ckt, terminals: Callable, notes: list[str]) -> tuple[Line, ...]:
    out = []
    n_default = 0
    unitless = False
    for _ in _iterate(c, c.Lines, "line"):
        (b1, n1), (b2, n2) = terminals()
        unitless |= c.Lines.Units == 0 and not c.Lines.IsSwitch
        norm, emerg = c.Lines.NormAmps, c.Lines.EmergAmps
        is_default = norm == _DEFAULT_NORM_A and emerg == _DEFAULT_EMERG_A
        n_default += is_default
        out.append(Line(
            name=f"line.{c.Lines.Name.lower()}", bus1=b1, bus2=b2, nodes1=n1, nodes2=n2,
            phases=c.Lines.Phases, length_km=_length_km(c.Lines),
            norm_amps=norm, emerg_amps=emerg, rating_is_default=is_default,
            is_switch=bool(c.Lines.IsSwitch), enabled=bool(ckt.Enabled),
        ))
    if n_default:
        notes.append(f"{n_default} of {len(out)} lines carry OpenDSS's default rating "
                     f"({_DEFAULT_NORM_A:.0f} A normal, {_DEFAULT_EMERG_A:.0f} A emergency)")
    if unitless:
        notes.append("some line lengths have no units in the model; they are taken as km")
    return tuple(out)


def _length_km(lines) -> float:
    """Active line's length [km]; a switch with no length units counts as 0 km."""
    units = lines.Units
    if units == 0 and lines.IsSwitch:
        return 0.0
    return lines.Length * _KM_PER_UNIT.get(units, 1.0)


def _read_transformers(c, ckt, terminals: Callable) -> tuple[tuple[Transformer, ...], set[str]]:
    out = []
    tr = c.Transformers
    for _ in _iterate(c, tr, "transformer"):
        buses = [b for b, _n in terminals()]
        kv, conns, taps = [], [], []
        for w in range(1, tr.NumWindings + 1):
            tr.Wdg = w
            kv.append(tr.kV)
            conns.append("delta" if tr.IsDelta else "wye")
            taps.append(tr.Tap)
        tr.Wdg = 1
        out.append(Transformer(
            name=f"transformer.{tr.Name.lower()}", phases=ckt.NumPhases, kva=tr.kVA,
            buses=tuple(buses), kv=tuple(kv), conns=tuple(conns), taps_pu=tuple(taps),
            norm_amps=ckt.NormalAmps, emerg_amps=ckt.EmergAmps, regulated=False,
        ))
    regulated = set()
    for _ in _iterate(c, c.RegControls, "regcontrol"):
        regulated.add(c.RegControls.Transformer.lower())
    return tuple(out), regulated


def _read_regulators(c) -> tuple[Regulator, ...]:
    out = []
    rc, tr = c.RegControls, c.Transformers
    for _ in _iterate(c, rc, "regcontrol"):
        name, xf, wdg = rc.Name.lower(), rc.Transformer.lower(), rc.Winding
        vreg, band, ptr = rc.ForwardVreg, rc.ForwardBand, rc.PTratio
        tr.Name = xf
        tr.Wdg = wdg
        out.append(Regulator(
            name=f"regcontrol.{name}", transformer=f"transformer.{xf}", winding=wdg,
            vreg_v=vreg, band_v=band, pt_ratio=ptr, tap_pu=tr.Tap, min_tap_pu=tr.MinTap,
            max_tap_pu=tr.MaxTap, num_taps=tr.NumTaps,
        ))
    return tuple(out)


def _read_capacitors(c, ckt, terminals: Callable) -> tuple[Capacitor, ...]:
    controllers: dict[str, str] = {}
    for _ in _iterate(c, c.CapControls, "capcontrol"):
        controllers[c.CapControls.Capacitor.lower()] = f"capcontrol.{c.CapControls.Name.lower()}"
    out = []
    for _ in _iterate(c, c.Capacitors, "capacitor"):
        name = c.Capacitors.Name.lower()
        out.append(Capacitor(
            name=f"capacitor.{name}", bus=terminals()[0][0], phases=ckt.NumPhases,
            kvar=c.Capacitors.kvar, kv=c.Capacitors.kV,
            states=tuple(int(s) for s in c.Capacitors.States), controller=controllers.get(name),
        ))
    return tuple(out)


def _read_switches(c, ckt, lines: tuple[Line, ...]) -> tuple[Switch, ...]:
    controlled: dict[str, tuple[str, bool]] = {}
    for _ in _iterate(c, c.SwtControls, "swtcontrol"):
        sc = c.SwtControls
        normal_closed = int(sc.NormalState) == 2  # 1 = open, 2 = closed
        controlled[sc.SwitchedObj.lower()] = (f"swtcontrol.{sc.Name.lower()}", normal_closed)
    out = []
    by_name = {ln.name: ln for ln in lines}
    for elem in sorted({ln.name for ln in lines if ln.is_switch} | set(controlled)):
        c.SetActiveElement(elem)
        closed = not any(ckt.IsOpen(t, 0) for t in (1, 2))
        name, normal = controlled.get(elem, (elem, closed))
        line = by_name.get(elem)
        b1, b2 = (line.bus1, line.bus2) if line else (
            *(b.split(".")[0].lower() for b in ckt.BusNames[:2]),)
        out.append(Switch(name=name, element=elem, bus1=b1, bus2=b2, closed=closed,
                          normally_closed=normal))
    return tuple(out)


def _read_loads(ctx, c, ckt, terminals: Callable) -> tuple[Load, ...]:
    out = []
    ld = c.Loads
    for _ in _iterate(c, ld, "load"):
        bus, _nodes = terminals()[0]
        out.append(Load(
            name=f"load.{ld.Name.lower()}", bus=bus, nodes=tuple(ckt.NodeOrder[: ckt.NumConductors]),
            phases=ld.Phases, conn="delta" if ld.IsDelta else "wye", kv=ld.kV, p_kw=ld.kW,
            q_kvar=ld.kvar, model=ld.Model, yearly=ld.Yearly.lower(), daily=ld.daily.lower(),
            enabled=bool(ckt.Enabled),
        ))
    return tuple(out)


def _read_pv(ctx, c, ckt, terminals: Callable) -> tuple[PVSystem, ...]:
    out = []
    pv = c.PVSystems
    for _ in _iterate(c, pv, "pvsystem"):
        out.append(PVSystem(
            name=f"pvsystem.{pv.Name.lower()}", bus=terminals()[0][0],
            nodes=tuple(ckt.NodeOrder[: ckt.NumConductors]), phases=ckt.NumPhases,
            kv=_fprop(ctx, "kV"), kva=pv.kVArated, pmpp_kw=pv.Pmpp,
            irradiance_kw_m2=pv.Irradiance, enabled=bool(ckt.Enabled),
        ))
    return tuple(out)


def _read_storage(ctx, c, ckt, terminals: Callable) -> tuple[Storage, ...]:
    out = []
    st = c.Storages
    for _ in _iterate(c, st, "storage"):
        out.append(Storage(
            name=f"storage.{st.Name.lower()}", bus=terminals()[0][0],
            nodes=tuple(ckt.NodeOrder[: ckt.NumConductors]), phases=ckt.NumPhases,
            kv=_fprop(ctx, "kV"), kw_rated=_fprop(ctx, "kWrated"),
            kwh_rated=_fprop(ctx, "kWhrated"), kva=_fprop(ctx, "kVA"),
            kwh_stored=_fprop(ctx, "kWhstored"), enabled=bool(ckt.Enabled),
        ))
    return tuple(out)


def _read_generators(c, ckt, terminals: Callable) -> tuple[Generator, ...]:
    out = []
    g = c.Generators
    for _ in _iterate(c, g, "generator"):
        out.append(Generator(
            name=f"generator.{g.Name.lower()}", bus=terminals()[0][0],
            nodes=tuple(ckt.NodeOrder[: ckt.NumConductors]), phases=g.Phases, kv=g.kV,
            p_gen_kw=g.kW, q_kvar=g.kvar, enabled=bool(ckt.Enabled),
        ))
    return tuple(out)


def _read_head(ctx, c, ckt) -> FeederHead:
    vs = c.Vsources
    if vs.First <= 0:
        raise ModelError(f"circuit {c.Name}: no Vsource (feeder head) defined")
    bus = ckt.BusNames[0].split(".")[0].lower()
    return FeederHead(
        source=f"vsource.{vs.Name.lower()}", bus=bus, base_kv_ll=vs.BasekV, v_pu=vs.pu,
        angle_deg=vs.AngleDeg, frequency_hz=vs.Frequency,
    )


def _read_buses(c, head_bus: str) -> tuple[Bus, ...]:
    names = [b.lower() for b in c.AllBusNames]
    index = {b: i for i, b in enumerate(names)}
    dist = _distances_km(c, index, head_bus)
    out = []
    for i, name in enumerate(names):
        c.SetActiveBusi(i)
        bus = c.ActiveBus
        has_xy = bool(bus.Coorddefined)
        out.append(Bus(
            name=name, nodes=tuple(int(n) for n in bus.Nodes), kv_base_ln=bus.kVBase,
            x=bus.x if has_xy else None, y=bus.y if has_xy else None,
            distance_km=float(dist[i]),
        ))
    return tuple(out)


def _distances_km(c, index: dict[str, int], head_bus: str) -> np.ndarray:
    """Shortest path from the head bus over all series (two-terminal) PD elements [km]."""
    rows, cols, w = [], [], []
    pd_el = c.PDElements
    ckt = c.ActiveCktElement
    line_len = {}
    for _ in _iterate(c, c.Lines, "line"):
        line_len[c.Lines.Name.lower()] = _length_km(c.Lines)
    idx = pd_el.First  # enabled elements only: disabled ones connect nothing
    while idx > 0:
        _add_edge(ckt, index, line_len, rows, cols, w)
        idx = pd_el.Next


    n = len(index)
    graph = sp.coo_matrix((w, (rows, cols)), shape=(n, n)).tocsr()
    if head_bus not in index:
        return np.full(n, np.nan)
    d = dijkstra(graph, directed=False, indices=index[head_bus])
    d[np.isinf(d)] = np.nan
    return np.where(d < 1e-6, 0.0, d)


def _add_edge(ckt, index, line_len, rows, cols, w) -> None:
    buses = [b.split(".")[0].lower() for b in ckt.BusNames]
    if len(buses) < 2 or ckt.IsOpen(1, 0) or ckt.IsOpen(2, 0):
        return
    name = ckt.Name.lower()
    length = line_len.get(name.split(".", 1)[1], 0.0) if name.startswith("line.") else 0.0
    for other in buses[1:]:
        if buses[0] in index and other in index and other != buses[0]:
            rows.append(index[buses[0]])
            cols.append(index[other])
            w.append(max(length, 1e-9))  # zero weights would be dropped by csgraph


def element_summary(ctx) -> dict[str, Any]:
    """Counts per element class and total load straight from the engine (for checks)."""
    c = ctx.ActiveCircuit
    counts: dict[str, int] = {}
    for name in c.AllElementNames:
        cls = name.split(".", 1)[0].lower()
        counts[cls] = counts.get(cls, 0) + 1
    return {"counts": counts, "n_buses": c.NumBuses, "n_nodes": c.NumNodes}
