"""``derms certs``: a test PKI for the IEEE 2030.5 server (CA, server, devices, aggregators)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from derms.cli.common import handle_errors, out_console
from derms.errors import InputError


@handle_errors
def certs(
    out: Annotated[Path, typer.Argument(help="Folder for the PEM files (created; an existing "
                                              "CA and server certificate in it are reused).")],
    device: Annotated[list[str] | None, typer.Option(
        "--device", help="Issue a device certificate with this name (repeatable).")] = None,
    aggregator: Annotated[list[str] | None, typer.Option(
        "--aggregator", help="Issue an aggregator certificate with this name (repeatable).")] = None,
    server_name: Annotated[list[str] | None, typer.Option(
        "--server-name", help="DNS name in the server certificate (repeatable; default "
                              "localhost).")] = None,
    server_ip: Annotated[list[str] | None, typer.Option(
        "--server-ip", help="IP address in the server certificate (repeatable; default "
                            "127.0.0.1).")] = None,
    days: Annotated[float, typer.Option(min=0.001, help="Validity of new leaf certificates.")] = 825,
) -> None:
    """Create a test CA (ca.pem/ca.key), a server certificate (server.pem/server.key) and
    device or aggregator certificates (NAME.pem/NAME.key), ECDSA P-256, and print each
    client's LFDI and SFDI (also written to identities.csv)."""
    from derms.protocols.ieee2030_5.certs import create_ca, issue

    names = [*(device or []), *(aggregator or [])]
    bad = [n for n in names if not n or not all(c.isalnum() or c in "-_." for c in n)
           or n in ("ca", "server")]
    if bad:
        raise InputError(f"certificate name {bad[0]!r}: use letters, digits, '-', '_', '.'; "
                         "not 'ca' or 'server'")
    if len(set(names)) != len(names):
        raise InputError("a certificate name is given twice")
    out.mkdir(parents=True, exist_ok=True)
    ca_pem, ca_key = out / "ca.pem", out / "ca.key"
    if ca_pem.exists() != ca_key.exists():
        raise InputError(f"{out}: has only one of ca.pem and ca.key")
    if not ca_pem.exists():
        create_ca(out)
        out_console.print(f"created {ca_pem}", highlight=False)
    if not (out / "server.pem").exists():
        issue(out, "server", "server", ca_pem, ca_key,
              hostnames=tuple(server_name or ("localhost",)),
              ips=tuple(server_ip or ("127.0.0.1",)), days=days)
        out_console.print(f"created {out / 'server.pem'}", highlight=False)
    issued = [issue(out, n, "device", ca_pem, ca_key, days=days) for n in device or []]
    issued += [issue(out, n, "aggregator", ca_pem, ca_key, days=days) for n in aggregator or []]

    index = out / "identities.csv"
    rows: dict[str, dict[str, str]] = {}
    if index.exists():
        with index.open(newline="") as fh:
            rows = {r["name"]: r for r in csv.DictReader(fh)}
    for i in issued:
        rows[i.name] = {"name": i.name, "role": i.role, "lfdi": i.lfdi, "sfdi": str(i.sfdi),
                        "cert": i.cert_path.name, "key": i.key_path.name}
    with index.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, ["name", "role", "lfdi", "sfdi", "cert", "key"])
        writer.writeheader()
        writer.writerows(rows.values())
    if issued:
        table = Table("name", "role", "LFDI", "SFDI")
        for i in issued:
            table.add_row(i.name, i.role, i.lfdi, str(i.sfdi))
        out_console.print(table)
