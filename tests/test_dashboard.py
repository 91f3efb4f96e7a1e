"""The web dashboard in a real browser: Chromium (Debian's, driven by Playwright) against a
real `llmos serve` on the default model. What a user relies on: signing in with a key, live
charts, a playground answer that streams, the requests table steering a running request
(suspend takes its KV out of the pool, resume lets it finish), the process table, tenant
isolation, and manners (no console errors, phone width, dark theme).

With LLMOS_SCREENSHOTS=DIR the run saves a screenshot of every tab there (docs/img)."""

from __future__ import annotations

import json
import os
import re
import shutil
import textwrap
import threading
import time
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from test_server import MODEL, LongStream, ServerProcess

TABS = ["overview", "memory", "requests", "tenants", "processes", "playground"]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Chromium logs every HTTP error response to the console; a refused key is one on purpose.
REFUSED_KEY = "Failed to load resource: the server responded with a status of 401"
# The test machine is small and shared: give the UI time to catch the next sample.
expect.set_options(timeout=15_000)


@pytest.fixture(scope="module")
def dash(tmp_path_factory, default_model_path):
    s = ServerProcess(tmp_path_factory.mktemp("dashboard"), engine={"scheduling_policy": "fair"},
                      server={"kill_grace": 1.0})
    s.acme = s.create_key("acme", priority=2)
    s.globex = s.create_key("globex", weight=2)
    yield s
    assert s.stop() == 0, s.log.read_text()


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.fail("chromium is not installed: run `make setup` (or `apt-get install chromium`); "
                    "the dashboard is tested in Debian's Chromium, Playwright's own download cannot work here")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


class Dashboard:
    """Browser pages on the dashboard, each with the console errors and page errors it logged."""

    def __init__(self, browser: Browser, server: ServerProcess) -> None:
        self.browser, self.server = browser, server
        self.contexts: list = []
        self.errors: dict[int, list[str]] = {}

    def open(self, key: str | None = None, tab: str | None = None, width: int = 1280, height: int = 860,
             color_scheme: str = "light") -> Page:
        ctx = self.browser.new_context(viewport={"width": width, "height": height}, color_scheme=color_scheme)
        self.contexts.append(ctx)
        if key:    # signed in before: the key is in this tab's sessionStorage
            ctx.add_init_script(f"sessionStorage.setItem('llmos.key', {json.dumps(key)})")
        page = ctx.new_page()
        errors = self.errors.setdefault(id(page), [])
        page.on("console", lambda m: errors.append(f"console.{m.type}: {m.text} at {m.location.get('url')}")
                if m.type in ("error", "warning") else None)
        page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
        page.goto(self.server.url + "/" + (f"#{tab}" if tab else ""))
        if key:
            expect(page.locator("#app")).to_be_visible()
            expect(page.locator("#conn")).to_have_class(re.compile(r"\blive\b"), timeout=10_000)
        return page

    def errors_of(self, page: Page) -> list[str]:
        return self.errors[id(page)]

    def close(self) -> list[str]:
        for ctx in self.contexts:
            ctx.close()
        return [e for errs in self.errors.values() for e in errs]


@pytest.fixture
def ui(browser, dash):
    d = Dashboard(browser, dash)
    yield d
    assert d.close() == [], "the dashboard logged errors"


def shots_dir(tmp_path: Path) -> Path:
    d = Path(os.environ.get("LLMOS_SCREENSHOTS") or tmp_path / "shots")
    d.mkdir(parents=True, exist_ok=True)
    return d


def stat_value(page: Page, label: str) -> str:
    return page.locator(".stat", has=page.locator(".label", has_text=label)).locator(".value").inner_text()


def blocks_of(page: Page, request_id: str) -> int:
    return page.locator(f'#kv-grid .blk[data-request="{request_id}"]').count()


class Background:
    """A long streaming chat read to its end on a thread: the request the tests steer."""

    def __init__(self, server: ServerProcess, key: str, max_tokens: int) -> None:
        self.server = server
        self.stream = LongStream(server, key, max_tokens=max_tokens)
        self.request_id = self.stream.request_id
        self.chunks, self.finish = 0, None
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            while (e := self.stream.next_event()) != "[DONE]":
                if e.get("choices"):
                    self.chunks += bool(e["choices"][0]["delta"].get("content"))
                    self.finish = e["choices"][0].get("finish_reason") or self.finish
        except Exception as exc:          # closed under it: the test has its answer already
            self.finish = self.finish or f"error: {exc!r}"

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)

    def close(self) -> None:
        if self.thread.is_alive():   # cancel through the kernel: a suspended request writes nothing,
            with self.server.http() as http:    # so it would not notice its client leave
                http.post(f"/v1/kernel/requests/{self.request_id}/cancel")
        self.stream.close()
        self.thread.join(10)


