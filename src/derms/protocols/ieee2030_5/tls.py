"""The server's TLS context: TLS 1.2+, client certificates required, CSIP cipher suites.

IEEE 2030.5-2018 §6.11 mandates TLS 1.2 with TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8 and ECC P-256
certificates. Python's default contexts leave AES-CCM out, so the TLS 1.2 list is set
explicitly: ECDHE-ECDSA-AES128-CCM8 first, then ECDHE-ECDSA-AES128-GCM-SHA256 and
ECDHE-ECDSA-AES256-GCM-SHA384 (the one other suite common 2030.5 clients offer). TLS 1.3 stays
available with OpenSSL's default suites for clients that prefer it.
"""

from __future__ import annotations

import ssl
from pathlib import Path

TLS12_CIPHERS = ("ECDHE-ECDSA-AES128-CCM8:ECDHE-ECDSA-AES128-GCM-SHA256:"
                 "ECDHE-ECDSA-AES256-GCM-SHA384")


def server_ssl_context(cert: Path, key: Path, client_ca: Path) -> ssl.SSLContext:
    """Server context: our certificate and key, client certificates verified against
    ``client_ca`` (a certificate from another CA or outside its validity ends the handshake
    with a TLS alert)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.load_cert_chain(str(cert), str(key))
    ctx.load_verify_locations(str(client_ca))
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    return ctx
