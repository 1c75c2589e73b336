"""Setting a simulated fleet up with the DERMS: the test PKI of its aggregators, and the
pre-registration of its devices, meters and end devices through the management API.

Identifiers in the DERMS (``prefix`` default ``sim-``): DER device ``sim-pv-3``, its site
and meter (the site's connection point, NMI) ``sim-pv-3-site``.

With a ``feeder_id`` (control mode) the fleet is put on that feeder so the DERMS's control
loop sees and commands it: the feeder is registered (kept when it exists), every site gets
the feeder, the device's bus and its phase (the load's phase nodes: ``a``/``b``/``c``,
``ab``… for a load between phases), every site meter the feeder, bus and a single phase
(the first of the device's: the mirrored voltage is the mean of the load's phase nodes,
which on a multi-phase load is an approximation), the feeder-head meter
``<feeder_id>-head`` (head SCADA) is registered with an end device of its own (the head
RTU, owned by the first aggregator), and the end devices also get the function set
assignment of the control loop's "derms control" program when it exists (so a device
finds the loop's program at its first discovery walk; the loop assigns it too, later).
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


BATCH = 2_000  # rows per batch registration call (the API takes up to 10,000)


def register_fleet(api: Api, spec: FleetSpec, lfdis: list[str], aggregator_lfdis: list[str],
                   buses: list[str], fsa_ids: list[int] | None = None,
                   prefix: str = "sim-", *, feeder_id: str | None = None,
                   phases: list[str] | None = None, head_lfdi: str | None = None,
                   head_bus: str | None = None,
                   control_program: str = "derms control") -> dict:
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
    fsa_ids = list(fsa_ids)
    on_feeder: dict = {}
    if feeder_id is not None:
        api.must("POST", "/v1/feeders", {"feeder_id": feeder_id, "name": feeder_id},
                 ok=(201, 409))
        on_feeder = {"feeder_id": feeder_id}
        fsas = api.must("GET", "/v1/ieee2030-5/function-set-assignments?limit=1000")
        for f in fsas.get("items", []):
            if f.get("description") == control_program and f["fsa_id"] not in fsa_ids:
                fsa_ids.append(f["fsa_id"])
        if head_lfdi is not None:
            head = f"{feeder_id}-head"
            api.must("POST", "/v1/meters", {"meter_id": head, "feeder_id": feeder_id,
                                            **({"bus": head_bus} if head_bus else {})},
                     ok=(201, 409))
            status, doc = api.call("POST", "/v1/ieee2030-5/end-devices", {
                "lfdi": head_lfdi, "connection_point": head[:32],
                "aggregator_lfdi": aggregator_lfdis[0], "meter_id": head})
            if status not in (201, 409):
                raise InputError(f"--api: pre-registering the head RTU {head}: {status} "
                                 f"{doc.get('detail', doc)}")
    created = 0
    meters, devices, edevs = [], [], []
    for i in range(spec.n):
        kind = KINDS[int(spec.kind[i])]
        der_id = f"{prefix}{spec.der_id[i]}"
        site = f"{der_id}-site"[:32]
        phase = phases[i] if phases is not None else None
        meter = {"meter_id": site, "bus": buses[i]}
        if feeder_id is not None:
            meter |= {**on_feeder, "phase": (phase or "abc")[0]}
        meters.append(meter)
        gen = float(spec.p_max_kw[i]) if kind in ("pv", "battery") else 0.0
        charge = float(spec.p_max_kw[i]) if kind in ("battery", "ev", "flex") else 0.0
        devices.append({
            "der_id": der_id, "site_id": site, "der_type": DER_TYPE[kind],
            "s_max_kva": float(spec.s_kva[i]), "p_gen_max_kw": gen, "p_charge_max_kw": charge,
            "e_max_kwh": float(spec.e_max_kwh[i]) if kind == "battery" else None,
            "bus": buses[i], "protocol": "ieee2030_5", "status": "active",
            "aggregator": aggregator_lfdis[i], **on_feeder,
            **({"phase": phase} if phase else {})})
        edevs.append({"lfdi": lfdis[i], "connection_point": site,
                      "aggregator_lfdi": aggregator_lfdis[i], "fsa_ids": list(fsa_ids),
                      "der_id": der_id, "meter_id": site})
    # batches (one transaction each, existing ids kept): 10,000 devices in a few calls
    # instead of 30,000
    for lo in range(0, spec.n, BATCH):
        api.must("POST", "/v1/meters/batch", {"meters": meters[lo:lo + BATCH]}, ok=(201,))
        api.must("POST", "/v1/devices/batch", {"devices": devices[lo:lo + BATCH]}, ok=(201,))
        done = api.must("POST", "/v1/ieee2030-5/end-devices/batch",
                        {"end_devices": edevs[lo:lo + BATCH]}, ok=(201,))
        created += len(done["created"])
    log.info("event=sim_registered devices=%d new_end_devices=%d fsa_ids=%s", spec.n, created,
             fsa_ids)
    return {"fsa_ids": list(fsa_ids), "program_id": program_id, "new_end_devices": created,
            "feeder_id": feeder_id,
            "der_ids": [f"{prefix}{d}" for d in np.asarray(spec.der_id).tolist()]}
