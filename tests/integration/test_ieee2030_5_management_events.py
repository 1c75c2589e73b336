"""IEEE 2030.5 management, part two: curves, log events, subscriptions, delivery records."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from derms.protocols.ieee2030_5.delivery import delivery_record
from derms.protocols.ieee2030_5.model import DerLimits
from tests.integration.test_ieee2030_5_management import (  # noqa: F401 - fixtures
    LFDI_1,
    LFDI_2,
    Q,
    _problem,
    _sep,
    _sep_get,
    api,
    repo,
)

BASE = "/v1/ieee2030-5"


def test_curves_through_the_api_reach_the_device(api, repo):  # noqa: F811
    c, admin, operate = api["client"], api["admin"], api["operate"]
    pid = repo.add_program("DOE", 1).program_id
    fsa = repo.add_fsa("all", [pid]).fsa_id
    e1 = repo.add_end_device(LFDI_1, fsa_ids=[fsa]).edev_id
    r = c.post(f"{BASE}/programs/{pid}/curves", headers=admin, json={
        "kind": "volt_var", "x": [92, 98, 102, 108], "y": [44, 0, 0, -44],
        "description": "AS4777.2 volt-var", "open_loop_tms": 500})
    assert r.status_code == 201, r.text
    curve = r.json()
    assert curve["y_reference"] == "set_max_var" and curve["open_loop_tms"] == 500
    for bad in ({"kind": "volt_var", "x": [100, 90], "y": [0, 0]},  # not increasing
                {"kind": "volt_var", "x": list(range(11)), "y": [0] * 11},
                {"kind": "watt_pf", "x": [1], "y": [1]},
                {"kind": "volt_var", "x": [1, 2], "y": [1]}):
        _problem(c.post(f"{BASE}/programs/{pid}/curves", headers=admin, json=bad), 422)
    _problem(c.post(f"{BASE}/programs/999/curves", headers=admin,
                    json={"kind": "volt_var", "x": [1], "y": [1]}), 404)
    _problem(c.post(f"{BASE}/programs/{pid}/curves", headers=operate,
                    json={"kind": "volt_var", "x": [1], "y": [1]}), 403)
    listed = c.get(f"{BASE}/programs/{pid}/curves", headers=api["read"]).json()
    assert listed["total"] == 1
    start = datetime.now(UTC).isoformat()
    r = c.post(f"{BASE}/programs/{pid}/controls", headers=operate, json={
        "start": start, "duration_s": 600, "volt_var_curve_id": curve["curve_id"]})
    assert r.status_code == 201, r.text
    assert r.json()["volt_var_curve_id"] == curve["curve_id"]
    _problem(c.post(f"{BASE}/programs/{pid}/controls", headers=operate, json={
        "start": start, "duration_s": 600, "volt_watt_curve_id": curve["curve_id"]}), 422)
    r = c.put(f"{BASE}/programs/{pid}/default-control", headers=admin,
              json={"export_limit_w": 1500, "volt_var_curve_id": curve["curve_id"]})
    assert r.status_code == 200, r.text
    # the device finds the curve through its control and its default control
    derc = _sep_get(repo, LFDI_1, f"/edev/{e1}/derp/{pid}/derc").find(f"{Q}DERControl")
    href = derc.find(f"{Q}DERControlBase/{Q}opModVoltVar").get("href")
    assert _sep_get(repo, LFDI_1, href).findtext(f"{Q}curveType") == "11"
    dderc = _sep_get(repo, LFDI_1, f"/edev/{e1}/derp/{pid}/dderc")
    assert dderc.find(f"{Q}DERControlBase/{Q}opModVoltVar").get("href") == href


def test_log_events_subscriptions_and_delivery_records(api, repo):  # noqa: F811
    c, read = api["client"], api["read"]
    pid = repo.add_program("DOE", 1).program_id
    fsa = repo.add_fsa("all", [pid]).fsa_id
    e1 = repo.add_end_device(LFDI_1, nmi="s1", fsa_ids=[fsa]).edev_id
    e2 = repo.add_end_device(LFDI_2, nmi="s2", fsa_ids=[fsa]).edev_id
    epoch = int(datetime.now(UTC).timestamp())
    log = (f'<LogEvent xmlns="urn:ieee:std:2030.5:ns"><createdDateTime>{epoch}'
           "</createdDateTime><details>inverter trip</details><functionSet>14</functionSet>"
           "<logEventCode>2</logEventCode><logEventID>9</logEventID><logEventPEN>0"
           "</logEventPEN><profileID>2</profileID></LogEvent>").encode()
    assert _sep(repo, LFDI_1, "POST", f"/edev/{e1}/lel", log).status == 201
    r = c.get(f"{BASE}/end-devices/{e1}/log-events", headers=read).json()
    assert r["total"] == 1 and r["items"][0]["details"] == "inverter trip"
    _problem(c.get(f"{BASE}/end-devices/999/log-events", headers=read), 404)
    sub = (f'<Subscription xmlns="urn:ieee:std:2030.5:ns"><subscribedResource>/edev/{e1}/fsa'
           "</subscribedResource><encoding>0</encoding><level>+S1</level><limit>5</limit>"
           "<notificationURI>https://127.0.0.1:9/n</notificationURI></Subscription>").encode()
    assert _sep(repo, LFDI_1, "POST", f"/edev/{e1}/sub", sub).status == 201
    r = c.get(f"{BASE}/end-devices/{e1}/subscriptions", headers=read).json()
    assert r["items"][0]["subscribed_resource"] == f"/edev/{e1}/fsa"
    assert r["items"][0]["delivered"] == 0  # no notifier in process

    # delivery: three past events for s1 — one acknowledged and completed, one opted out,
    # one unanswered; a future one and a cancelled-before-start one do not count
    now = datetime.now(UTC)
    past = [repo.add_control(pid, now - timedelta(hours=3 - k), 600, DerLimits(exp_lim_w=k),
                             connection_point="s1") for k in range(3)]
    repo.add_control(pid, now + timedelta(hours=1), 600, DerLimits(exp_lim_w=9),
                     connection_point="s1")
    cancelled = repo.add_control(pid, now + timedelta(hours=2), 600, DerLimits(exp_lim_w=8),
                                 connection_point="s1")
    repo.cancel_control(cancelled.control_id)
    repo.add_response(past[0].control_id, e1, 1, None)
    repo.add_response(past[0].control_id, e1, 3, None)
    repo.add_response(past[1].control_id, e1, 4, None)
    d = c.get(f"{BASE}/end-devices/{e1}/delivery", headers=read).json()
    assert (d["events"], d["acknowledged"], d["completed"], d["declined"],
            d["unanswered"]) == (3, 1, 1, 1, 1)
    assert d["score"] == round(2 / 5, 4)
    everyone = c.get(f"{BASE}/delivery", headers=read).json()
    assert [i["end_device_id"] for i in everyone["items"]] == [e1, e2]  # lowest score first
    assert everyone["items"][1]["events"] == 0 and everyone["items"][1]["score"] == 0.5
    # superseded events are not due: a newer overlapping event replaces the unanswered one
    repo.add_control(pid, past[2].start, 600, DerLimits(exp_lim_w=7), connection_point="s1")
    rec = delivery_record(repo, repo.end_device(e1), datetime.now(UTC))
    assert (rec.events, rec.unanswered) == (3, 1)  # the newer one is due and unanswered
    _problem(c.get(f"{BASE}/end-devices/999/delivery", headers=read), 404)


def _schedule(t0: datetime, values: dict[str, tuple[str, list[float], list[float]]]) -> dict:
    """schedule.csv columns: der_id → (kind, p_kw per interval, curtail_kw per interval)."""
    cols: dict[str, list] = {"der_id": [], "kind": [], "timestamp": [], "p_kw": [],
                             "curtail_kw": []}
    for der, (kind, p, curtail) in values.items():
        for k, (pk, ck) in enumerate(zip(p, curtail, strict=True)):
            cols["der_id"].append(der)
            cols["kind"].append(kind)
            cols["timestamp"].append((t0 + timedelta(minutes=15 * k)).isoformat())
            cols["p_kw"].append(pk)
            cols["curtail_kw"].append(ck)
    return cols


def test_dispatch_plan_becomes_der_controls(api, repo):  # noqa: F811
    c, operate = api["client"], api["operate"]
    pid = repo.add_program("dispatch", 2).program_id
    fsa = repo.add_fsa("fleet", [pid]).fsa_id
    bat = repo.add_end_device(LFDI_1, der_id="bat-1", fsa_ids=[fsa]).edev_id
    pv = repo.add_end_device(LFDI_2, der_id="pv-1", fsa_ids=[fsa]).edev_id
    t0 = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=20)
    plan = _schedule(t0, {"bat-1": ("battery", [-5.0, -4.0, 3.5], [0, 0, 0]),
                          "pv-1": ("pv", [-6.0, -2.5, -6.0], [0.0, 3.5, 0.0]),
                          "ev-9": ("ev", [7.0, 7.0, 7.0], [0, 0, 0])})
    r = c.post(f"/v1/ieee2030-5/programs/{pid}/dispatch", headers=operate,
               json={"schedule": plan})
    assert r.status_code == 200, r.text
    out = r.json()
    # the first interval (t0 .. t0+15 min) is over; the PV is curtailed in the second only
    assert out["step_s"] == 900 and out["skipped_past"] == 3
    assert out["unmatched_der_ids"] == ["ev-9"] and out["skipped_pv_not_curtailed"] == 1
    assert out["created"] == 3
    lst = _sep_get(repo, LFDI_1, f"/edev/{bat}/derp/{pid}/derc")
    targets = [int(e.findtext(f"{Q}DERControlBase/{Q}opModTargetW/{Q}value")) *
               10 ** int(e.findtext(f"{Q}DERControlBase/{Q}opModTargetW/{Q}multiplier"))
               for e in lst.findall(f"{Q}DERControl")]
    assert targets == [4000, -3500]  # discharging 4 kW, then charging 3.5 kW
    pv_list = _sep_get(repo, LFDI_2, f"/edev/{pv}/derp/{pid}/derc")
    (pv_ctl,) = pv_list.findall(f"{Q}DERControl")
    gen = pv_ctl.find(f"{Q}DERControlBase/{{https://csipaus.org/ns}}opModGenLimW")
    assert int(gen.findtext(f"{Q}value")) * 10 ** int(gen.findtext(f"{Q}multiplier")) == 2500
    again = c.post(f"/v1/ieee2030-5/programs/{pid}/dispatch", headers=operate,
                   json={"schedule": plan}).json()
    assert (again["created"], again["unchanged"]) == (0, 3)
    # a re-plan changes the battery's last interval: the newer event supersedes the older
    plan["p_kw"][2] = 2.0
    assert c.post(f"/v1/ieee2030-5/programs/{pid}/dispatch", headers=operate,
                  json={"schedule": plan}).json()["created"] == 1
    lst = _sep_get(repo, LFDI_1, f"/edev/{bat}/derp/{pid}/derc")
    assert sorted(e.findtext(f"{Q}EventStatus/{Q}currentStatus")
                  for e in lst.findall(f"{Q}DERControl")) == ["0", "1", "4"]
    # bad input: nothing published
    before = len(repo.controls(pid))
    bad = dict(plan, timestamp=[t.replace("+00:00", "") for t in plan["timestamp"]])
    _problem(c.post(f"/v1/ieee2030-5/programs/{pid}/dispatch", headers=operate,
                    json={"schedule": bad}), 422)
    _problem(c.post(f"/v1/ieee2030-5/programs/{pid}/dispatch", headers=operate,
                    json={"schedule": dict(plan, p_kw=plan["p_kw"][:-1])}), 422)
    _problem(c.post(f"/v1/ieee2030-5/programs/{pid}/dispatch", headers=api["read"],
                    json={"schedule": plan}), 403)
    assert len(repo.controls(pid)) == before
