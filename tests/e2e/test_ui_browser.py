"""The review page in a real browser: Debian's chromium driven by Playwright.

`garrison ui` runs as a process on a copy of the demo's access log (written by the real demo,
tests/data/flows/starwars-demo.log) with one hostile record added, and the tests assert what a
person sees: the nodes, the colour of an edge, the L7 detail and the rule behind it, a filter
that narrows the table and is kept in the URL, follow mode showing a record appended to the
file, the rules that never matched — and that the page asked nothing of any other host.
Screenshots of the map and the flows are kept in $GARRISON_ARTIFACTS (default: a temporary
directory whose name is printed).

Playwright never downloads a browser here: only /usr/bin/chromium is used.
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "tests" / "data" / "flows" / "starwars-demo.log"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu",
                 "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-quic", "--disable-sync"]
HOSTILE_LABEL = "k8s:app=<script>window.__pwned=1</script>"
HOSTILE_POD = '<img src=x onerror="window.__pwned=2">'
UNUSED_POLICY = """\
apiVersion: "cilium.io/v2"
kind: CiliumNetworkPolicy
metadata:
  name: "rebel-base"
spec:
  endpointSelector:
    matchLabels:
      class: xwing
  ingress:
  - fromEndpoints:
    - matchLabels:
        org: alliance
"""

pytestmark = pytest.mark.e2e

try:
    from playwright.sync_api import BrowserContext, Page, expect, sync_playwright
except ImportError:  # pragma: no cover - the test extras install it
    sync_playwright = None  # type: ignore[assignment]

if sync_playwright is None:
    pytest.skip("needs the playwright package: pip install -e '.[test]'",
                allow_module_level=True)
if not CHROMIUM.exists():
    pytest.skip("needs Debian's chromium at /usr/bin/chromium: apt-get install chromium "
                "(make setup installs it)", allow_module_level=True)


def _hostile_record() -> bytes:
    lines = [json.loads(x) for x in DEMO.read_bytes().splitlines() if x.strip()]
    record: dict[str, Any] = copy.deepcopy(lines[7])  # an allowed HTTP request
    record["source"].update(identity=4242, pod_name=HOSTILE_POD, labels=[HOSTILE_LABEL])
    record["time"] = "2026-12-05T11:59:59.000000000Z"
    return json.dumps(record).encode()


def _appended_record() -> bytes:
    lines = [json.loads(x) for x in DEMO.read_bytes().splitlines() if x.strip()]
    record: dict[str, Any] = copy.deepcopy(lines[10])  # the denied PUT
    record["source"].update(pod_name="wedge-antilles", identity=4343)
    record["time"] = "2026-12-05T12:30:00.000000000Z"
    return json.dumps(record).encode()


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="gu-ui-") as d:
        yield Path(d)


@pytest.fixture(scope="module")
def log(workdir: Path) -> Path:
    path = workdir / "access.log"
    path.write_bytes(DEMO.read_bytes().rstrip(b"\n") + b"\n" + _hostile_record() + b"\n")
    return path


def start_ui(args: list[str]) -> tuple[str, subprocess.Popen[bytes]]:
    """`garrison ui ARGS` as a process on a free loopback port: its URL and the process."""
    cmd = [sys.executable, "-m", "garrison.cli.main", "ui", "--listen", "127.0.0.1:0", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO,
                            env={**os.environ, "GARRISON_PURE": "1"})
    url = ""
    deadline = time.monotonic() + 30
    assert proc.stdout is not None
    while not url and time.monotonic() < deadline:
        line = proc.stdout.readline().decode()
        if not line:
            break
        if m := re.search(r"serving (http://127\.0\.0\.1:\d+/)", line):
            url = m.group(1)
    if not url:
        stop_ui(proc)
        assert proc.stderr is not None
        pytest.fail(f"garrison ui did not start: {proc.stderr.read().decode()}")
    return url, proc


def stop_ui(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def ui(workdir: Path, log: Path) -> Iterator[str]:
    """The page over the demo's log and the example policies (plus one never matched)."""
    policy = workdir / "rebel-base.yaml"
    policy.write_text(UNUSED_POLICY)
    examples = REPO / "examples"
    url, proc = start_ui([
        "--input-file", str(log),
        "--policy", str(examples / "starwars" / "sw_l3_l4_l7_policy.yaml"),
        "--policy", str(examples / "grpc" / "doors-policy.yaml"),
        "--policy", str(examples / "kafka" / "kafka_policy.yaml"),
        "--policy", str(policy)])
    try:
        yield url
    finally:
        stop_ui(proc)


