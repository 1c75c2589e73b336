"""The digital-twin feeder (``derms sim``): an OpenDSS feeder stepped in time with a
simulated DER fleet that talks to the DERMS over IEEE 2030.5 (edge layer: nothing but the
CLI imports it).

Modules: ``fleet`` (vectorised device models and their controls), ``placement`` (seeded
fleet on a feeder's loads), ``twin`` (the feeder's power flow), ``scenario`` (scripted
events), ``agents`` (IEEE 2030.5 aggregator clients over mutual TLS), ``runner`` (the
real-time loop tying them together and its outputs).
"""
