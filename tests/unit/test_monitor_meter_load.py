"""Which load an AMI meter's p_kw/q_kvar measure (``feeder_monitor._meter_load``).

AMI power was ignored wherever several loads share a bus, even where the meters' phases
tell them apart (EPRI ckt7: 90 of 906 meters, 51 of them one load per phase; independent
test)."""

from __future__ import annotations

from derms.monitoring.feeder_monitor import _meter_load
from derms.store.models import Phase

NODES = {"675a": frozenset({1}), "675b": frozenset({2}), "675c": frozenset({3}),
         "692": frozenset({1, 2, 3}), "x1": frozenset({1}), "x2": frozenset({1})}


def test_the_only_load_at_the_bus_whatever_the_phase():
    assert _meter_load(["692"], NODES, None) == "692"
    assert _meter_load(["692"], NODES, Phase.B) == "692"


def test_one_load_per_phase_is_told_apart_by_the_meter_phase():
    loads = ["675a", "675b", "675c"]
    assert _meter_load(loads, NODES, Phase.A) == "675a"
    assert _meter_load(loads, NODES, "c") == "675c"
    assert _meter_load(loads, NODES, None) is None  # no phase: ambiguous
    assert _meter_load(loads, NODES, Phase.AB) is None  # no load on exactly a-b
    assert _meter_load(["x1", "x2"], NODES, Phase.A) is None  # two on the same phase
