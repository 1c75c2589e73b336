"""AMI power at a DER's site is the service point's net power: the fast cycle's estimate
must not count the DER behind the meter twice (its telemetry is a load of its own)."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np

from derms.analysis.state_estimation import Measurements
from derms.control.commands import InMemorySink
from derms.control.fast_cycle import DerRegistry, FastCycle, FleetNow
from derms.grid.bundled import resolve_master
from derms.powerflow.engine import OpenDSSEngine, SolveSettings
from tests.validation.test_state_estimation import load_table

T0 = datetime(2026, 7, 2, 4, 30, tzinfo=UTC)


def test_net_ami_power_at_a_der_site_measures_the_customer_load_alone():
    engine = OpenDSSEngine(resolve_master("ieee13"), SolveSettings(tolerance=1e-8))
    engine.solve_snapshot()
    loads = engine.circuit.Loads
    names, p0, q0 = load_table(engine)
    # an EV charging 60 kW behind the meter of load 645 (bus 645, phase b; 170 kW base)
    registry = DerRegistry(np.array(["ev-1"]), np.array(["ev"]), np.array([0]), [("645.2",)])
    cycle = FastCycle(engine, registry, InMemorySink(), feeder_id="ieee13",
                      pre_existing="none")
    customer_kw, ev_kw = 120.0, 60.0
    k = names.index("645")
    meas = Measurements(
        v_nodes=[], v_pu=np.zeros(0), v_sigma_pu=np.zeros(0), load_names=names,
        load_p_kw=p0, load_q_kvar=q0, ami_p_loads=["645"],
        ami_p_kw=np.array([customer_kw + ev_kw]),  # what the site's meter reads
        ami_p_sigma_kw=np.array([0.01 * (customer_kw + ev_kw)]))
    fleet = FleetNow(p_kw=np.array([ev_kw]), q_kvar=np.zeros(1), p_min_kw=np.zeros(1),
                     p_max_kw=np.array([ev_kw]), q_min_kvar=np.zeros(1),
                     q_max_kvar=np.zeros(1), score=np.ones(1))
    cycle.run(T0, fleet, measurements=meas)
    loads.Name = names[k]
    # the customer load is the reading less the EV (the EV is its own load at 60 kW)
    assert abs(loads.kW - customer_kw) < 0.05 * customer_kw, loads.kW
    engine.close()
