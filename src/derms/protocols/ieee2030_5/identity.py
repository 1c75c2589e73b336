"""IEEE 2030.5 device identity: LFDI and SFDI from a certificate (IEEE 2030.5-2018 §6.3.2–6.3.4).

- certificate fingerprint: SHA-256 of the DER-encoded certificate;
- LFDI (long form device identifier): the fingerprint's leftmost 160 bits, as 40 hex digits
  (upper case here; compare case-insensitively);
- SFDI (short form): the fingerprint's leftmost 36 bits as a decimal number, with one check
  digit appended so that the sum of all the SFDI's digits is a multiple of 10.

The standard's worked example: fingerprint ``3E4F45AB31ED…EE213A`` gives LFDI
``3E4F45AB31EDFE5B67E343E5E4562E31984E23E5`` and SFDI ``167261211391``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding


def fingerprint_hex(cert_der: bytes) -> str:
    """SHA-256 of a DER-encoded certificate, 64 upper-case hex digits."""
    return hashlib.sha256(cert_der).hexdigest().upper()


def lfdi_from_fingerprint(fingerprint: str) -> str:
    """The LFDI: leftmost 160 bits (40 hex digits) of a SHA-256 fingerprint, upper case."""
    fp = fingerprint.removeprefix("0x").upper()
    if len(fp) < 40 or any(c not in "0123456789ABCDEF" for c in fp):
        raise ValueError(f"fingerprint {fingerprint!r}: expected at least 40 hex digits")
    return fp[:40]


def lfdi_from_cert_der(cert_der: bytes) -> str:
    """LFDI of a DER-encoded certificate."""
    return lfdi_from_fingerprint(fingerprint_hex(cert_der))


def lfdi_from_cert_pem(cert_pem: bytes) -> str:
    """LFDI of a PEM-encoded certificate."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    return lfdi_from_cert_der(cert.public_bytes(Encoding.DER))


def sfdi_check_digit(number: int) -> int:
    """The digit that brings the digit sum of ``number`` to a multiple of 10."""
    return (10 - sum(int(d) for d in str(number)) % 10) % 10


def sfdi_from_lfdi(lfdi: str) -> int:
    """SFDI: leftmost 36 bits of the LFDI as a decimal, with the sum-of-digits check digit."""
    if len(lfdi) < 9:
        raise ValueError(f"LFDI {lfdi!r}: expected 40 hex digits")
    base = int(lfdi[:9], 16)
    return base * 10 + sfdi_check_digit(base)


def sfdi_is_valid(sfdi: int) -> bool:
    """True when the SFDI's digit sum is a multiple of 10 (its check digit is right)."""
    return sfdi >= 0 and sum(int(d) for d in str(sfdi)) % 10 == 0


@dataclass(frozen=True)
class ClientIdentity:
    """Who is at the other end of a TLS connection: derived from its certificate only."""

    lfdi: str
    sfdi: int
    cert_der: bytes

    @classmethod
    def from_cert_der(cls, cert_der: bytes) -> ClientIdentity:
        lfdi = lfdi_from_cert_der(cert_der)
        return cls(lfdi=lfdi, sfdi=sfdi_from_lfdi(lfdi), cert_der=cert_der)
