"""Many models on little room: discovery registers, preloading only fills free room, only demand
evicts or waits, and listing reads the visibility store instead of asking every workflow.

Real parts throughout: the Temporal dev server, `serve`'s control worker, node agent, watcher and
gateway, and an embedded runtime process per loaded model (a tiny GPT-2 on CPU). The CPU node's
memory budget is set to a few of these models' bookings.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from modelium.analyzer import analyze_directory
from modelium.names import workflow_id
from modelium.types import Phase, UnloadKind
from tests.helpers import copy_model, end_workflows_of, make_settings, running_modelium, unique, wait_for
from workers.control import control_worker
from workflows.contracts import UPDATED_KEY, ActivityName, EvictCommand
from workflows.steps import UnloadRequest

pytestmark = pytest.mark.slow

PLACEMENT = {ActivityName.DECIDE_RUNTIME, ActivityName.RESERVE_GPU, ActivityName.EVICT_MODELS}


def _room_for(model: Path, n: int) -> tuple[int, int]:
    """(booking of one model, a budget with room for n and not n + 1)."""
    booking = analyze_directory(model, "probe").memory_estimates["embedded"]
    return booking, n * booking + booking // 2


async def _activities(client: Client, name: str) -> list[str]:
    """Every activity the model's workflow ran, in order (all its runs): those scheduled on a
    task queue, and the local ones (analysis, placement), which the history records as markers."""
    handle = client.get_workflow_handle(workflow_id(name))
    found = []
    async for event in handle.fetch_history_events():
        if event.HasField("activity_task_scheduled_event_attributes"):
            found.append(event.activity_task_scheduled_event_attributes.activity_type.name)
        elif event.marker_recorded_event_attributes.marker_name == "core_local_activity":
            data = event.marker_recorded_event_attributes.details["data"].payloads[0].data
            found.append(json.loads(data)["activity_type"])
    return found


async def _listing(http: httpx.AsyncClient, names: list[str]) -> dict[str, dict[str, Any]]:
    response = await http.get("/models")
    assert response.status_code == 200, response.text
    return {m["name"]: m for m in response.json()["models"] if m["name"] in names}


async def test_thirty_models_on_room_for_three_come_to_rest(
    temporal_env: WorkflowEnvironment, demo_models: dict[str, Path], tmp_path: Path
) -> None:
    model = demo_models["text-generation"]
    booking, capacity = _room_for(model, 3)
    settings = make_settings(
        tmp_path,
        node={"id": unique("three"), "cpu_memory_budget_bytes": capacity, "announce_seconds": 0.5},
        # Eviction allowed at once: if anything evicted without demand, this test would see it.
        orchestration={"eviction": {"min_resident_seconds": 0, "min_idle_seconds": 0}},
    )
    names = sorted(unique(f"r{i:02d}") for i in range(30))
    client = temporal_env.client
    try:
        # The control worker runs apart, so that it can be stopped while everything else runs.
        async with running_modelium(settings, client, control=False) as running:
            assert running.node is not None
            base = f"http://127.0.0.1:{running.gateway_port}"
            async with httpx.AsyncClient(base_url=base, timeout=60) as http:
                async with control_worker(client, settings, running.metrics):
                    for name in names:
                        copy_model(model, settings.watch_directories[0] / name)

                    async def at_rest() -> dict[str, dict[str, Any]] | None:
                        listed = await _listing(http, names)
                        phases = [m["phase"] for m in listed.values()]
                        settled = len(listed) == 30 and set(phases) <= {Phase.LOADED, Phase.UNLOADED}
                        return listed if settled and phases.count(Phase.LOADED) == 3 else None

                    listed = await wait_for(at_rest, timeout=240, interval=1, what="30 models at rest, 3 loaded")
                    resting = [m for m in listed.values() if m["phase"] == Phase.UNLOADED]
                    assert len(resting) == 27
                    for name in names:
                        # When the summary was written: a gateway's later listings ask for those since.
                        info = await client.get_workflow_handle(workflow_id(name)).describe()
                        assert info.typed_search_attributes.get(UPDATED_KEY) is not None, name
                    for m in resting:
                        # Analyzed and decided, with the reason it rests: it costs nothing until asked.
                        assert m["rest_reason"].startswith("not preloaded: no free room on any node"), m
                        assert m["analysis"] and m["runtime"] == "embedded"
                        assert m["load_count"] == 0 and m["booked_bytes"] is None
                    # Booked at the estimate, or at what each measured after its warm-up if more.
                    assert 3 * booking <= running.node.ledger.booked("cpu") <= capacity
                    before = {n: await _activities(client, n) for n in names}
                    for activities in before.values():
                        assert ActivityName.DECIDE_RUNTIME in activities  # each decided once, as it arrived
                        assert ActivityName.EVICT_MODELS not in activities

                    # A further 30 s with nobody asking: no decision, booking or eviction anywhere.
                    # (A window, not a condition: what is checked is that nothing happens. Resting
                    # models used to cycle through deciding every 2 to 30 s, so 27 of them would.)
                    await asyncio.sleep(30)
                    for name in names:
                        after = await _activities(client, name)
                        new = after[len(before[name]) :]
                        assert not PLACEMENT & set(new), f"{name} ran {new} while nobody asked"
                    loaded = {n for n, m in (await _listing(http, names)).items() if m["phase"] == Phase.LOADED}
                    assert len(loaded) == 3

                # The control worker is stopped: no model workflow could answer a query now. The
                # list still has every model's phase, runtime and booking: it reads the
                # visibility store alone.
                started = time.perf_counter()
                listed = await _listing(http, names)
                took = time.perf_counter() - started
                assert took < 2, f"listing took {took:.2f}s: it waited on a query"
                assert len(listed) == 30
                for name, m in listed.items():
                    assert m["runtime"] == "embedded"
                    assert m["phase"] == (Phase.LOADED if name in loaded else Phase.UNLOADED)
                    if name in loaded:
                        assert m["booked_bytes"] >= booking and m["node"] == settings.node.id
                page = (await http.get("/models", params={"limit": 7, "phase": Phase.UNLOADED})).json()
                assert len(page["models"]) == 7 and page["next_page_token"]
                assert {m["phase"] for m in page["models"]} == {Phase.UNLOADED}
                rest = await http.get(
                    "/models", params={"limit": 1000, "page_token": page["next_page_token"], "phase": Phase.UNLOADED}
                )
                ours = [m for m in page["models"] + rest.json()["models"] if m["name"] in names]
                assert len({m["name"] for m in ours}) == 27
                bad = await http.get("/models", params={"limit": 5, "page_token": "bm90LWEtdG9rZW4"})
                assert bad.status_code == 400 and "page_token" in bad.text
                assert (await http.get("/models", params={"phase": "sleeping"})).status_code == 400
    finally:
        await end_workflows_of(client, settings.temporal.control_task_queue)


async def test_ten_requests_to_ten_resting_models_with_room_for_three(
    temporal_env: WorkflowEnvironment, demo_models: dict[str, Path], tmp_path: Path
) -> None:
    model = demo_models["text-generation"]
    booking, capacity = _room_for(model, 3)
    min_idle = 1.0
    settings = make_settings(
        tmp_path,
        node={"id": unique("ten"), "cpu_memory_budget_bytes": capacity, "announce_seconds": 0.5},
        orchestration={
            "preload": "none",
            "policies": {"evict_after_idle_seconds": 3600},
            "eviction": {"min_resident_seconds": 0, "min_idle_seconds": min_idle},
        },
        gateway={
            "port": 0,
            "usage_flush_seconds": 0.2,
            "endpoint_cache_seconds": 0.2,
            "cold_start_timeout_seconds": 400,
        },
    )
    names = sorted(unique(f"t{i}") for i in range(10))
    client = temporal_env.client
    try:
        async with running_modelium(settings, client) as running:
            assert running.node is not None
            ledger = running.node.ledger
            base = f"http://127.0.0.1:{running.gateway_port}"
            async with httpx.AsyncClient(base_url=base, timeout=400) as http:
                for name in names:
                    copy_model(model, settings.watch_directories[0] / name)

                async def all_resting() -> bool:
                    listed = await _listing(http, names)
                    return len(listed) == 10 and all(m["phase"] == Phase.UNLOADED for m in listed.values())

                await wait_for(all_resting, timeout=120, interval=0.5, what="10 models resting (preload: none)")
                listed = await _listing(http, names)
                assert all("orchestration.preload is none" in m["rest_reason"] for m in listed.values())
                assert ledger.booked("cpu") == 0
                most = 0

                async def watch() -> None:
                    nonlocal most
                    while True:
                        booked = ledger.booked("cpu")
                        assert booked <= capacity, f"booked {booked} of {capacity}"
                        most = max(most, booked)
                        await asyncio.sleep(0.05)

                async def ask(name: str) -> int:
                    body = {"model": name, "prompt": "Hello", "max_tokens": 2}
                    return (await http.post("/v1/completions", json=body)).status_code

                watcher = asyncio.create_task(watch())
                try:
                    statuses = await asyncio.wait_for(asyncio.gather(*(ask(n) for n in names)), timeout=380)
                finally:
                    watcher.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await watcher  # re-raises the watcher's assertion, if it failed
                assert statuses == [200] * 10
                assert booking * 2 < most <= capacity

        # Every eviction was of an idle model: its evict update (accepted only for a loaded,
        # unpinned model unused for min_idle_seconds) came before its unload.
        evicted = 0
        for name in names:
            handle = client.get_workflow_handle(workflow_id(name))
            async for event in handle.fetch_history_events():
                if event.HasField("workflow_execution_update_accepted_event_attributes"):
                    attrs = event.workflow_execution_update_accepted_event_attributes.accepted_request
                    if attrs.input.name == "evict":
                        [command] = await client.data_converter.decode(attrs.input.args.payloads, [EvictCommand])
                        assert command.min_idle_seconds == min_idle
                attrs2 = event.activity_task_scheduled_event_attributes
                if event.HasField("activity_task_scheduled_event_attributes") and (
                    attrs2.activity_type.name == ActivityName.UNLOAD_MODEL
                ):
                    [request] = await client.data_converter.decode(attrs2.input.payloads, [UnloadRequest])
                    if request.kind == UnloadKind.EVICTED:
                        evicted += 1
                        idle = float(re.search(r"idle (\d+)s", request.reason).group(1))  # type: ignore[union-attr]
                        assert idle >= min_idle - 0.5, request.reason
        assert evicted >= 7, f"{evicted} evictions for 10 models on room for 3"
    finally:
        await end_workflows_of(client, settings.temporal.control_task_queue)


async def test_waiter_whose_request_gave_up_rests_and_is_not_loaded_later(
    temporal_env: WorkflowEnvironment, demo_models: dict[str, Path], tmp_path: Path
) -> None:
    model = demo_models["text-generation"]
    _, capacity = _room_for(model, 1)
    settings = make_settings(
        tmp_path,
        node={"id": unique("one"), "cpu_memory_budget_bytes": capacity, "announce_seconds": 0.5},
        orchestration={"policies": {"evict_after_idle_seconds": 3600}},
        gateway={"port": 0, "usage_flush_seconds": 0.2, "endpoint_cache_seconds": 0.2, "cold_start_timeout_seconds": 3},
    )
    holder, waiter = unique("holder"), unique("waiter")
    client = temporal_env.client
    try:
        async with running_modelium(settings, client) as running:
            base = f"http://127.0.0.1:{running.gateway_port}"
            async with httpx.AsyncClient(base_url=base, timeout=60) as http:
                copy_model(model, settings.watch_directories[0] / holder)
                await wait_for(lambda: _phase(http, holder, Phase.LOADED), timeout=120, what="holder loaded")
                pinned = await http.post(f"/models/{holder}/load", json={"pin": True})
                assert pinned.status_code == 200 and pinned.json()["pinned"]
                copy_model(model, settings.watch_directories[0] / waiter)
                await wait_for(lambda: _phase(http, waiter, Phase.UNLOADED), timeout=120, what="waiter resting")

                # Its only request waits 3 s for room that a pinned model holds, and gives up.
                answer = await http.post(f"/predict/{waiter}", json={"prompt": "Hi", "max_tokens": 2})
                assert answer.status_code == 503, answer.text
                state = await wait_for(
                    lambda: _phase(http, waiter, Phase.UNLOADED), timeout=30, what="waiter back at rest"
                )
                assert "gave up" in state["rest_reason"] or "withdrawn" in str(state["rest_reason"]), state
                history = await _activities(client, waiter)

                # Room comes free: nothing is loaded for a request that is gone.
                freed = await http.post(f"/models/{holder}/unload")
                assert freed.status_code == 200 and freed.json()["phase"] == Phase.UNLOADED
                await asyncio.sleep(5)
                state = await _phase(http, waiter, Phase.UNLOADED)
                assert state is not None and state["load_count"] == 0
                assert await _activities(client, waiter) == history
                assert running.node is not None and running.node.ledger.booked("cpu") == 0
    finally:
        await end_workflows_of(client, settings.temporal.control_task_queue)


async def _phase(http: httpx.AsyncClient, name: str, phase: str) -> dict[str, Any] | None:
    response = await http.get(f"/models/{name}")
    if response.status_code != 200:
        return None
    info: dict[str, Any] = response.json()
    return info if info["phase"] == phase else None


async def test_watcher_restart_does_not_signal_unchanged_models(
    temporal_env: WorkflowEnvironment, demo_models: dict[str, Path], tmp_path: Path
) -> None:
    settings = make_settings(tmp_path, orchestration={"preload": "none"})
    names = sorted(unique(f"w{i}") for i in range(6))
    client = temporal_env.client
    try:
        async with running_modelium(settings, client, watch=False) as running:
            base = f"http://127.0.0.1:{running.gateway_port}"
            async with httpx.AsyncClient(base_url=base, timeout=60) as http:
                for name in names:
                    copy_model(demo_models["text-generation"], settings.watch_directories[0] / name)
                async with running_modelium(
                    settings, client, end_workflows=False, control=False, node=False, gateway=False
                ):

                    async def all_resting() -> bool:
                        listed = await _listing(http, names)
                        return len(listed) == 6 and all(m["phase"] == Phase.UNLOADED for m in listed.values())

                    await wait_for(all_resting, timeout=120, interval=0.5, what="6 models resting")
                signals = {n: await _signals(client, n) for n in names}
                # One model's files change while no watcher runs.
                changed = names[0]
                (settings.watch_directories[0] / changed / "README.md").write_text("a new model card\n")

                async with running_modelium(
                    settings, client, end_workflows=False, control=False, node=False, gateway=False
                ):

                    async def changed_seen() -> bool:
                        return len(await _signals(client, changed)) > len(signals[changed])

                    await wait_for(changed_seen, timeout=60, what="the changed model signalled")
                    # Longer than the watcher needs to settle and hand over every folder.
                    await asyncio.sleep(settings.orchestration.model_discovery.settle_seconds * 4 + 1)
                for name in names[1:]:
                    assert await _signals(client, name) == signals[name], f"{name} was signalled again"
    finally:
        await end_workflows_of(client, settings.temporal.control_task_queue)


async def _signals(client: Client, name: str) -> list[str]:
    found = []
    async for event in client.get_workflow_handle(workflow_id(name)).fetch_history_events():
        if event.HasField("workflow_execution_signaled_event_attributes"):
            found.append(event.workflow_execution_signaled_event_attributes.signal_name)
    return found
