"""`garrison agent --audit --ui 127.0.0.1:0`: the review page of a live agent, in a real browser.

The Star Wars L7 policy is in force in audit mode: the xwing's connection and the tiefighter's
`PUT /v1/exhaust-port` are let through and recorded as AUDIT. The page (Debian's chromium driven
by Playwright, never a downloaded browser) shows the ships on the map, the xwing's edge as
audited, and in the policy review what enforcing would deny, with rule1 behind it; follow mode
shows a new request within 2 s.
"""

from __future__ import annotations

import os
import re
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from .agent_harness import (  # noqa: F401 (fixtures)
    STARWARS,
    AgentProcess,
    fixture_agent,
    fixture_clean,
    http_request,
)

os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")

pytestmark = pytest.mark.privileged

AGENT_ARGS = ("--audit", "--ui", "127.0.0.1:0")
L7 = STARWARS / "sw_l3_l4_l7_policy.yaml"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu",
                 "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-quic", "--disable-sync"]

try:
    from playwright.sync_api import BrowserContext, expect, sync_playwright
except ImportError:  # pragma: no cover - the test extras install it
    pytest.skip("needs the playwright package: pip install -e '.[test]'",
                allow_module_level=True)
if not CHROMIUM.exists():
    pytest.skip("needs Debian's chromium at /usr/bin/chromium: apt-get install chromium "
                "(make setup installs it)", allow_module_level=True)


def page_url(agent: AgentProcess) -> str:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if m := re.search(r"review page on (http://127\.0\.0\.1:\d+/)", agent.log()):
            return m.group(1)
        time.sleep(0.1)
    raise AssertionError(f"the agent logged no review page:\n{agent.log()}")


def in_browser(check: Callable[[BrowserContext], None]) -> None:
    """Run `check` with a fresh chromium in a thread of its own: Playwright's sync API keeps an
    event loop running on its thread, which pyroute2 (the harness) cannot share."""
    failure: list[BaseException] = []

    def run() -> None:
        try:
            with tempfile.TemporaryDirectory(prefix="gu-chromium-") as profile, \
                    sync_playwright() as p:
                context = p.chromium.launch_persistent_context(
                    profile, executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
                    viewport={"width": 1500, "height": 900})
                try:
                    check(context)
                finally:
                    context.close()
        except BaseException as exc:  # re-raised in the test's thread
            failure.append(exc)

    thread = threading.Thread(target=run, name="gu-browser")
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive(), "the browser did not finish in 120 s"
    if failure:
        raise failure[0]


def test_live_agent_page_shows_what_enforcing_would_deny(agent: AgentProcess,
                                                         clean: None) -> None:
    ds = agent.add_endpoint("uds", "org=empire,class=deathstar", 191)
    tie = agent.add_endpoint("utie", "org=empire,class=tiefighter", 192)
    xwing = agent.add_endpoint("uxw", "org=alliance,class=xwing", 193)
    agent.deathstar(ds)
    agent.import_file(L7)
    done = agent.exec_in(xwing, "curl", "-s", "-m", "3", "-X", "POST",
                         f"http://{ds.ip}/v1/request-landing")
    assert (done.returncode, done.stdout) == (0, b"Ship landed\n")
    sock = tie.connect(ds.ip, 80)
    assert sock is not None
    with sock:
        assert http_request(sock, "PUT", "/v1/exhaust-port")[0] == 503  # audit: the app answers
    url = page_url(agent)

    def check(browser: BrowserContext) -> None:
        requests: list[str] = []
        browser.on("request", lambda r: requests.append(r.url))
        page = browser.new_page()

        # the map: the three ships, the xwing's edge audited (L3/L4 policy would drop it)
        page.goto(url)
        expect(page.locator(f'#map .node[data-id="default/{xwing.identity}"]')).to_be_visible()
        names = set(page.locator("#map .node .name").all_text_contents())
        assert {ds.name, tie.name, xwing.name} <= names, names
        edge = page.locator(f'#map .edge[data-source="default/{xwing.identity}"]'
                            f'[data-target="default/{ds.identity}"]')
        expect(edge).to_have_class(re.compile(r"\baudit\b"))

        # the policy review: what enforcing would deny, and the rule behind it
        page.goto(url + "?view=policy")
        row = page.locator("#audited tr", has_text="http PUT /v1/exhaust-port")
        expect(row).to_contain_text(tie.name)
        expect(row).to_contain_text("CiliumNetworkPolicy default/rule1 ingress[0]")
        expect(page.locator("#audited tr", has_text=xwing.name)).to_contain_text("l4 TCP/80")

        # follow mode: a new request shows within 2 s
        page.goto(url + "?view=flows&q=--http-method+DELETE")
        expect(page.locator("#flows-status")).to_contain_text("shown of")
        page.locator("#follow").check()
        expect(page.locator("#flows-status")).to_have_text("Following new records…")
        sock = tie.connect(ds.ip, 80)
        assert sock is not None
        with sock:
            http_request(sock, "DELETE", "/v1/exhaust-port")
        first: Any = page.locator("#flows tbody tr").first
        expect(first.locator("td:nth-child(7)")).to_contain_text("DELETE", timeout=2000)
        expect(first.locator("td:nth-child(6)")).to_have_text("AUDIT")
        page.close()
        assert requests and all(u.startswith(url) for u in requests), requests

    in_browser(check)