@pytest.fixture(scope="module")
def artifacts() -> Path:
    where = os.environ.get("GARRISON_ARTIFACTS")
    path = Path(where) / "ui" if where else Path(tempfile.mkdtemp(prefix="gu-artifacts-"))
    path.mkdir(parents=True, exist_ok=True)
    print(f"review page screenshots in {path}")
    return path


class Browser:
    def __init__(self, context: BrowserContext) -> None:
        self.context = context
        self.requests: list[str] = []
        self.dialogs: list[str] = []
        context.on("request", lambda r: self.requests.append(r.url))

    def page(self) -> Page:
        page = self.context.new_page()

        def dialog(d: Any) -> None:
            self.dialogs.append(d.message)
            d.dismiss()

        page.on("dialog", dialog)
        return page


@pytest.fixture(scope="module")
def browser(workdir: Path) -> Iterator[Browser]:
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(workdir / "chromium-profile"), executable_path=str(CHROMIUM), headless=True,
            args=CHROMIUM_ARGS, viewport={"width": 1500, "height": 900},
        )
        try:
            yield Browser(context)
        finally:
            context.close()


def edge(page: Page, source: str, target: str) -> Any:
    return page.locator(f'#map .edge[data-source="{source}"][data-target="{target}"]')


def test_map_shows_the_ships_and_the_rule_behind_the_denied_put(
        ui: str, browser: Browser, artifacts: Path) -> None:
    page = browser.page()
    page.goto(ui)
    names = page.locator("#map .node .name")
    expect(names.first).to_be_visible()
    shown = set(names.all_text_contents())
    assert {"deathstar", "tiefighter", "xwing", "guard", "door-manager", "kafka",
            "empire-hq", "outpost"} <= shown
    # the xwing's edge is red: every attempt was dropped
    xwing = edge(page, "default/258", "default/256")
    expect(xwing).to_have_class(re.compile(r"\bdropped\b"))
    colour = xwing.locator("path.line").evaluate("p => getComputedStyle(p).stroke")
    assert colour == "rgb(220, 38, 38)"
    assert xwing.locator("text").text_content() == "2 drop"  # two attempts, SYNs sent twice
    # the tiefighter's edge: counts, the L7 detail and the rule
    tiefighter = edge(page, "default/257", "default/256")
    expect(tiefighter).to_have_class(re.compile(r"\bmixed\b"))
    tiefighter.locator("path.hit").click(force=True)
    detail = page.locator("#map-detail")
    expect(detail.locator("h3").first).to_have_text("tiefighter → deathstar")
    expect(detail.locator(".edge-counts")).to_contain_text("5 fwd · 1 drop")
    put = detail.locator("table.l7 tr", has_text="http PUT /v1/exhaust-port")
    expect(put.locator(".answers")).to_have_text("403 ×1")
    expect(detail.locator(".edge-rules .rule")).to_have_text(
        ["CiliumNetworkPolicy default/rule1 ingress[0]"])
    page.screenshot(path=str(artifacts / "map.png"), full_page=True)
    # the link goes to the edge's flows
    detail.locator("a.flows-link").click()
    expect(page).to_have_url(re.compile(r"view=flows&q=--from-namespace"))
    rows = page.locator("#flows tbody tr")
    expect(rows.first).to_be_visible()
    assert all("tiefighter" in text for text in
               page.locator("#flows tbody tr td:nth-child(2)").all_text_contents())
    page.close()


def test_filter_narrows_the_table_and_is_kept_in_the_url(
        ui: str, browser: Browser, artifacts: Path) -> None:
    page = browser.page()
    page.goto(ui + "?view=flows")
    rows = page.locator("#flows tbody tr")
    expect(rows.first).to_be_visible()
    everything = rows.count()
    page.locator("#filter").fill("--verdict DROPPED --to-pod deathstar-2")
    page.locator("#filter").press("Enter")
    expect(page).to_have_url(re.compile(r"q=--verdict\+DROPPED\+--to-pod\+deathstar-2"))
    expect(rows).to_have_count(1)
    expect(rows.locator("td:nth-child(7)")).to_have_text(
        "HTTP/1.1 PUT http://198.18.0.3/v1/exhaust-port")
    assert everything > 1
    rows.first.click()
    expect(page.locator("#flow-detail .policy")).to_have_text(
        "ingress denied by CiliumNetworkPolicy default/rule1 ingress[0]")
    expect(page.locator("#flow-detail pre")).to_contain_text('"drop_reason_desc": '
                                                             '"POLICY_DENIED"')
    page.screenshot(path=str(artifacts / "flows.png"), full_page=True)
    # a shared link opens the same view
    shared = browser.page()
    shared.goto(page.url)
    expect(shared.locator("#filter")).to_have_value("--verdict DROPPED --to-pod deathstar-2")
    expect(shared.locator("#flows tbody tr")).to_have_count(1)
    # a bad filter is named, not a blank page
    shared.locator("#filter").fill("--verdict SOMETIMES")
    shared.locator("#filter").press("Enter")
    expect(shared.locator("#filter-error")).to_contain_text("--verdict 'SOMETIMES'")
    page.close()
    shared.close()


