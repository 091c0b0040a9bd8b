"""New versions of a loaded model (orchestration.updates), against real embedded runtimes and
the session's Temporal dev server: a client loop runs through each update and gets no error.

- blue/green: the new version (other weights, another layer) is loaded beside
  the serving one, checked, switched to; the old one drains and goes; its booking with it;
- a broken new version (truncated weights, then a malformed config) never takes the model
  down: it stays `loaded`, answering as before, and shows `update_failed` with the reason;
  putting the serving files back clears it;
- no room beside it: the model is recreated, and requests are held meanwhile, not refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from temporalio.testing import WorkflowEnvironment

from cli.demo import write_demo_model
from modelium.analyzer import analyze_directory
from tests.bad_models import BROKEN
from tests.helpers import make_settings, metric_value, runtime_pids, serving_model, unique, wait_for

pytestmark = pytest.mark.slow

BODY = {"prompt": "Hello there", "max_tokens": 6, "temperature": 0}


def replace_files(source: Path, target: Path) -> None:
    """Put `source`'s files in `target`, each by an atomic rename (as a deploy tool would), with
    their times: the same files put back are the same version (the watcher's fingerprint)."""
    for path in sorted(source.rglob("*")):
        if path.is_file():
            dest = target / path.relative_to(source)
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.new")
            shutil.copy2(path, tmp)
            os.replace(tmp, dest)


class Clients:
    """Two clients sending completions one after another, and one streaming, until stopped."""

    def __init__(self, http: httpx.AsyncClient, name: str) -> None:
        self.http, self.name = http, name
        self.answers: list[tuple[float, int, str]] = []
        self.streams: list[tuple[int, str]] = []
        self.stopping = False

    async def _complete(self) -> None:
        while not self.stopping:
            response = await self.http.post("/v1/completions", json={"model": self.name, **BODY})
            # Versions are told apart by the runtime's system_fingerprint (a hash of their files).
            text = response.json()["system_fingerprint"] if response.status_code == 200 else response.text
            self.answers.append((asyncio.get_running_loop().time(), response.status_code, text))

    async def _stream(self) -> None:
        while not self.stopping:
            body = {"model": self.name, "prompt": "Once", "max_tokens": 200, "stream": True}
            async with self.http.stream("POST", "/v1/completions", json=body) as response:
                content = (await response.aread()).decode()
            ok = response.status_code == 200 and "[DONE]" in content and '"error"' not in content
            self.streams.append((response.status_code if ok else 599, content[-300:]))

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Clients]:
        tasks = [asyncio.create_task(self._complete()) for _ in range(2)] + [asyncio.create_task(self._stream())]
        try:
            yield self
        finally:
            self.stopping = True
            await asyncio.gather(*tasks)

    def failures(self) -> list[Any]:
        return [a for a in self.answers if a[1] != 200] + [s for s in self.streams if s[0] != 200]


async def answer(http: httpx.AsyncClient, name: str) -> str:
    response = await http.post("/v1/completions", json={"model": name, **BODY})
    assert response.status_code == 200, response.text
    return response.json()["system_fingerprint"]  # type: ignore[no-any-return]


async def model(http: httpx.AsyncClient, name: str) -> dict[str, Any]:
    response = await http.get(f"/models/{name}")
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


