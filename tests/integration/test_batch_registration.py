"""Batch registration for fleets: DER devices, meters and IEEE 2030.5 end devices in one
call each, all or nothing, idempotent for what already exists."""

from __future__ import annotations

from derms.protocols.ieee2030_5.sql_repository import PersistentRepository
from derms.store.db import make_engine
from tests.integration.test_ieee2030_5_management import (  # noqa: F401 - fixtures
    _problem,
    api,
    repo,
)


def _lfdi(k: int) -> str:
    return f"{k:040X}"


def test_batch_registration_of_a_fleet(api, repo):  # noqa: F811
    c, admin = api["client"], api["admin"]
    assert c.post("/v1/feeders", headers=admin, json={"feeder_id": "f-batch"}
                  ).status_code in (201, 409)
    n = 300
    meters = [{"meter_id": f"m-{k}", "feeder_id": "f-batch", "bus": f"b{k}", "phase": "a"}
              for k in range(n)]
    r = c.post("/v1/meters/batch", headers=admin, json={"meters": meters})
    assert r.status_code == 201, r.text
    assert len(r.json()["created"]) == n
    devices = [{"der_id": f"d-{k}", "site_id": f"m-{k}", "feeder_id": "f-batch",
                "der_type": "pv", "s_max_kva": 5.0, "p_gen_max_kw": 5.0, "bus": f"b{k}"}
               for k in range(n)]
    r = c.post("/v1/devices/batch", headers=admin, json={"devices": devices})
    assert r.status_code == 201, r.text
    again = c.post("/v1/devices/batch", headers=admin, json={"devices": devices[:5]}).json()
    assert again == {"created": [], "existing": sorted(f"d-{k}" for k in range(5))}
    edevs = [{"lfdi": _lfdi(k + 1), "der_id": f"d-{k}", "meter_id": f"m-{k}",
              "connection_point": f"m-{k}"} for k in range(n)]
    r = c.post("/v1/ieee2030-5/end-devices/batch", headers=admin, json={"end_devices": edevs})
    assert r.status_code == 201, r.text
    assert len(r.json()["created"]) == n and len(repo.end_devices()) == n
    r = c.post("/v1/ieee2030-5/end-devices/batch", headers=admin,
               json={"end_devices": edevs[:3]})
    assert r.json()["existing"] == [_lfdi(k + 1) for k in range(3)]
    # bad rows: nothing stored
    bad = [{"lfdi": _lfdi(9001)}, {"lfdi": _lfdi(9002), "der_id": "nope"}]
    p = _problem(c.post("/v1/ieee2030-5/end-devices/batch", headers=admin,
                        json={"end_devices": bad}), 422)
    assert "end_devices[1].der_id" in p["detail"] and len(repo.end_devices()) == n
    bad = [{"lfdi": _lfdi(9001)}, {"lfdi": _lfdi(9001)}]
    _problem(c.post("/v1/ieee2030-5/end-devices/batch", headers=admin,
                    json={"end_devices": bad}), 422)
    bad = [{"lfdi": _lfdi(9003)}, {"lfdi": _lfdi(9004), "fsa_ids": [12345]}]
    _problem(c.post("/v1/ieee2030-5/end-devices/batch", headers=admin,
                    json={"end_devices": bad}), 422)
    assert repo.end_device_by_lfdi(_lfdi(9003)) is None
    _problem(c.post("/v1/devices/batch", headers=admin, json={"devices": [
        dict(devices[0], der_id="x-1"), dict(devices[0], der_id="x-1")]}), 422)
    _problem(c.post("/v1/meters/batch", headers=admin, json={"meters": [
        {"meter_id": "x-m", "feeder_id": "no-such-feeder"}]}), 422)
    _problem(c.post("/v1/meters/batch", headers=api["read"], json={"meters": meters}), 403)
    _problem(c.post("/v1/meters/batch", headers=admin, json={"meters": []}), 422)


def test_persistent_batch_is_one_transaction(tmp_path):
    url = f"sqlite:///{tmp_path / 'b.db'}"
    from derms.store.migrate import upgrade

    upgrade(url)
    engine = make_engine(url)
    repo = PersistentRepository(engine)
    out = repo.add_end_devices([{"lfdi": _lfdi(k + 1), "nmi": f"n{k}"} for k in range(50)])
    assert all(created for _, created in out)
    try:
        repo.add_end_devices([{"lfdi": _lfdi(100)}, {"lfdi": _lfdi(101), "fsa_ids": [7]}])
    except ValueError as exc:
        assert "end device 1" in str(exc)
    else:
        raise AssertionError("a bad row must fail the batch")
    assert repo.end_device_by_lfdi(_lfdi(100)) is None
    reloaded = PersistentRepository(engine)
    assert len(reloaded.end_devices()) == 50 and reloaded.end_device_by_lfdi(_lfdi(100)) is None
    engine.dispose()