# -- tests -------------------------------------------------------------------------------------

def test_sign_in_with_a_key_and_watch_live_samples(ui, dash):
    page = ui.open()
    expect(page.locator("#signin-key")).to_be_visible()
    expect(page.locator("#app")).to_be_hidden()
    page.get_by_label("API key").fill("sk-llmos-this-is-not-a-key")
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#signin-error")).to_contain_text("not accepted")
    expect(page.locator("#app")).to_be_hidden()

    page.get_by_label("API key").fill(dash.admin_key)
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#app")).to_be_visible()
    expect(page.locator("#who")).to_contain_text("admin")
    expect(page.get_by_role("tab", name="Overview")).to_have_attribute("aria-selected", "true")
    assert page.evaluate("sessionStorage.getItem('llmos.key')") == dash.admin_key
    assert dash.admin_key not in page.evaluate("JSON.stringify(localStorage)")

    # samples keep arriving over the feed (no reload): the charts' last point moves on
    chart = page.locator("#chart-tokens")
    expect(chart).to_have_attribute("data-last", re.compile(r"\d"), timeout=10_000)
    first = float(chart.get_attribute("data-last"))
    page.wait_for_function("t => Number(document.querySelector('#chart-tokens').dataset.last) >= t + 2", arg=first,
                           timeout=10_000)
    assert int(chart.get_attribute("data-points")) >= 2
    assert re.fullmatch(r"\d+(\.\d)?% CPU", stat_value(page, "Server"))
    assert "of 364 blocks" in page.locator(".stat", has_text="KV pool").inner_text()

    # sign out forgets the key; the only errors were the refused key's (and the probe before it)
    page.get_by_role("button", name="Sign out").click()
    expect(page.locator("#signin-key")).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('llmos.key')") is None
    errors = ui.errors_of(page)
    assert errors and all(REFUSED_KEY in e and "/v1/dashboard/whoami" in e for e in errors), errors
    errors.clear()


def test_playground_streams_an_answer_with_ttft_and_tokens_per_s(ui):
    page = ui.open(ui.server.admin_key, tab="playground")
    expect(page.get_by_label("Model")).to_have_value(MODEL)
    page.get_by_label("Temperature").fill("0")
    page.get_by_label("max_tokens").fill("40")
    page.get_by_label("ignore EOS").check()
    page.get_by_label("Message").fill("Tell me a story about a robot who learns to paint.")
    page.get_by_role("button", name="Send").click()
    answer = page.locator(".msg.assistant").last
    lengths = []
    deadline = time.monotonic() + 60
    while answer.get_attribute("data-done") is None and time.monotonic() < deadline:
        lengths.append(len(answer.inner_text()))
        time.sleep(0.03)
    grew = [n for i, n in enumerate(lengths) if n > 0 and (i == 0 or n > lengths[i - 1])]
    assert len(grew) >= 3, f"the answer did not stream: lengths seen {lengths}"
    assert len(answer.inner_text()) > 20
    assert re.fullmatch(r"\d+(\.\d+)? (ms|s)", page.locator("#pg-ttft").inner_text())
    assert float(page.locator("#pg-tps").inner_text()) > 0
    assert page.locator("#pg-tokens").inner_text() == "40"
    assert page.locator("#pg-finish").inner_text() == "length"

    # JSON-schema mode: the grammar keeps the answer valid JSON of the schema
    page.get_by_role("button", name="Clear").click()
    page.get_by_label("ignore EOS").uncheck()
    page.get_by_label("JSON-schema mode").check()
    page.get_by_label("JSON schema").fill(json.dumps({
        "type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"]}))
    page.get_by_label("Message").fill("Is the sky blue? Answer in JSON.")
    page.get_by_label("Message").press("Enter")
    answer = page.locator(".msg.assistant").last
    expect(answer).to_have_attribute("data-done", "1", timeout=60_000)
    expect(answer.locator(".valid")).to_have_text("✓ valid JSON")
    text = answer.inner_text().replace("✓ valid JSON", "")
    assert json.loads(text)["answer"] in ("yes", "no")