async def test_blue_green_switch_and_broken_versions_with_no_failed_request(
    temporal_env: WorkflowEnvironment, demo_models: dict[str, Path], tmp_path: Path
) -> None:
    settings = make_settings(tmp_path, orchestration={"updates": {"drain_seconds": 20}})
    name = unique("upd")
    v2 = write_demo_model(tmp_path / "v2", seed=1, layers=3)
    async with serving_model(settings, temporal_env.client, demo_models["text-generation"], name) as (running, http):
        served = settings.watch_directories[0] / name
        before = await model(http, name)
        old_answer = await answer(http, name)
        [old_pid] = runtime_pids(name)
        clients = Clients(http, name)
        async with clients.running():
            await wait_for(lambda: len(clients.answers) >= 5 and clients.streams, 60, what="clients under way")
            replace_files(v2, served)

            async def switched() -> dict[str, Any] | None:
                now = await model(http, name)
                return now if now["switched_at"] and now["update_state"] is None else None

            after = await wait_for(switched, 120, what="the switch to the new version")
            switched_at = asyncio.get_running_loop().time()
            await wait_for(lambda: len([a for a in clients.answers if a[0] > switched_at]) >= 10, 60)
        assert clients.failures() == [], clients.failures()[:5]
        new_answer = await answer(http, name)
        assert new_answer != old_answer
        texts = [text for _, _, text in clients.answers]
        assert old_answer in texts and new_answer in texts
        assert {text for at, _, text in clients.answers if at > switched_at + 1} == {new_answer}
        # The model stayed loaded; the new version is the serving one, under a key of its own.
        assert after["phase"] == "loaded" and after["fingerprint"] != before["fingerprint"]
        assert after["update_count"] == 1 and after["load_count"] == before["load_count"] + 1
        # The old version drained and went; only the new one's booking is left.
        await wait_for(lambda: old_pid not in runtime_pids(name), 60, what="the old runtime gone")
        [new_pid] = runtime_pids(name)
        assert new_pid != old_pid
        bookings = [b.model for b in running.node.ledger.bookings() if b.model.startswith(name)]
        assert bookings == [f"{name}@u1"], bookings
        metrics = (await http.get(f"http://127.0.0.1:{running.metrics_port}/metrics")).text
        assert metric_value(metrics, "modelium_model_updates_total", model=name, result="switched") == 1.0

        # Broken new versions: the serving one stays, and says why the new one was not taken.
        good = tmp_path / "good"
        shutil.copytree(served, good)
        for kind in ("truncated-weights", "malformed-json"):
            break_it, words = BROKEN[kind]
            broken = tmp_path / kind
            shutil.copytree(good, broken)
            break_it(broken)
            clients = Clients(http, name)
            async with clients.running():
                replace_files(broken, served)

                state = await wait_for(
                    lambda words=words: _failed_with(http, name, words), 120, what=f"update_failed for {kind}"
                )
                await wait_for(lambda clients=clients: len(clients.answers) >= 10, 60)
            assert clients.failures() == [], clients.failures()[:5]
            assert state["phase"] == "loaded" and state["fingerprint"] == after["fingerprint"]
            assert await answer(http, name) == new_answer
            # The serving files back: the failed update is over.
            replace_files(good, served)
            await wait_for(
                lambda: _cleared(http, name), 60, what="update_failed cleared once the serving files are back"
            )
        metrics = (await http.get(f"http://127.0.0.1:{running.metrics_port}/metrics")).text
        assert metric_value(metrics, "modelium_model_updates_total", model=name, result="failed") == 2.0
        assert runtime_pids(name) == [new_pid]


async def _failed_with(http: httpx.AsyncClient, name: str, words: str) -> dict[str, Any] | None:
    now = await model(http, name)
    return now if now["update_state"] == "update_failed" and words in (now["update_error"] or "") else None


async def _cleared(http: httpx.AsyncClient, name: str) -> bool:
    return (await model(http, name))["update_state"] is None


async def test_no_room_beside_it_recreates_and_holds_requests(
    temporal_env: WorkflowEnvironment, demo_models: dict[str, Path], tmp_path: Path
) -> None:
    booking = analyze_directory(demo_models["text-generation"], "probe").memory_estimates["embedded"]
    settings = make_settings(tmp_path, node={"id": unique("node"), "cpu_memory_budget_bytes": int(booking * 1.5)})
    name = unique("tight")
    v2 = write_demo_model(tmp_path / "v2", seed=1, layers=3)
    async with serving_model(settings, temporal_env.client, demo_models["text-generation"], name) as (running, http):
        old_answer = await answer(http, name)
        clients = Clients(http, name)
        clients._stream = clients._complete  # type: ignore[method-assign]  # held requests: plain ones
        async with clients.running():
            await wait_for(lambda: len(clients.answers) >= 5, 60)
            replace_files(v2, settings.watch_directories[0] / name)

            async def reloaded() -> dict[str, Any] | None:
                now = await model(http, name)
                return now if now["phase"] == "loaded" and now["load_count"] == 2 else None

            await wait_for(reloaded, 120, what="the model recreated with its new version")
            await wait_for(lambda: len(clients.answers) >= 20, 60)
        assert clients.failures() == [], clients.failures()[:5]
        assert await answer(http, name) != old_answer
        metrics = (await http.get(f"http://127.0.0.1:{running.metrics_port}/metrics")).text
        assert metric_value(metrics, "modelium_model_updates_total", model=name, result="recreated") == 1.0
