"""The control loop's reader of measurements: FeederMonitor's AMI, head SCADA and topology
readers on an engine the loop owns."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.engine import Engine

from derms.analysis.state_estimation import Measurements
from derms.monitoring.feeder_monitor import (
    FeederMonitor,
    MonitorConfig,
    _load_table,
    _loads_by_bus,
    node_base_v,
)
from derms.powerflow.engine import OpenDSSEngine
from derms.store.db import make_session_factory


class StoreMeasurements(FeederMonitor):
    """Thin adapter: FeederMonitor's readers of AMI, head SCADA and topology, on an engine
    the loop owns (no engine of its own, no alarms). Built before the FastCycle adds its
    DER loads, so the load table holds the customer loads only."""

    def __init__(self, feeder_id: str, engine: OpenDSSEngine, db: Engine,
                 config: MonitorConfig) -> None:
        from derms.powerflow.collect import build_index

        self.feeder_id, self.db, self.config, self.engine = feeder_id, db, config, engine
        self.sessions = make_session_factory(db)
        self.index = build_index(engine)
        self.node_names = engine.node_names()
        self._node_pos = {s: i for i, s in enumerate(self.node_names)}
        self._node_base_v = node_base_v(self.index)
        self.load_names, self.base_p_kw, self.base_q_kvar = _load_table(engine)
        self._loads_at_bus, self._load_nodes = _loads_by_bus(engine, self.load_names)
        self.topology: dict[str, str] = {}

    def close(self) -> None:  # the engine is the loop's
        pass

    def measurements(self, now: datetime, notes: list[str]) -> Measurements | None:
        """As :meth:`FeederMonitor.run_once` builds them (None: no fresh meter reading)."""
        with self.db.connect() as conn:
            meters, m_series, m_last = self.read_meters(conn, now)
        return self.build_measurements(meters, m_series, m_last, now, notes)[0]


