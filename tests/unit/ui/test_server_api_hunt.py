"""The review server's API against requests other sites' pages make a browser send."""

from __future__ import annotations

import http.client
import shutil
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from garrison.ui.app import Listen, ReviewApp, file_source

DEMO = Path(__file__).resolve().parents[2] / "data" / "flows" / "starwars-demo.log"


@pytest.fixture
def app(tmp_path: Path) -> Iterator[ReviewApp]:
    log = tmp_path / "access.log"
    shutil.copy(DEMO, log)
    review = ReviewApp(file_source([str(log)], cache=False), Listen("127.0.0.1", 0))
    review.start()
    assert review.wait_loaded(10)
    yield review
    review.stop()


def get(app: ReviewApp, path: str, site: str | None) -> tuple[int, bytes]:
    url = urlsplit(app.listen.url)
    conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=10)
    conn.request("GET", path, headers={"Sec-Fetch-Site": site} if site else {})
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, body


@pytest.mark.parametrize(("site", "status"), [
    ("cross-site", 403), ("same-site", 403), ("same-origin", 200), ("none", 200), (None, 200),
])
def test_the_api_answers_its_own_page_and_scripts_only(
        app: ReviewApp, site: str | None, status: int) -> None:
    for path in ("/api/flows?q=--verdict+DROPPED", "/api/map?q=--verdict+DROPPED",
                 "/api/info", "/api/policy"):
        got, body = get(app, path, site)
        assert got == status, (path, body)
        if status == 403:
            assert f"another site's page made (Sec-Fetch-Site: {site})".encode() in body
    # the page itself opens from a link anywhere
    assert get(app, "/?view=flows", site)[0] == 200