def test_requests_table_suspends_and_resumes_a_running_request(ui, dash):
    run = Background(dash, dash.acme, max_tokens=160)
    rid = run.request_id
    try:
        page = ui.open(dash.admin_key, tab="requests")
        row = page.locator(f'#requests-body tr[data-request="{rid}"]')
        expect(row).to_be_visible(timeout=10_000)
        cells = row.locator("td")
        expect(cells.nth(1)).to_have_text("acme")
        expect(cells.nth(2)).to_have_text("2")                   # the acme key's priority
        expect(cells.nth(3)).to_have_text("running", timeout=10_000)
        # the overview sees the work too
        page.get_by_role("tab", name="Overview").click()
        page.wait_for_function("() => parseFloat([...document.querySelectorAll('.stat')].find(s => "
                               "s.textContent.startsWith('Output tokens/s')).querySelector('.value').textContent) > 0",
                               timeout=10_000)
        assert int(stat_value(page, "Requests running")) >= 1

        page.get_by_role("tab", name="Memory").click()
        page.wait_for_function(f"() => document.querySelectorAll('#kv-grid .blk[data-request=\"{rid}\"]').length > 0")
        held = blocks_of(page, rid)
        assert page.locator('#kv-grid .blk[data-tenant="acme"]').count() >= held
        assert "acme" in page.locator("#kv-legend").inner_text()

        page.get_by_role("tab", name="Requests").click()
        row.get_by_role("button", name=f"Suspend request {rid}").click()
        expect(cells.nth(3)).to_have_text("suspended", timeout=10_000)
        expect(row.get_by_role("button", name=f"Resume request {rid}")).to_be_enabled()
        page.get_by_role("tab", name="Memory").click()
        page.wait_for_function(f"() => document.querySelectorAll('#kv-grid .blk[data-request=\"{rid}\"]').length == 0",
                               timeout=10_000)
        page.get_by_role("tab", name="Requests").click()
        frozen = cells.nth(5).inner_text()
        time.sleep(1.5)
        assert cells.nth(5).inner_text() == frozen, "a suspended request kept generating"
        assert run.thread.is_alive()

        # admin may renice; acme's own key may not go below its key's priority
        row.get_by_label(f"Priority for {rid}").fill("5")
        row.get_by_role("button", name=f"Set priority of request {rid}").click()
        expect(cells.nth(2)).to_have_text("5", timeout=10_000)
        mine = ui.open(dash.acme, tab="requests")
        own = mine.locator(f'#requests-body tr[data-request="{rid}"]')
        expect(own).to_be_visible()
        own.get_by_label(f"Priority for {rid}").fill("0")
        own.get_by_role("button", name=f"Set priority of request {rid}").click()
        expect(own.locator(".row-error")).to_contain_text("more urgent than this key allows")
        ui.errors_of(mine)[:] = [e for e in ui.errors_of(mine) if "status of 403" not in e]

        row.get_by_role("button", name=f"Resume request {rid}").click()
        expect(cells.nth(3)).to_have_text(re.compile("running|waiting"), timeout=10_000)
        page.get_by_role("tab", name="Memory").click()
        page.wait_for_function(f"() => document.querySelectorAll('#kv-grid .blk[data-request=\"{rid}\"]').length > 0",
                               timeout=10_000)

        # another tenant sees acme's blocks only as "other tenants", and none of its rows
        other = ui.open(dash.globex, tab="memory")
        other.wait_for_function("() => document.querySelectorAll('#kv-grid .blk.hidden-owner').length > 0",
                                timeout=10_000)
        assert other.locator('#kv-grid .blk[data-tenant="acme"], #kv-grid .blk[data-request]').count() == 0
        assert "acme" not in other.locator("#panel-memory").inner_text()
        other.get_by_role("tab", name="Requests").click()
        expect(other.locator("#requests-empty")).to_be_visible()
        assert other.locator("#requests-body tr").count() == 0
        other.get_by_role("tab", name="Tenants").click()
        assert "acme" not in other.locator("#panel-tenants").inner_text()
        # ...while acme's own key sees its row
        mine.get_by_role("tab", name="Requests").click()
        expect(own).to_be_visible()

        run.join(90)
        assert run.finish == "length", run.finish
        assert run.chunks >= 150
        page.get_by_role("tab", name="Requests").click()
        expect(row).to_have_count(0, timeout=10_000)
    finally:
        run.close()


