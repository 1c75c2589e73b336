"""DER types, capabilities, constraints and groups (layer 3: pure data + math)."""

from derms.der.models import (
    Battery,
    Connection,
    ControllableGenerator,
    DERGroup,
    EVSession,
    Fleet,
    FleetArrays,
    FlexibleLoad,
    GroupRequest,
    Horizon,
    PVInverter,
    check_group_requests,
    disaggregate,
    export_capability_kw,
    fleet_arrays,
)

__all__ = [
    "Battery", "Connection", "ControllableGenerator", "DERGroup", "EVSession", "Fleet",
    "FleetArrays", "FlexibleLoad", "GroupRequest", "Horizon", "PVInverter",
    "check_group_requests", "disaggregate", "export_capability_kw", "fleet_arrays",
]
