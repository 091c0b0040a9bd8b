"""`/ui` in a real browser (headless Debian Chromium driven by Playwright, tests/browser.py),
against `serve`'s composition, the session's Temporal dev server and embedded runtimes:

- a dropped model's row appears and goes to `loaded` live (phases seen on the page, not after a
  reload), its booking drawn in its node's memory bar;
- unload clicked: the API reports `unloaded`, and the row follows;
- load clicked: a progress bar (estimated against the last load) and the runtime's own progress
  line in the activity feed, then `loaded`;
- a broken model's error in its row, the whole of it in the detail panel;
- the detail panel: decision, runtime log tail, the Temporal UI link; request charts; search,
  phase filter, sorting;
- with API keys: the page asks for one, keeps it in session storage, and shows management
  buttons to admin keys only.

The first paint and the first drawn page of models are measured with the Performance API and
printed (`-s`); `bench/ui_paint.py` measures them with 1,000 registered models. A screenshot for
review is written to tests/artifacts/ (not committed).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from temporalio.testing import WorkflowEnvironment

from modelium.keys import digest, new_key
from tests.bad_models import BROKEN
from tests.browser import ARTIFACTS, browser_page, first_paint, require_chromium
from tests.helpers import copy_model, make_settings, modelium_http, unique, wait_phase

pytestmark = pytest.mark.slow

# Records, in the page, every phase (and progress bar) the row of one model is drawn with.
RECORD_JS = """(name) => {
  window.__seen = [];
  const rows = document.getElementById('rows');
  const look = () => {
    const row = rows.querySelector(`.row.model[data-model="${CSS.escape(name)}"]`);
    if (!row) return;
    const bar = row.querySelector('.progress > div');
    const entry = {phase: row.dataset.phase, width: bar ? bar.style.width : null,
                   title: bar ? bar.parentElement.title : null};
    const last = window.__seen[window.__seen.length - 1];
    if (!last || last.phase !== entry.phase || last.width !== entry.width) window.__seen.push(entry);
  };
  new MutationObserver(look).observe(rows, {childList: true, subtree: true, attributes: true});
  look();
}"""


def row(page: Any, name: str) -> Any:
    return page.locator(f'.row.model[data-model="{name}"]')


async def test_dashboard_follows_and_manages_the_fleet(
    temporal_env: WorkflowEnvironment, demo_models: dict[str, Path], tmp_path: Path
) -> None:
    require_chromium()
    from playwright.async_api import expect

    settings = make_settings(tmp_path)
    incoming = settings.watch_directories[0]
    name, broken = unique("dash"), unique("broken")
    break_it, broken_words = BROKEN["malformed-json"]
    async with modelium_http(settings, temporal_env.client) as (running, http), browser_page() as (page, problems):
        base = f"http://127.0.0.1:{running.gateway_port}"
        response = await page.goto(f"{base}/ui")
        assert response.status == 200
        assert "script-src 'self'" in response.headers["content-security-policy"]
        paint = await first_paint(page)
        print(f"\n/ui with {paint['rows']} models: {paint}")
        assert paint["first_contentful_paint_ms"] is not None
        # The node announces itself: its memory bar is drawn, nothing booked yet.
        node = page.locator(f'.node[data-node="{settings.node.id}"]')
        await expect(node).to_be_visible(timeout=30_000)
        await expect(page.locator("#conn")).to_have_text("events: live", timeout=30_000)

        # Dropped: the row appears on its own and goes to loaded, through the phases before it.
        await page.evaluate(RECORD_JS, name)
        copy_model(demo_models["text-generation"], incoming / name)
        await expect(row(page, name)).to_have_attribute("data-phase", "loaded", timeout=120_000)
        seen = await page.evaluate("window.__seen")
        assert [s["phase"] for s in seen][-1] == "loaded" and len({s["phase"] for s in seen}) > 1, seen
        await expect(row(page, name).locator(".runtime")).to_have_text("embedded")
        await expect(row(page, name).locator(".idle")).to_have_text(re.compile(r"unloads in \d+:\d\d"))
        await expect(node.locator(f'.seg[data-model="{name}"]')).to_be_visible(timeout=30_000)

        # Unload clicked: the API says unloaded, and the row follows.
        await row(page, name).locator("button.unload").click()
        await wait_phase(http, name, "unloaded", timeout=60)
        await expect(row(page, name)).to_have_attribute("data-phase", "unloaded", timeout=30_000)
        await expect(node.locator(f'.seg[data-model="{name}"]')).to_have_count(0, timeout=30_000)

        # Load clicked: a progress bar against the last load time, the runtime's own line, loaded.
        await page.evaluate(RECORD_JS, name)
        await row(page, name).locator("button.load").click()
        await expect(row(page, name).locator(".progress")).to_be_visible(timeout=30_000)
        await expect(row(page, name)).to_have_attribute("data-phase", "loaded", timeout=120_000)
        seen = await page.evaluate("window.__seen")
        estimated = [s for s in seen if s["width"] not in (None, "", "0%")]
        assert estimated and all(re.search(r"s of ~[\d.]+s", s["title"]) for s in estimated), seen
        runtime_line = page.locator(f'#activity li[data-kind="load_progress"][data-model="{name}"]')
        # (the runtime's lines: "embedded runtime: importing …", then "… loading <name> …")
        said = re.compile(r"embedded runtime|embedded_server")
        await expect(runtime_line.first).to_contain_text(said, timeout=10_000)

        # Requests are charted from the gateway's own ring.
        for _ in range(5):
            body = {"model": name, "prompt": "Hello", "max_tokens": 2}
            assert (await http.post("/v1/completions", json=body)).status_code == 200
        await expect(page.locator(f'#charts .chart[data-model="{name}"]')).to_contain_text("p50", timeout=30_000)

        # The detail: decision, log tail from the node, the workflow in the Temporal UI.
        await row(page, name).locator(".name").click()
        await expect(page.locator("#detail-name")).to_have_text(name)
        await expect(page.locator("#detail-fields")).to_contain_text("embedded transformers runtime")
        await expect(page.locator("#detail-log")).to_contain_text(f"loaded {name}", timeout=30_000)
        link = page.locator("#detail-fields a.temporal-link")
        assert (await link.get_attribute("href")).endswith(f"/namespaces/default/workflows/modelium-model-{name}")

        # A broken model: its error in its row, all of it in the detail.
        target = copy_model(demo_models["text-generation"], tmp_path / "staging" / broken)
        break_it(target)
        target.rename(incoming / broken)
        await expect(row(page, broken)).to_have_attribute("data-phase", "failed", timeout=120_000)
        await expect(row(page, broken).locator(".error")).to_contain_text(broken_words)
        await row(page, broken).locator(".name").click()
        await expect(page.locator("#detail-error")).to_contain_text(broken_words)

        # Search, filter by phase, sort.
        await page.fill("#search", broken)
        await expect(page.locator(".row.model")).to_have_count(1)
        await page.fill("#search", "")
        await page.select_option("#phase-filter", "loaded")
        await expect(page.locator(".row.model")).to_have_count(1)
        await expect(page.locator(".row.model").first).to_have_attribute("data-model", name)
        await page.select_option("#phase-filter", "")
        await page.click('#table-head button[data-sort="name"]')  # name, descending
        first = sorted([name, broken])[-1]
        await expect(page.locator(".row.model").first).to_have_attribute("data-model", first)

        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        await page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
        assert not problems.errors, problems.errors


ADMIN_KEY, VIEWER_KEY = new_key(), new_key()


async def test_dashboard_asks_for_a_key_and_keeps_it_for_the_tab(
    temporal_env: WorkflowEnvironment, demo_models: dict[str, Path], tmp_path: Path
) -> None:
    require_chromium()
    from playwright.async_api import expect

    keys = [
        {"name": "ops", "organization": "acme", "sha256": digest(ADMIN_KEY), "scopes": ["admin"]},
        {"name": "viewer", "organization": "beta", "sha256": digest(VIEWER_KEY)},
    ]
    settings = make_settings(tmp_path, gateway={"port": 0, "api_keys": keys})
    name = unique("keyed")
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with modelium_http(settings, temporal_env.client) as (running, http), browser_page() as (page, problems):
        copy_model(demo_models["text-generation"], settings.watch_directories[0] / name)
        await wait_phase(http, name, "loaded", headers=admin)
        await page.goto(f"http://127.0.0.1:{running.gateway_port}/ui")
        dialog = page.locator("#key-dialog")
        await expect(dialog).to_be_visible()
        await expect(page.locator("#key-reason")).to_contain_text("requires an API key")

        # A key without the admin scope: the fleet, no buttons, no runtime log.
        await page.fill("#key-input", VIEWER_KEY)
        await page.click("#key-save")
        await expect(page.locator("#who")).to_have_text("viewer (beta)")
        await expect(row(page, name)).to_have_attribute("data-phase", "loaded", timeout=30_000)
        await expect(row(page, name).locator("button")).to_have_count(0)
        assert await page.evaluate("sessionStorage.getItem('modelium.apiKey')") == VIEWER_KEY
        await row(page, name).locator(".name").click()
        await expect(page.locator("#detail-log")).to_have_text("runtime logs need an admin key")

        # Kept for the tab: a reload asks nothing.
        await page.reload()
        await expect(page.locator("#who")).to_have_text("viewer (beta)")
        await expect(dialog).to_be_hidden()

        # A wrong key is refused by name; the admin key brings the buttons.
        await page.click("#key-button")
        await page.fill("#key-input", "mdl-not-a-key")
        await page.click("#key-save")
        await expect(page.locator("#key-reason")).to_contain_text("not valid")
        await page.fill("#key-input", ADMIN_KEY)
        await page.click("#key-save")
        await expect(page.locator("#who")).to_have_text("ops (acme), admin")
        await expect(row(page, name).locator("button.unload")).to_be_visible(timeout=30_000)
        # 401s answered to the wrong key are the page's only complaints.
        assert all("401" in e for e in problems.errors), problems.errors
