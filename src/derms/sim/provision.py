"""Setting a simulated fleet up with the DERMS: the test PKI of its aggregators, and the
pre-registration of its devices, meters and end devices through the management API.

Identifiers in the DERMS (``prefix`` default ``sim-``): DER device ``sim-pv-3``, its site
and meter (the site's connection point, NMI) ``sim-pv-3-site``.
"""

from __future__ import annotations

import http.client
import json
import logging
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from derms.errors import InputError
from derms.protocols.ieee2030_5.certs import create_ca, issue
from derms.protocols.ieee2030_5.identity import lfdi_from_cert_pem
from derms.sim.fleet import KINDS, FleetSpec

log = logging.getLogger(__name__)

DER_TYPE = {"pv": "pv", "battery": "battery", "ev": "ev_charger", "flex": "flexible_load"}


def ensure_pki(folder: Path, n_aggregators: int) -> tuple[Path, list[tuple[str, Path, Path,
                                                                           str]]]:
    """The CA (``ca.pem``/``ca.key``), a server certificate and ``agg-<k>`` aggregator
    certificates in ``folder``, each created only when missing (certificates are reused
    between runs). Returns the CA path and (name, cert, key, LFDI) per aggregator."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ca, ca_key = folder / "ca.pem", folder / "ca.key"
    if not ca.exists() or not ca_key.exists():
        if any(folder.glob("agg-*.pem")):
            raise InputError(f"--pki {folder}: aggregator certificates without ca.pem/ca.key")
        create_ca(folder)
    if not (folder / "server.pem").exists():
        issue(folder, "server", "server", ca, ca_key)
    out = []
    for k in range(1, n_aggregators + 1):
        name = f"agg-{k}"
        cert, key = folder / f"{name}.pem", folder / f"{name}.key"
        if not cert.exists() or not key.exists():
            issue(folder, name, "aggregator", ca, ca_key)
        out.append((name, cert, key, lfdi_from_cert_pem(cert.read_bytes())))
    return ca, out


class Api:
    """A tiny JSON client of the derms API (standard library; one keep-alive connection)."""

    def __init__(self, url: str, token: str | None) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InputError(f"--api {url!r}: expected http(s)://host:port")
        cls = http.client.HTTPSConnection if parts.scheme == "https" else \
            http.client.HTTPConnection
        self.conn = cls(parts.hostname, parts.port, timeout=30)
        self.base = parts.path.rstrip("/")
        self.headers = {"content-type": "application/json"}
        if token:
            self.headers["authorization"] = f"Bearer {token}"

    def call(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        data = None if body is None else json.dumps(body).encode()
        try:
            self.conn.request(method, self.base + path, body=data, headers=self.headers)
            resp = self.conn.getresponse()
            raw = resp.read()
        except OSError as exc:
            raise InputError(f"--api: {method} {path}: {exc}") from None
        try:
            doc = json.loads(raw) if raw else {}
        except json.JSONDecodeError:
            doc = {"detail": raw[:200].decode(errors="replace")}
        if resp.status in (401, 403):
            raise InputError(f"--api: {method} {path}: {resp.status} "
                             f"{doc.get('detail', '')} (check --token and its scope: admin)")
        return resp.status, doc

    def must(self, method: str, path: str, body: dict | None = None,
             ok: tuple[int, ...] = (200, 201)) -> dict:
        status, doc = self.call(method, path, body)
        if status not in ok:
            raise InputError(f"--api: {method} {path}: {status} {doc.get('detail', doc)}")
        return doc

    def close(self) -> None:
        self.conn.close()


def register_fleet(api: Api, spec: FleetSpec, lfdis: list[str], aggregator_lfdis: list[str],
                   buses: list[str], fsa_ids: list[int] | None = None,
                   prefix: str = "sim-") -> dict:
    """Pre-register every device: a meter for its site, the DER device, and its end device
    (LFDI, connection point, owning aggregator, FSAs, der_id and meter_id so its mirrored
    readings reach the historian). Existing records (409) are kept. Without ``fsa_ids`` a
    program "derms sim" and an FSA holding it are created. Returns the ids used."""
    program_id = None
    if not fsa_ids:
        program_id = api.must("POST", "/v1/ieee2030-5/programs",
                              {"description": "derms sim", "primacy": 10})["program_id"]
        fsa_ids = [api.must("POST", "/v1/ieee2030-5/function-set-assignments",
                            {"description": "derms sim", "program_ids": [program_id]}
                            )["fsa_id"]]
    created = 0
    for i in range(spec.n):
        kind = KINDS[int(spec.kind[i])]
        der_id = f"{prefix}{spec.der_id[i]}"
        site = f"{der_id}-site"[:32]
        api.must("POST", "/v1/meters", {"meter_id": site, "bus": buses[i]}, ok=(201, 409))
        gen = float(spec.p_max_kw[i]) if kind in ("pv", "battery") else 0.0
        charge = float(spec.p_max_kw[i]) if kind in ("battery", "ev", "flex") else 0.0
        api.must("POST", "/v1/devices", {
            "der_id": der_id, "site_id": site, "der_type": DER_TYPE[kind],
            "s_max_kva": float(spec.s_kva[i]), "p_gen_max_kw": gen, "p_charge_max_kw": charge,
            "e_max_kwh": float(spec.e_max_kwh[i]) if kind == "battery" else None,
            "bus": buses[i], "protocol": "ieee2030_5", "status": "active",
            "aggregator": aggregator_lfdis[i]}, ok=(201, 409))
        status, doc = api.call("POST", "/v1/ieee2030-5/end-devices", {
            "lfdi": lfdis[i], "connection_point": site, "aggregator_lfdi": aggregator_lfdis[i],
            "fsa_ids": list(fsa_ids), "der_id": der_id, "meter_id": site})
        if status == 201:
            created += 1
        elif status != 409:
            raise InputError(f"--api: pre-registering end device {der_id}: {status} "
                             f"{doc.get('detail', doc)}")
    log.info("event=sim_registered devices=%d new_end_devices=%d fsa_ids=%s", spec.n, created,
             fsa_ids)
    return {"fsa_ids": list(fsa_ids), "program_id": program_id, "new_end_devices": created,
            "der_ids": [f"{prefix}{d}" for d in np.asarray(spec.der_id).tolist()]}