def test_follow_shows_a_record_appended_to_the_file(ui: str, browser: Browser,
                                                    log: Path) -> None:
    page = browser.page()
    page.goto(ui + "?view=flows&q=--verdict+DROPPED")
    expect(page.locator("#flows tbody tr").first).to_be_visible()
    page.locator("#follow").check()
    expect(page.locator("#flows-status")).to_have_text("Following new records…")
    with log.open("ab") as f:
        f.write(_appended_record() + b"\n")
    first = page.locator("#flows tbody tr").first
    expect(first.locator("td:nth-child(2)")).to_contain_text("wedge-antilles", timeout=2000)
    page.close()


def test_policy_review_lists_the_rules_never_matched(ui: str, browser: Browser) -> None:
    page = browser.page()
    page.goto(ui + "?view=policy")
    rules = page.locator("#rules tbody tr td.rule")
    expect(rules.first).to_be_visible()
    assert "CiliumNetworkPolicy default/rule1 ingress[0]" in rules.all_text_contents()
    expect(page.locator("#never li")).to_contain_text(
        ["CiliumNetworkPolicy default/rebel-base ingress[0]"])
    page.close()


def test_hostile_strings_are_shown_as_text_never_run(ui: str, browser: Browser) -> None:
    page = browser.page()
    page.goto(ui)
    node = page.locator('#map .node[data-id="default/4242"]')
    expect(node).to_be_visible()
    expect(node.locator("text.sub").last).to_have_text("app=<script>window.__pwned=1</script>")
    node.click()
    expect(page.locator("#map-detail .chip")).to_have_text(
        ["app=<script>window.__pwned=1</script>"])
    page.goto(ui + "?view=flows&q=--from-identity+4242")
    expect(page.locator("#flows tbody tr td:nth-child(2)")).to_contain_text(HOSTILE_POD)
    assert page.evaluate("window.__pwned") is None
    assert page.locator("#flows img, #map-detail img, #map-detail script").count() == 0
    assert browser.dialogs == []
    page.close()


def test_broken_lines_and_an_empty_log(workdir: Path, browser: Browser) -> None:
    broken = workdir / "broken.log"
    demo = DEMO.read_bytes().splitlines()
    broken.write_bytes(b"\n".join([demo[0], b"garbage {", demo[1][:50], b"[1, 2]", *demo[2:4]])
                       + b"\n")
    empty = workdir / "empty.log"
    empty.write_bytes(b"")
    for path, note, rows in ((broken, "3 records, 3 nodes, 2 edges; 3 lines were no flow "
                              "record and were skipped", 3),
                             (empty, "No flow records in this log yet.", 0)):
        # the skipped lines are not counted as records (they were: "3 shown of 6 records")
        source = f"{path} · {rows} records" + (" · 3 lines skipped" if rows else "")
        url, proc = start_ui(["--input-file", str(path)])
        try:
            page = browser.page()
            page.goto(url)
            expect(page.locator("#map-note")).to_have_text(note)
            page.goto(url + "?view=flows")
            expect(page.locator("#flows-status")).to_have_text(f"{rows} shown of {rows} records")
            expect(page.locator("#flows tbody tr")).to_have_count(rows)
            expect(page.locator("#source")).to_have_text(source)
            page.close()
        finally:
            stop_ui(proc)


def test_ten_thousand_endpoints_are_grouped(workdir: Path, browser: Browser) -> None:
    template = json.loads(DEMO.read_bytes().splitlines()[0])
    path = workdir / "many.log"
    with path.open("w") as f:
        for i in range(10_000):
            record = copy.deepcopy(template)
            record["source"].update(identity=10_000 + i, pod_name=f"client-{i}",
                                    namespace=f"team-{i % 20}",
                                    labels=[f"k8s:app=client-{i}"])
            f.write(json.dumps(record) + "\n")
    url, proc = start_ui(["--input-file", str(path)])
    try:
        page = browser.page()
        started = time.monotonic()
        page.goto(url)
        expect(page.locator("#map-note")).to_contain_text("grouped by namespace")
        assert time.monotonic() - started < 5
        expect(page.locator("#map .node")).to_have_count(21)  # 20 teams and default
        edges = page.locator("#map .edge")
        expect(edges).to_have_count(20)
        assert set(edges.locator("text").all_text_contents()) == {"500 fwd"}
        page.close()
    finally:
        stop_ui(proc)


