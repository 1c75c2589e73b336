"""What a registered feeder model has, for checking names users give against it: its buses
with their nodes and its transformers (names lower case, as OpenDSS reports them).

Built once when a model version is registered (from the compiled engine, in the model
check's child process) and stored with the version as JSON (:meth:`ModelElements.to_json`),
so that registering a device or meter never compiles the model.

Accepted forms (the ones the rest of derms reads):

* **bus**: ``"671"`` or with node suffixes ``"671.1"``, ``"671.1.2"`` (the bus is the part
  before the first dot, as :func:`derms.control.requests.normalise_bus` and the hosting
  sites read it); every node given must be a node of that bus (``0``, ground, always is).
* **phase** (``a``/``b``/``c``/``ab``/``bc``/``ca``/``abc``, nodes 1/2/3): at least one of
  its nodes must be at the bus. The control loop and the monitor use the phase's nodes
  the bus has and skip a device or meter with none of them (a three-phase default on a
  one-phase bus takes that one phase).
* **service transformer**: ``"t1"`` or ``"transformer.t1"``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

PHASE_NODES = {"a": 1, "b": 2, "c": 3}


def bus_of(spec: str) -> str:
    """The bus part of a bus spec (``" 671.1.2 "`` -> ``"671"``), lower case."""
    return spec.strip().lower().split(".", 1)[0]


@dataclass(frozen=True)
class ModelElements:
    """Buses (name -> its node numbers) and transformer names of one feeder model."""

    buses: Mapping[str, frozenset[int]]
    transformers: frozenset[str]

    @classmethod
    def from_names(cls, node_names: Iterable[str], transformers: Iterable[str] = ()
                   ) -> ModelElements:
        """From the engine's node names ("bus.node") and transformer names."""
        buses: dict[str, set[int]] = {}
        for name in node_names:
            bus, _, node = name.strip().lower().rpartition(".")
            if not bus:  # a node name without its number: the bus alone
                bus, node = node, ""
            buses.setdefault(bus, set())
            if node.isdigit():
                buses[bus].add(int(node))
        names = [t.strip().lower() for t in transformers]
        if names == ["none"]:  # OpenDSS's AllNames of an empty collection
            names = []
        return cls({b: frozenset(n) for b, n in buses.items()}, frozenset(names))

    def to_json(self) -> dict[str, Any]:
        return {"buses": {b: sorted(n) for b, n in sorted(self.buses.items())},
                "transformers": sorted(self.transformers)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ModelElements:
        return cls({str(b).lower(): frozenset(int(x) for x in n)
                    for b, n in (data.get("buses") or {}).items()},
                   frozenset(str(t).lower() for t in data.get("transformers") or ()))

    # -- checks: None when the value is fine, else why not (the value named) -------------
    def bus_problem(self, spec: str) -> str | None:
        """Why ``spec`` (a bus, optionally with node suffixes) is not a place on this
        model; None when it is."""
        bus, *nodes = spec.strip().lower().split(".")
        have = self.buses.get(bus)
        if have is None:
            return f"bus {spec!r}: the feeder's model has no bus {bus!r}"
        bad = [n for n in nodes if not n.isdigit() or (int(n) != 0 and int(n) not in have)]
        if bad:
            return (f"bus {spec!r}: {bad[0]!r} is not a node of bus {bus!r} (its nodes: "
                    f"{_nodes(have)})")
        return None

    def phase_problem(self, spec: str, phase: str) -> str | None:
        """Why ``phase`` has no node at the bus of ``spec`` (a bus :meth:`bus_problem`
        accepts); None when at least one of its nodes is there."""
        have = self.buses.get(bus_of(spec), frozenset())
        want = [PHASE_NODES[x] for x in phase.strip().lower() if x in PHASE_NODES]
        if not want or any(n in have for n in want):
            return None
        return (f"phase {phase!r}: bus {bus_of(spec)!r} has none of its nodes "
                f"({_nodes(want)}; the bus has {_nodes(have)})")

    def transformer_problem(self, name: str) -> str | None:
        """Why ``name`` (``"t1"`` or ``"transformer.t1"``) is not a transformer of this
        model; None when it is."""
        key = name.strip().lower().removeprefix("transformer.")
        if key in self.transformers:
            return None
        return f"service_transformer {name!r}: the feeder's model has no transformer {key!r}"


def _nodes(nodes: Iterable[int]) -> str:
    return ", ".join(str(n) for n in sorted(nodes)) or "none"


__all__ = ["PHASE_NODES", "ModelElements", "bus_of"]
