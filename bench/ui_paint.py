"""The dashboard's first paint with many registered models, measured in headless Chromium with the
Performance API (tests/browser.py): a fresh `modelium serve` whose node has room for 5, N copies
of the demo model registered and at rest (hard links, as bench/scale.py makes them), then `/ui`
opened `--repeats` times in a fresh page. For each it prints, in ms since navigation: first
contentful paint, the first page of models drawn (100 rows from one List call), and every model
listed and drawn (then pages of 1,000); then the medians, against the 1 s goal. Before that, the
API calls the page makes, timed alone: `GET /models?limit=100` and `?limit=1000`.

    .venv/bin/python bench/ui_paint.py [--models 1000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import modelium_serve  # noqa: E402
from bench.scale import ROOM_FOR, link_models  # noqa: E402
from cli.demo import write_demo_model  # noqa: E402
from modelium.analyzer import analyze_directory  # noqa: E402
from tests.browser import browser_page, first_paint  # noqa: E402

GOAL_MS = 1000.0


async def measure(url: str, repeats: int) -> list[dict[str, Any]]:
    results = []
    for _ in range(repeats):
        async with browser_page() as (page, problems):
            await page.goto(f"{url}/ui")
            results.append(await first_paint(page))
            if problems.errors:
                raise SystemExit(f"the page reported errors: {problems.errors}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="modelium-ui-") as tmp:
        workdir = Path(tmp)
        template = write_demo_model(workdir / "template")
        booking = analyze_directory(template, "probe").memory_estimates["embedded"]
        config = {
            "node": {"cpu_memory_budget_bytes": ROOM_FOR * booking + booking // 2},
            "runtimes": {"embedded": {"cpu_threads": 1}},
        }
        with modelium_serve(workdir, "ui", **config) as served, httpx.Client(timeout=600) as http:
            started = time.monotonic()
            link_models(template, served.incoming, args.models)
            while True:
                response = http.get(f"{served.url}/models")
                models = response.json()["models"] if response.status_code == 200 else []
                if len(models) == args.models and {m["phase"] for m in models} <= {"loaded", "unloaded"}:
                    break
                time.sleep(2.0)
            print(f"{args.models} models registered and at rest in {time.monotonic() - started:.1f} s", flush=True)
            for limit in (100, 1000):
                took = []
                for _ in range(5):
                    t0 = time.perf_counter()
                    assert http.get(f"{served.url}/models", params={"limit": limit}).status_code == 200
                    took.append(time.perf_counter() - t0)
                print(f"GET /models?limit={limit}: p50 {statistics.median(took) * 1000:.0f} ms", flush=True)
            results = asyncio.run(measure(served.url, args.repeats))
    for i, r in enumerate(results, 1):
        print(
            f"run {i}: first contentful paint {r['first_contentful_paint_ms']:.0f} ms, first page of models drawn "
            f"{r['models_rendered_ms']:.0f} ms, all {r['models']} listed and drawn {r['models_listed_ms']:.0f} ms"
        )
    for key, label in (
        ("first_contentful_paint_ms", "first contentful paint"),
        ("models_rendered_ms", "first page of models drawn"),
        ("models_listed_ms", f"all {args.models} models drawn"),
    ):
        median = statistics.median(r[key] for r in results)
        print(f"median {label}: {median:.0f} ms ({median / GOAL_MS:.2f} of the 1 s goal)")


if __name__ == "__main__":
    main()
