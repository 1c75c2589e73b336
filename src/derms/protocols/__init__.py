"""Protocol adapters (layer 6 in DESIGN.md, 7 in tests/unit/test_layers.py): one package per
protocol, translating between the wire and derms' protocol-neutral records."""
