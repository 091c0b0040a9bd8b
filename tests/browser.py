"""A real browser for the dashboard's tests and benchmark: Debian's Chromium (`apt-get install
chromium`; scripts/setup.sh installs it where it can), headless, driven by Playwright's async API
pointed at it with `executable_path` (Playwright downloads no browser of its own)."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import ROOT

CHROMIUM = os.environ.get("MODELIUM_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
# As root, Chromium needs --no-sandbox; the others keep it from reaching for Google's services
# (this machine has no network beyond loopback and the package registries).
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = ROOT / "tests" / "artifacts"


def require_chromium() -> None:
    """Skip without a Chromium, except under CI, where its absence is a failure."""
    if Path(CHROMIUM).exists():
        return
    message = f"no Chromium at {CHROMIUM}: `apt-get install chromium` (scripts/setup.sh does it as root)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@dataclass
class Problems:
    """What the page said went wrong: uncaught errors and console errors."""

    errors: list[str] = field(default_factory=list)

    def console(self, message: Any) -> None:
        if message.type == "error":
            self.errors.append(f"console: {message.text}")


@contextlib.asynccontextmanager
async def browser_page(width: int = 1600, height: int = 1000) -> AsyncIterator[tuple[Any, Problems]]:
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = await browser.new_page(viewport={"width": width, "height": height})
            problems = Problems()
            page.on("pageerror", lambda exc: problems.errors.append(f"page: {exc}"))
            page.on("console", problems.console)
            yield page, problems
        finally:
            await browser.close()


FIRST_PAINT_JS = """() => {
  const paint = Object.fromEntries(performance.getEntriesByType('paint').map(e => [e.name, e.startTime]));
  const mark = (name) => { const m = performance.getEntriesByName(name)[0]; return m ? m.startTime : null; };
  return {first_paint_ms: paint['first-paint'] ?? null,
          first_contentful_paint_ms: paint['first-contentful-paint'] ?? null,
          models_rendered_ms: mark('modelium-models-rendered'),
          models_listed_ms: mark('modelium-models-listed'),
          models: document.getElementById('model-count').textContent,
          rows: document.querySelectorAll('.row.model').length};
}"""


async def first_paint(page: Any) -> dict[str, Any]:
    """The page's paint timings (Performance API): first (contentful) paint, when the first page of
    models was drawn, and when every page was listed and drawn (milliseconds since navigation)."""
    await page.wait_for_function("() => performance.getEntriesByName('modelium-models-listed').length > 0")
    return await page.evaluate(FIRST_PAINT_JS)  # type: ignore[no-any-return]
