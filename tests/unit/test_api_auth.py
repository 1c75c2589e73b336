import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient

from derms.api import problems
from derms.api.auth import Principal, new_token, require
from derms.errors import InputError, ModelError


@pytest.fixture
def client():
    app = FastAPI()
    problems.install(app)
    tokens = {}
    app.state.token_lookup = tokens.get

    @app.get("/read")
    def read(p: Principal = Depends(require("read"))):
        return {"scope": p.scope}

    @app.post("/operate")
    def operate(p: Principal = Depends(require("operate"))):
        return {"ok": True}

    @app.get("/boom/{kind}")
    def boom(kind: str):
        raise {"input": InputError("bad value 7"), "model": ModelError("unknown bus 'x'"),
               "other": RuntimeError("secret internals")}[kind]

    def mint(scope):
        text, rec = new_token(scope)
        tokens[rec.token_id] = rec
        return {"Authorization": f"Bearer {text}"}

    c = TestClient(app, raise_server_exceptions=False)
    c.mint = mint
    return c


def test_scopes(client):
    reader, operator = client.mint("read"), client.mint("operate")
    assert client.get("/read", headers=reader).json() == {"scope": "read"}
    assert client.get("/read", headers=operator).status_code == 200
    r = client.post("/operate", headers=reader)
    assert r.status_code == 403 and r.headers["content-type"] == "application/problem+json"
    assert client.post("/operate", headers=operator).status_code == 200


@pytest.mark.parametrize("header", [None, "Basic abc", "Bearer nonsense", "Bearer derms_x_y",
                                    "Bearer derms__y"])
def test_missing_or_wrong_token_is_401(client, header):
    headers = {"Authorization": header} if header else {}
    r = client.get("/read", headers=headers)
    assert r.status_code == 401
    body = r.json()
    assert body["status"] == 401 and body["instance"] == "/read"
    assert "Bearer" in r.headers["www-authenticate"]


def test_wrong_secret_for_known_id(client):
    good = client.mint("admin")["Authorization"]
    bad = good[: good.rindex("_") + 1] + "tampered"
    assert client.get("/read", headers={"Authorization": bad}).status_code == 401


def test_domain_errors_become_problems(client):
    r = client.get("/boom/input")
    assert r.status_code == 422 and r.json()["detail"] == "bad value 7"
    assert client.get("/boom/model").status_code == 404
    r = client.get("/boom/other")
    assert r.status_code == 500 and "secret" not in r.text
