"""The review page against other web sites, in a real browser (Debian's chromium, Playwright).

A page of another site that the operator happens to open can make the browser send requests
to the review server on 127.0.0.1 (an `<img>`, a no-cors `fetch`): it cannot read the answers,
but the server did the work, and with `garrison agent --ui` that work runs in the agent's
process, beside the proxy (a filtered scan of 200,000 records is about 1.5 s of CPU). The
other site here is `localhost` (a site other than `127.0.0.1` for the browser)."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_ui_browser import CHROMIUM, CHROMIUM_ARGS, DEMO, start_ui, stop_ui

os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")

from playwright.sync_api import expect, sync_playwright

pytestmark = pytest.mark.e2e


@contextlib.contextmanager
def other_site(html: str) -> Iterator[str]:
    body = html.encode()

    class Page(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://localhost:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_another_site_cannot_make_the_server_work_but_can_link_to_the_page(
        tmp_path: Path) -> None:
    demo = [x for x in DEMO.read_bytes().splitlines() if x.strip()]
    log = tmp_path / "access.log"
    copies = demo * (100_000 // len(demo))
    log.write_bytes(b"\n".join(copies) + b"\n")
    url, proc = start_ui(["--input-file", str(log), "--no-cache"])
    scans = [f"{url}api/flows?q=--http-path+nomatch{i}&limit=1000" for i in range(3)]
    html = (f'<img src="{scans[0]}"><script>fetch("{scans[1]}", {{mode: "no-cors"}});'
            f'fetch("{scans[2]}", {{mode: "no-cors"}});</script>'
            f'<a id="go" href="{url}?view=flows&q=--verdict+DROPPED">the review</a>')
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=str(CHROMIUM), headless=True,
            args=CHROMIUM_ARGS)
        try:
            with other_site(html) as evil:
                page = context.new_page()
                page.goto(url)  # the page loaded, the log read
                expect(page.locator("#map-note")).to_contain_text(f"{len(copies)} records")
                asked: list[str] = []
                page.on("request", lambda r: asked.append(r.url))
                before = cpu_s(proc.pid)
                page.goto(evil)
                page.wait_for_load_state("networkidle")
                assert sorted(u for u in asked if u.startswith(url)) == sorted(scans)
                spent = cpu_s(proc.pid) - before
                assert spent < 0.5, f"the other site's requests cost the server {spent:.1f} s"
                # a link from another site still opens the page, which works as ever
                page.click("#go")
                expect(page.locator("#flows tbody tr").first).to_be_visible()
                expect(page.locator("#filter-error")).to_have_text("")
                page.close()
        finally:
            context.close()
            stop_ui(proc)