def _fake_agent(socket: Path, ring: Any) -> Any:
    """The agent's API as `garrison ui --socket` reads it, over `ring` (a real socket)."""
    from garrison.agent.api import AgentAPIServer
    from garrison.flows.query import FlowQuery

    def flows(req: dict[str, Any]) -> dict[str, Any]:
        batch = ring.tail(int(req.get("limit", 100)), FlowQuery.from_dict({}).compile())
        return {"flows": [r.to_json() for r in batch.records], "cursor": batch.cursor}

    def flows_since(req: dict[str, Any]) -> dict[str, Any]:
        batch = ring.since(int(req.get("cursor", 0)))
        return {"flows": [r.to_json() for r in batch.records], "cursor": batch.cursor,
                "missed": batch.missed}

    server = AgentAPIServer(socket, {"Flows": flows, "FlowsSince": flows_since,
                                     "PolicyGet": lambda _: {"policies": []}})
    server.start()
    return server


def test_the_page_says_when_the_agent_is_gone_and_when_it_is_back(
        workdir: Path, browser: Browser) -> None:
    """The page over an agent that stopped kept showing what it had, with nothing to say the
    agent was gone (the error was only in /api/info, which the page read once): it now says
    so on its source line, and that it is back once the agent answers again; and when the
    page's own server is gone (`garrison agent --ui` stopped), it says that."""
    from garrison.flows.record import FlowRecord
    from garrison.flows.store import FlowStore as Ring

    records = [FlowRecord.from_json(x) for x in DEMO.read_bytes().splitlines() if x.strip()]
    socket = workdir / "gone" / "agent.sock"
    ring = Ring()
    ring.extend(records[:5])
    server = _fake_agent(socket, ring)
    url, proc = start_ui(["--socket", str(socket)])
    try:
        page = browser.page()
        page.goto(url + "?view=flows")
        source = page.locator("#source")
        expect(source).to_have_text(f"agent at {socket} · 5 records · policies: the agent's "
                                    "policies")
        server.stop(grace=0)
        expect(source).to_contain_text(f"no agent socket at {socket}", timeout=15_000)
        ring.extend(records[5:8])
        server = _fake_agent(socket, ring)
        expect(source).to_have_text(f"agent at {socket} · 8 records · policies: the agent's "
                                    "policies", timeout=20_000)
        stop_ui(proc)
        expect(source).to_contain_text("the review server does not answer", timeout=15_000)
        page.close()
    finally:
        server.stop(grace=0)
        stop_ui(proc)


def test_no_request_left_loopback(ui: str, browser: Browser) -> None:
    """Runs last in this module: every request the pages made in all the tests above went to
    the servers the tests started on 127.0.0.1."""
    assert browser.requests, "no request recorded"
    assert any(url.startswith(ui) for url in browser.requests)
    others = [url for url in browser.requests if urlsplit(url).hostname != "127.0.0.1"]
    assert others == []


def test_control_and_bidi_characters_read_as_escapes(workdir: Path, browser: Browser) -> None:
    """A path or a name is the client's: U+202E would show the rest of it reversed
    ('/v1/\u202etrop-tsuahxe' read as '/v1/exhaust-port'), ESC and newlines vanished. The
    page shows them as `garrison observe` prints them."""
    log = workdir / "bidi.log"
    record = json.loads(DEMO.read_bytes().splitlines()[0])
    record["source"]["pod_name"] = "tie\x1b[1mfighter\nfake"
    record["Summary"] = "HTTP/1.1 GET /v1/\u202etrop-tsuahxe"
    log.write_text(json.dumps(record) + "\n")
    url, proc = start_ui(["--input-file", str(log)])
    try:
        page = browser.page()
        page.goto(url)
        expect(page.locator("#map .node text.name")).to_contain_text(
            ["tie\\x1b[1mfighter\\nfake"])
        page.goto(url + "?view=flows")
        cells = page.locator("#flows tbody tr").first.locator("td")
        expect(cells.nth(1)).to_contain_text("tie\\x1b[1mfighter\\nfake")
        expect(cells.last).to_have_text("HTTP/1.1 GET /v1/\\u202etrop-tsuahxe")
        page.locator("#flows tbody tr").first.click()
        expect(page.locator("#flow-detail pre")).to_contain_text(
            '"Summary": "HTTP/1.1 GET /v1/\\u202etrop-tsuahxe"')
        page.close()
    finally:
        stop_ui(proc)