AGENT_PARENT = """
    import time
    from llmos import agent
    print("parent", agent.pid, "up", flush=True)
    agent.spawn("child.py", name="painter", caps=["llm"])
    time.sleep(120)
"""
AGENT_CHILD = """
    import time
    from llmos import agent
    try:
        agent.fs.write("canvas.txt", "paint")
    except agent.PermissionDenied as e:
        print("denied:", e.capability, flush=True)
    time.sleep(120)
"""


def test_processes_tab_steers_agents_and_filters_the_audit_log(ui, dash, tmp_path):
    tmp_path.chmod(0o755)             # the jailed agents run as their tenant's uid
    (tmp_path / "parent.py").write_text(textwrap.dedent(AGENT_PARENT))
    (tmp_path / "child.py").write_text(textwrap.dedent(AGENT_CHILD))
    with dash.http() as http:
        r = http.post("/v1/processes", json={"path": str(tmp_path / "parent.py"), "name": "easel"})
        assert r.status_code == 201, r.text
        parent = r.json()["pid"]
    page = ui.open(dash.admin_key, tab="processes")
    prow = page.locator(f'#ps-body tr[data-pid="{parent}"]')
    expect(prow).to_be_visible()
    expect(prow.locator("td").nth(12)).to_have_text("jail/rlimits")     # how it is confined
    expect(page.locator("#ps-confinement")).to_have_text(re.compile("agents confined"))
    expect(page.locator("#ps-unconfined")).to_be_hidden()
    child_row = page.locator("#ps-body tr", has=page.locator("td", has_text="painter"))
    expect(child_row).to_be_visible(timeout=20_000)
    child = int(child_row.get_attribute("data-pid"))
    expect(child_row.locator(".tree")).to_have_text(re.compile("└"))      # drawn under its parent
    order = page.locator("#ps-body tr").evaluate_all("rs => rs.map(r => Number(r.dataset.pid))")
    assert order.index(child) == order.index(parent) + 1                    # the child's row follows its parent's

    child_row.get_by_role("button", name=f"Show logs of process {child}").click()
    expect(page.locator("#logs")).to_contain_text("denied: fs:write:canvas.txt", timeout=20_000)
    page.get_by_label("Denied calls only").check()
    verdicts = page.locator("#audit-body td:nth-child(5)")
    expect(verdicts.filter(has_not_text="denied")).to_have_count(0)   # the filtered table has replaced the full one
    expect(page.locator("#audit-body")).to_contain_text("fs.write")
    assert set(verdicts.all_inner_texts()) == {"denied"}
    page.get_by_label("Denied calls only").uncheck()
    expect(page.locator("#audit-body")).to_contain_text("proc.spawn")

    prow.get_by_role("button", name=f"Suspend process {parent}").click()
    expect(prow.locator(".state")).to_have_text(re.compile("^suspended"))
    prow.get_by_role("button", name=f"Resume process {parent}").click()
    expect(prow.locator(".state")).not_to_have_text(re.compile("^suspended"))
    prow.get_by_label(f"Priority for process {parent}").fill("3")
    prow.get_by_label(f"Weight for process {parent}").fill("2")
    prow.get_by_role("button", name=f"Renice process {parent}").click()
    expect(prow.locator("td").nth(4)).to_have_text("3")
    expect(prow.locator("td").nth(5)).to_have_text("2")
    child_row.get_by_role("button", name=f"Kill process {child}").click()
    expect(child_row).to_have_count(0, timeout=20_000)         # exited ones are hidden by default
    page.get_by_label("Show exited processes").check()
    expect(child_row.locator(".state")).to_have_text("killed", timeout=10_000)
    expect(child_row.get_by_role("button", name=f"Kill process {child}")).to_be_disabled()


