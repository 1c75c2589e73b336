"""Test PKI for IEEE 2030.5: a CA, a server certificate, device and aggregator certificates.

ECDSA P-256 keys with SHA-256 signatures, PEM files (IEEE 2030.5-2018 §6.11 asks for
ECC P-256 / ecdsa-with-SHA256). This is a *test* PKI: one self-signed root signs every
certificate directly; a production IEEE 2030.5 PKI has a SERCA root, manufacturer CAs and
device certificates that never expire (notAfter 99991231235959Z), with the standard's
certificate policy OIDs — none of which this module claims to reproduce.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from derms.protocols.ieee2030_5.identity import lfdi_from_cert_der, sfdi_from_lfdi


@dataclass(frozen=True)
class Issued:
    """A certificate and its key, as written."""

    name: str
    role: str  # "ca", "server", "device", "aggregator"
    cert_path: Path
    key_path: Path
    cert_der: bytes

    @property
    def lfdi(self) -> str:
        return lfdi_from_cert_der(self.cert_der)

    @property
    def sfdi(self) -> int:
        return sfdi_from_lfdi(self.lfdi)


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _save(out: Path, name: str, role: str, cert: x509.Certificate,
          key: ec.EllipticCurvePrivateKey) -> Issued:
    out.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = out / f"{name}.pem", out / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_private(key_path, _key_pem(key))
    return Issued(name, role, cert_path, key_path, cert.public_bytes(serialization.Encoding.DER))


def _validity(not_before: datetime | None, days: float) -> tuple[datetime, datetime]:
    start = not_before or (datetime.now(UTC) - timedelta(minutes=5))
    return start, start + timedelta(days=days)


def create_ca(out: Path, name: str = "ca", common_name: str = "derms test CA",
              days: float = 3650) -> Issued:
    """A self-signed root CA (``NAME.pem``, ``NAME.key``) in ``out``."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    start, end = _validity(None, days)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    return _save(out, name, "ca", cert, key)


def load_ca(cert_path: Path, key_path: Path) -> tuple[x509.Certificate,
                                                       ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{key_path}: not an EC private key")
    return cert, key


def issue(out: Path, name: str, role: str, ca_cert_path: Path, ca_key_path: Path, *,
          hostnames: tuple[str, ...] = ("localhost",), ips: tuple[str, ...] = ("127.0.0.1",),
          days: float = 825, not_before: datetime | None = None) -> Issued:
    """Issue a leaf certificate signed by the CA: ``role`` is "server", "device" or "aggregator".

    Server certificates carry the DNS names and IP addresses as subjectAltName. Every leaf
    carries both the serverAuth and clientAuth usages: the server also connects out (to POST
    Notifications) and clients also listen (at their notificationURI). ``not_before`` and
    ``days`` set the validity (tests use them for expired certificates).
    """
    if role not in ("server", "device", "aggregator"):
        raise ValueError(f"role {role!r}: expected server, device or aggregator")
    ca_cert, ca_key = load_ca(ca_cert_path, ca_key_path)
    key = ec.generate_private_key(ec.SECP256R1())
    start, end = _validity(not_before, days)
    # both directions for every role: IEEE 2030.5 clients also listen (their notification
    # URI receives the server's Notification POSTs) and the server then connects as a client
    usage = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([
            x509.NameAttribute(NameOID.COMMON_NAME, name),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
        ]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=True, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
    )
    if role == "server":
        names: list[x509.GeneralName] = [x509.DNSName(h) for h in hostnames]
        names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return _save(out, name, role, cert, key)
