"""IEEE 2030.5 (CSIP / CSIP-AUS) server adapter over mutual TLS.

Modules: ``identity`` (LFDI/SFDI), ``certs`` (test PKI), ``tls`` (server context),
``http11`` (HTTP/1.1 over TLS with the peer certificate as identity), ``sep_xml`` (namespaces,
parsing, XSD validation), ``model`` / ``repository`` (records and their storage),
``mappers`` (records → XML), ``resources`` (errors, paging, media type), ``app`` (routing,
access rules, what the server publishes, registration), ``client_reports`` (what clients PUT
and POST: DER capability/settings/status/availability, responses), ``mirror`` /
``mirror_map`` (the metering mirror: MirrorUsagePoints and readings → historian quantities),
``telemetry`` (the reading sink, off the event loop), ``events`` (supersession),
``subscriptions`` (LogEvents and Subscriptions clients create), ``notify`` (Notification
delivery over mutual TLS), ``delivery`` (each device's delivery record from its responses),
``server`` (start it).
"""

from derms.protocols.ieee2030_5.app import SepApp, SepSettings
from derms.protocols.ieee2030_5.repository import (
    InMemoryRepository,
    SepAdminRepository,
    SepRepository,
)
from derms.protocols.ieee2030_5.server import Ieee2030_5Config, start_ieee2030_5_server

__all__ = ["Ieee2030_5Config", "InMemoryRepository", "SepAdminRepository", "SepApp",
           "SepRepository", "SepSettings", "start_ieee2030_5_server"]