def test_every_tab_renders_at_phone_width_and_in_dark(ui, dash, tmp_path):
    # some work for the pictures: two tenants generating, a third request swapped out,
    # a finished playground answer
    runs = [Background(dash, key, max_tokens=300) for key in (dash.acme, dash.globex, dash.globex)]
    try:
        with dash.http() as http:
            assert http.post(f"/v1/kernel/requests/{runs[2].request_id}/suspend").json()["state"] == "suspended"
        page = ui.open(dash.admin_key, tab="playground")
        page.get_by_label("Temperature").fill("0")
        page.get_by_label("max_tokens").fill("24")
        page.get_by_label("Message").fill("Name three colours.")
        page.get_by_role("button", name="Send").click()
        expect(page.locator(".msg.assistant").last).to_have_attribute("data-done", "1", timeout=60_000)
        page.get_by_role("tab", name="Tenants").click()
        page.wait_for_function("() => document.querySelectorAll('#tenants-body tr[data-tenant]').length >= 2",
                               timeout=10_000)
        # the requests table sorts by a column, both ways
        page.get_by_role("tab", name="Requests").click()
        expect(page.locator("#requests-body tr")).to_have_count(3, timeout=10_000)
        tenants = page.locator("#requests-body tr td:nth-child(2)")
        page.get_by_role("button", name="Tenant", exact=True).click()
        assert tenants.all_inner_texts() == ["acme", "globex", "globex"]
        page.get_by_role("button", name="Tenant", exact=True).click()
        assert tenants.all_inner_texts() == ["globex", "globex", "acme"]
        expect(page.locator("#requests-table th[data-key=tenant]")).to_have_attribute("aria-sort", "descending")
        shots = shots_dir(tmp_path)
        for tab in TABS:
            page.get_by_role("tab", name=tab.capitalize()).click()
            expect(page.locator(f"#panel-{tab}")).to_be_visible()
            if tab == "processes":       # the agents the test before left: a parent and its killed child
                page.get_by_label("Show exited processes").check()
                page.locator("#ps-body tr").first.get_by_role("button", name=re.compile("Show logs")).click()
                expect(page.locator("#ps-body .tree")).to_have_count(1)
            page.wait_for_timeout(500)
            page.screenshot(path=str(shots / f"{tab}.png"))

        # dark: the toggle flips the page's colours and remembers the choice
        light_bg = page.evaluate("getComputedStyle(document.body).backgroundColor")
        page.get_by_role("button", name="Switch to dark theme").click()
        assert page.evaluate("document.documentElement.dataset.theme") == "dark"
        assert luminance(page.evaluate("getComputedStyle(document.body).backgroundColor")) < 0.1 < luminance(light_bg)
        page.reload()
        expect(page.get_by_role("button", name="Switch to light theme")).to_be_visible()
        page.get_by_role("button", name="Switch to light theme").click()
        assert luminance(page.evaluate("getComputedStyle(document.body).backgroundColor")) > 0.5

        # a phone, which prefers dark: every tab fits its width (wide tables scroll inside their
        # box), and every control on it has an accessible name
        phone = ui.open(dash.admin_key, width=375, height=740, color_scheme="dark")
        assert luminance(phone.evaluate("getComputedStyle(document.body).backgroundColor")) < 0.1
        for tab in TABS:
            phone.get_by_role("tab", name=tab.capitalize()).click()
            expect(phone.locator(f"#panel-{tab}")).to_be_visible()
            phone.wait_for_timeout(300)
            overflow = phone.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
            assert overflow <= 0, f"{tab} is {overflow}px wider than a phone"
            assert phone.evaluate(UNNAMED_CONTROLS) == [], tab
        phone.get_by_role("tab", name="Memory").click()
        assert phone.locator("#kv-grid .blk").count() == 364
        phone.screenshot(path=str(shots / "phone-dark.png"), full_page=True)
        grid = phone.locator("#kv-grid").bounding_box()
        assert grid["x"] >= 0 and grid["x"] + grid["width"] <= 375
    finally:
        for r in runs:
            r.close()


UNNAMED_CONTROLS = """() => [...document.querySelectorAll('button, input, select, textarea')]
    .filter(e => !e.closest('[hidden]') && !(e.labels && e.labels.length) && !e.getAttribute('aria-label')
                 && !e.textContent.trim())
    .map(e => e.outerHTML.slice(0, 80))"""


def luminance(css: str) -> float:
    r, g, b = (int(x) / 255 for x in re.findall(r"\d+", css)[:3])
    return 0.2126 * r + 0.7152 * g + 0.0722 * b
