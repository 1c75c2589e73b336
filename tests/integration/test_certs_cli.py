"""``derms certs``: the PEM files it writes, their keys and usages, and LFDI/SFDI checked against
an independent implementation (py20305, from the package registry)."""

from __future__ import annotations

import csv

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from cryptography.x509.oid import ExtendedKeyUsageOID
from typer.testing import CliRunner

from derms.cli.main import app


def test_certs_creates_ca_server_and_clients(tmp_path):
    from py20305.security.identity import compute_lfdi, compute_sfdi

    runner = CliRunner()
    result = runner.invoke(app, ["certs", str(tmp_path), "--device", "inv-1",
                                 "--aggregator", "agg"])
    assert result.exit_code == 0, result.output
    ca_before = (tmp_path / "ca.pem").read_bytes()
    result = runner.invoke(app, ["certs", str(tmp_path), "--device", "inv-2"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "ca.pem").read_bytes() == ca_before  # the CA is reused
    with (tmp_path / "identities.csv").open() as fh:
        rows = {r["name"]: r for r in csv.DictReader(fh)}
    assert set(rows) == {"inv-1", "inv-2", "agg"} and rows["agg"]["role"] == "aggregator"
    ca = x509.load_pem_x509_certificate(ca_before)
    for name, row in rows.items():
        pem = (tmp_path / f"{name}.pem").read_text()
        cert = x509.load_pem_x509_certificate(pem.encode())
        assert row["lfdi"] == compute_lfdi(pem).upper()
        assert int(row["sfdi"]) == compute_sfdi(row["lfdi"])
        assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
        assert cert.public_key().curve.name == "secp256r1"
        cert.verify_directly_issued_by(ca)
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert ExtendedKeyUsageOID.CLIENT_AUTH in eku
        key = load_pem_private_key((tmp_path / f"{name}.key").read_bytes(), None)
        assert key.public_key() == cert.public_key()
        assert (tmp_path / f"{name}.key").stat().st_mode & 0o077 == 0
    server = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)


def test_certs_refuses_bad_names(tmp_path):
    result = CliRunner().invoke(app, ["certs", str(tmp_path), "--device", "ca"])
    assert result.exit_code == 2
    result = CliRunner().invoke(app, ["certs", str(tmp_path), "--device", "a/b"])
    assert result.exit_code == 2
