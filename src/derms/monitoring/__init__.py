"""Monitoring: per-feeder state estimation from telemetry, AMI and the grid model; limit
violations; DER availability; alarms; the background cycle."""

from derms.monitoring.availability import AvailabilityThresholds, classify_availability
from derms.monitoring.cycle import MonitorLoop, model_path_of, monitors_from_store
from derms.monitoring.feeder_monitor import FeederMonitor, FeederState, MonitorConfig, head_meter_id

__all__ = ["AvailabilityThresholds", "FeederMonitor", "FeederState", "MonitorConfig",
           "MonitorLoop", "classify_availability", "head_meter_id", "model_path_of",
           "monitors_from_store"]
