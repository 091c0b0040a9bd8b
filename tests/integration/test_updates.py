"""New versions of a loaded model (orchestration.updates), against real embedded runtimes and
the session's Temporal dev server: a client loop runs through each update and gets no error.

- blue/green: the new version (other weights, another layer) is loaded beside
  the serving one, checked, switched to; the old one drains and goes; its booking with it;
- a broken new version (truncated weights, then a malformed config, then one that loads but
  fails its smoke check) never takes the model down: it stays `loaded`, answering as before,
  and shows `update_failed` with the reason; putting the serving files back clears it;
- no room beside it: the model is recreated, and requests are held meanwhile, not refused;
- numbered version folders (the highest complete one serves), a symlink swapped to another
  release, and rollback (API and CLI) to the version served before; files replaced in place
  leave nothing to roll back to.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from temporalio.testing import WorkflowEnvironment

from cli.demo import write_demo_model
from modelium.analyzer import analyze_directory
from modelium.names import workflow_id
from modelium.types import ModelSource
from modelium.watcher import fingerprint
from tests.bad_models import BROKEN
from tests.helpers import make_settings, metric_value, modelium_http, runtime_pids, serving_model, unique, wait_for
from workers.watch import WorkflowBridge
from workflows.contracts import EnsureLoadedRequest
from workflows.lifecycle import ModelLifecycleWorkflow

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
        # Both versions were booked at once, and the device never past its room (the journal).
        journal = running.node.ledger.journal()
        capacity = running.node.ledger.capacities["cpu"]
        assert all(e["booked"]["cpu"] <= capacity for e in journal)
        ops = [(e["op"], e["model"]) for e in journal if e["model"].startswith(name) and e["op"] != "resize"]
        assert ops.index(("reserve", f"{name}@u1")) < ops.index(("release", name)), ops
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
        # A version that loads but fails its smoke check (here the model's own, from modelium.yaml,
        # expecting a status the runtime does not answer): stopped, the serving one stays.
        check = "smoke:\n  path: /v1/completions\n  body: {prompt: Hi, max_tokens: 1}\n  status: 418\n"
        (served / "modelium.yaml").write_text(check)
        state = await wait_for(lambda: _failed_with(http, name, "not 418"), 120, what="the smoke check failing")
        assert "smoke check failed" in state["update_error"] and state["fingerprint"] == after["fingerprint"]
        await wait_for(lambda: runtime_pids(name) == [new_pid], 60, what="the new instance stopped")
        assert await answer(http, name) == new_answer
        (served / "modelium.yaml").unlink()
        await wait_for(lambda: _cleared(http, name), 60, what="update_failed cleared")
        metrics = (await http.get(f"http://127.0.0.1:{running.metrics_port}/metrics")).text
        assert metric_value(metrics, "modelium_model_updates_total", model=name, result="failed") == 3.0
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


async def test_a_recreated_version_that_fails_to_load_falls_back_to_the_one_before(
    temporal_env: WorkflowEnvironment, demo_models: dict[str, Path], tmp_path: Path
) -> None:
    """No room beside it, and the new numbered version loads badly: the version before it (its
    folder still there) serves again, `update_failed` says why, and no client request failed."""
    good = demo_models["text-generation"]
    booking = analyze_directory(good, "probe").memory_estimates["embedded"]
    settings = make_settings(tmp_path, node={"id": unique("node"), "cpu_memory_budget_bytes": int(booking * 1.5)})
    name = unique("fallback")
    incoming = settings.watch_directories[0]
    incoming.mkdir(parents=True)
    stage = tmp_path / "stage"
    shutil.copytree(good, stage / name / "1")
    (stage / name).rename(incoming / name)
    async with modelium_http(settings, temporal_env.client) as (running, http):
        await wait_for(lambda: _loaded(http, name), 120, what=f"{name} loaded")
        served = await answer(http, name)
        clients = Clients(http, name)
        clients._stream = clients._complete  # type: ignore[method-assign]  # held requests: plain ones
        async with clients.running():
            await wait_for(lambda: len(clients.answers) >= 5, 60)
            broken = stage / "2"
            shutil.copytree(good, broken)
            config = json.loads((broken / "config.json").read_text())
            config["n_embd"] *= 2  # analyzed fine; the load refuses weights of other shapes
            (broken / "config.json").write_text(json.dumps(config))
            broken.rename(incoming / name / "2")

            async def fell_back() -> dict[str, Any] | None:
                now = await model(http, name)
                done = now["phase"] == "loaded" and now["update_state"] == "update_failed" and now["load_count"] == 2
                return now if done else None

            state = await wait_for(fell_back, 180, what="version 1 serving again")
            await wait_for(lambda: len(clients.answers) >= 20, 60)
        assert clients.failures() == [], clients.failures()[:5]
        assert state["version"] == "1" and "load failed" in state["update_error"], state
        assert "ignore_mismatched_sizes" in state["update_error"]
        assert await answer(http, name) == served
        metrics = (await http.get(f"http://127.0.0.1:{running.metrics_port}/metrics")).text
        assert metric_value(metrics, "modelium_model_updates_total", model=name, result="failed") == 1.0


def link(target: Path, at: Path) -> None:
    """Point the symlink `at` to `target` in one rename (`ln -sfn` done atomically)."""
    tmp = at.with_name(f".{at.name}.link")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, at)


async def switched_to(http: httpx.AsyncClient, name: str, count: int, **expected: str) -> dict[str, Any]:
    async def reached() -> dict[str, Any] | None:
        now = await model(http, name)
        done = now["update_count"] >= count and now["update_state"] is None and now["phase"] == "loaded"
        return now if done and all(str(now.get(k)).endswith(v) for k, v in expected.items()) else None

    return await wait_for(reached, 120, what=f"{name} switched to {expected}")


async def test_numbered_versions_symlinked_releases_and_rollback(
    temporal_env: WorkflowEnvironment, demo_models: dict[str, Path], tmp_path: Path
) -> None:
    settings = make_settings(tmp_path, orchestration={"updates": {"drain_seconds": 5}})
    incoming = settings.watch_directories[0]
    incoming.mkdir(parents=True)
    v1 = demo_models["text-generation"]
    v2 = write_demo_model(tmp_path / "v2", seed=1, layers=3)
    v3 = write_demo_model(tmp_path / "v3", seed=2)
    numbered, linked, plain = unique("numbered"), unique("linked"), unique("plain")
    # Numbered versions: 1/ and 2/ (the highest complete one serves).
    stage = tmp_path / "stage" / numbered
    shutil.copytree(v1, stage / "1")
    shutil.copytree(v2, stage / "2")
    stage.rename(incoming / numbered)
    # Releases outside the watched folder, the model's folder a symlink to one of them.
    releases = tmp_path / "releases"
    shutil.copytree(v1, releases / "r1")
    shutil.copytree(v2, releases / "r2")
    (releases / "r2" / "modelium.yaml").write_text("idle_timeout_seconds: 1234\n")
    link(releases / "r1", incoming / linked)
    shutil.copytree(v1, incoming / plain)
    async with modelium_http(settings, temporal_env.client) as (running, http):
        for name in (numbered, linked, plain):
            await wait_for(lambda name=name: _loaded(http, name), 120, what=f"{name} loaded")
        first = await model(http, numbered)
        assert first["version"] == "2" and first["serving_path"].endswith(f"{numbered}/2"), first
        fp_v1, fp_v2 = await answer(http, linked), await answer(http, numbered)
        assert fp_v1 != fp_v2
        nothing = await http.post(f"/models/{numbered}/rollback")
        assert nothing.status_code == 409 and "no previous version" in nothing.json()["error"]["message"]

        # A new numbered version: switched to; rollback (from the CLI) serves 2 again; 4 ends the hold.
        shutil.copytree(v3, tmp_path / "stage" / "3")
        (tmp_path / "stage" / "3").rename(incoming / numbered / "3")
        third = await switched_to(http, numbered, 1, version="3")
        assert third["rollback_to"] == "version 2" and await answer(http, numbered) not in (fp_v1, fp_v2)
        # (a child process awaited, not waited for: this loop runs Modelium too)
        cli = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "cli",
            "rollback",
            numbered,
            "--url",
            str(http.base_url),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        said = (await asyncio.wait_for(cli.communicate(), 300))[0].decode()
        assert cli.returncode == 0 and "serves version 2" in said, said
        back = await model(http, numbered)
        assert back["version"] == "2" and back["rollback_to"] == "version 3" and await answer(http, numbered) == fp_v2
        shutil.copytree(v1, tmp_path / "stage" / "4")
        (tmp_path / "stage" / "4").rename(incoming / numbered / "4")
        await switched_to(http, numbered, 3, version="4")
        assert await answer(http, numbered) == fp_v1

        # A symlink swapped to another release: one change, switched to; rolled back to r1.
        assert (await model(http, linked))["serving_path"].endswith("releases/r1")
        link(releases / "r2", incoming / linked)
        swapped = await switched_to(http, linked, 1, serving_path="releases/r2")
        assert swapped["rollback_to"].endswith("releases/r1") and await answer(http, linked) == fp_v2
        assert swapped["idle_timeout_seconds"] == 1234  # the new version's own settings apply
        rolled = await http.post(f"/models/{linked}/rollback", json={"reason": "r2 misbehaves"})
        assert rolled.status_code == 200, rolled.text
        assert rolled.json()["serving_path"].endswith("releases/r1") and await answer(http, linked) == fp_v1
        # A watcher started afresh signals the folder's files (r2, rolled back from): held off.
        held = rolled.json()["update_count"]
        bridge = WorkflowBridge(temporal_env.client, settings)
        await bridge.model_ready(ModelSource(linked, str(incoming / linked), fingerprint(incoming / linked)[0]))
        handle = temporal_env.client.get_workflow_handle(workflow_id(linked))
        # An update answers after the workflow task that took the signal (and ran on) completed.
        await handle.execute_update(ModelLifecycleWorkflow.ensure_loaded, EnsureLoadedRequest("probe"))
        after_signal = await handle.query(ModelLifecycleWorkflow.state)
        assert after_signal.update_count == held and after_signal.update_state is None
        assert after_signal.serving_path is not None and after_signal.serving_path.endswith("releases/r1")

        # Files replaced in place leave nothing to go back to: refused, by name.
        replace_files(v2, incoming / plain)
        await switched_to(http, plain, 1)
        refused = await http.post(f"/models/{plain}/rollback")
        assert refused.status_code == 409 and "replaced in place" in refused.json()["error"]["message"]


async def _loaded(http: httpx.AsyncClient, name: str) -> bool:
    response = await http.get(f"/models/{name}")
    return response.status_code == 200 and response.json()["phase"] == "loaded"
