"""The review server over HTTP on loopback: headers, read-only, Host check, API answers."""

from __future__ import annotations

import http.client
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import pytest

from garrison.ui.app import Listen, ReviewApp, UIError, file_source, parse_listen

DEMO = Path(__file__).resolve().parents[2] / "data" / "flows" / "starwars-demo.log"


@pytest.fixture
def app(tmp_path: Path) -> Iterator[ReviewApp]:
    log = tmp_path / "access.log"
    shutil.copy(DEMO, log)
    review = ReviewApp(file_source([str(log)]), Listen("127.0.0.1", 0))
    review.start()
    assert review.wait_loaded(10)
    yield review
    review.stop()


def get(app: ReviewApp, path: str, method: str = "GET",
        host: str | None = None) -> tuple[int, dict[str, str], bytes]:
    url = urlsplit(app.listen.url)
    conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=10)
    headers = {"Host": host} if host else {}
    conn.request(method, path, headers=headers)
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, body


def get_json(app: ReviewApp, path: str) -> Any:
    status, _, body = get(app, path)
    assert status == 200, body
    return json.loads(body)


def test_page_and_assets_carry_the_content_security_policy(app: ReviewApp) -> None:
    for path in ("/", "/static/app.js", "/static/style.css", "/api/info"):
        status, headers, _ = get(app, path)
        assert status == 200, path
        assert headers["content-security-policy"].startswith("default-src 'self'")
        assert headers["x-content-type-options"] == "nosniff"


def test_read_only_and_no_files_outside_static(app: ReviewApp) -> None:
    for method in ("POST", "PUT", "DELETE"):
        assert get(app, "/api/info", method)[0] == 405
    for path in ("/static/../server.py", "/static/%2e%2e/server.py", "/static/store.py",
                 "/etc/passwd"):
        assert get(app, path)[0] == 404, path


def test_other_host_names_are_refused(app: ReviewApp) -> None:
    status, _, body = get(app, "/api/info", host=f"attacker.example:{app.listen.port}")
    assert status == 403
    assert b"not this server's address" in body
    assert get(app, "/api/info", host=f"localhost:{app.listen.port}")[0] == 200


def test_map_flows_and_policy(app: ReviewApp) -> None:
    data = get_json(app, "/api/map")
    assert data["records"] == 81
    assert {n["name"] for n in data["nodes"]} >= {"deathstar", "tiefighter", "xwing"}
    page = get_json(app, "/api/flows?limit=5&q=" + quote("--verdict DROPPED --http-status 403"))
    assert [f["summary"] for f in page["flows"]] == [
        "HTTP/1.1 403 0ms (PUT http://198.18.0.3/v1/exhaust-port)"]
    row = page["flows"][0]
    assert row["arrow"] == "<-"  # a reply, shown from the initiator as observe does
    assert row["source"] == "default/tiefighter:35746 (ID:257)"
    assert row["policies"] == ["ingress denied by CiliumNetworkPolicy default/rule1 ingress[0]"]
    filtered = get_json(app, "/api/map?q=" + quote("--from-pod xwing"))
    assert [e["state"] for e in filtered["edges"]] == ["dropped"]
    policy = get_json(app, "/api/policy")
    assert policy["never_matched"] is None
    assert {r["name"] for r in policy["rules"]} == {"rule1", "door-manager",
                                                     "secure-empire-kafka"}


def test_bad_filter_is_a_400_naming_the_flag(app: ReviewApp) -> None:
    status, _, body = get(app, "/api/flows?q=" + quote("--verdict SOMETIMES"))
    assert status == 400
    assert json.loads(body)["error"].startswith("--verdict 'SOMETIMES'")
    assert get(app, "/api/flows?before=abc")[0] == 400


def test_listen_is_loopback_unless_allowed() -> None:
    assert parse_listen("127.0.0.1:12000", False) == Listen("127.0.0.1", 12000)
    assert parse_listen("[::1]:0", False) == Listen("::1", 0)
    with pytest.raises(UIError, match="--allow-remote"):
        parse_listen("0.0.0.0:12000", False)
    assert parse_listen("0.0.0.0:12000", True).host == "0.0.0.0"
    with pytest.raises(UIError, match="HOST:PORT"):
        parse_listen("12000", False)
