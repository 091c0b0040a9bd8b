"""20 models dropped at once onto a node with room for 5: the ledger and the metrics never show
more booked than exists, the rest wait or evict idle models, and every model answers in the end.

Real parts throughout: the Temporal dev server, the control worker and node agent of `serve`, the
gateway, and an embedded runtime process per loaded model (a tiny GPT-2 on CPU). The node is a
CPU-only node whose memory budget is set to five of these models' bookings.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from temporalio.testing import WorkflowEnvironment

from modelium.analyzer import analyze_directory
from modelium.names import workflow_id
from modelium.types import UnloadKind
from tests.helpers import copy_model, make_settings, running_modelium, unique
from workflows.contracts import ActivityName
from workflows.steps import UnloadRequest

pytestmark = pytest.mark.slow

MODELS = 20
ROOM_FOR = 5


async def test_twenty_models_onto_room_for_five(
    temporal_env: WorkflowEnvironment, demo_models: dict[str, Path], tmp_path: Path
) -> None:
    model = demo_models["text-generation"]
    booking = analyze_directory(model, "probe").memory_estimates["embedded"]
    capacity = ROOM_FOR * booking + booking // 2  # room for 5, not for 6
    settings = make_settings(
        tmp_path,
        node={"id": unique("five"), "cpu_memory_budget_bytes": capacity, "announce_seconds": 0.5},
        orchestration={
            # The idle timer must not be what frees room here: eviction must.
            "policies": {"evict_after_idle_seconds": 3600},
            "eviction": {"min_resident_seconds": 3, "min_idle_seconds": 1},
        },
        gateway={
            "port": 0,
            "usage_flush_seconds": 0.2,
            "endpoint_cache_seconds": 0.2,
            "cold_start_timeout_seconds": 600,
        },
    )
    names = [unique(f"m{i:02d}") for i in range(MODELS)]
    client = temporal_env.client
    async with running_modelium(settings, client) as running:
        assert running.node is not None
        ledger, metrics = running.node.ledger, running.metrics
        node = settings.node.id
        most_booked = {"ledger": 0.0, "metric": 0.0}
        phases_seen: set[str] = set()

        async def watch_bookings(http: httpx.AsyncClient) -> None:
            while True:
                booked = ledger.booked("cpu")
                metric = metrics.registry.get_sample_value(
                    "modelium_gpu_memory_bytes", {"node": node, "gpu": "cpu", "kind": "booked"}
                )
                total = metrics.registry.get_sample_value(
                    "modelium_gpu_memory_bytes", {"node": node, "gpu": "cpu", "kind": "total"}
                )
                assert booked <= capacity, f"the ledger booked {booked} of {capacity}"
                assert total == capacity
                assert metric is None or metric <= total, f"the metric shows {metric} booked of {total}"
                most_booked["ledger"] = max(most_booked["ledger"], booked)
                most_booked["metric"] = max(most_booked["metric"], metric or 0.0)
                listing = (await http.get("/models")).json()
                phases_seen.update(m["phase"] for m in listing["models"] if m["name"] in names)
                await asyncio.sleep(0.1)

        base = f"http://127.0.0.1:{running.gateway_port}"
        async with httpx.AsyncClient(base_url=base, timeout=600) as http:
            watcher = asyncio.create_task(watch_bookings(http))
            for name in names:
                copy_model(model, settings.watch_directories[0] / name)

            async def ask(name: str) -> int:
                # The gateway knows the model once the watcher handed it over.
                while (await http.get(f"/models/{name}")).status_code == 404:
                    await asyncio.sleep(0.2)
                body = {"model": name, "prompt": "Hello", "max_tokens": 2}
                response = await http.post("/v1/completions", json=body)
                return response.status_code

            try:
                statuses = await asyncio.wait_for(asyncio.gather(*(ask(n) for n in names)), timeout=540)
            finally:
                watcher.cancel()
            with pytest.raises(asyncio.CancelledError):
                await watcher  # re-raises an assertion the watcher failed with, if any

        assert statuses == [200] * MODELS
        # Never more than five at once, and at one time all five slots were full.
        assert most_booked["ledger"] <= capacity and most_booked["ledger"] >= ROOM_FOR * booking * 0.9
        assert 0 < most_booked["metric"] <= capacity
        assert "waiting_for_capacity" in phases_seen or "evicting" in phases_seen, phases_seen
        evictions = metrics.registry.get_sample_value("modelium_evictions_total", {"node": node})
        assert evictions is not None and evictions >= MODELS - ROOM_FOR

        # Each evicted model's own history says why it was unloaded: its unload activity's input.
        reasons = {}
        for name in names:
            history = await client.get_workflow_handle(workflow_id(name)).fetch_history()
            for event in history.events:
                attrs = event.activity_task_scheduled_event_attributes
                if event.HasField("activity_task_scheduled_event_attributes") and attrs.activity_type.name == (
                    ActivityName.UNLOAD_MODEL
                ):
                    [request] = await client.data_converter.decode(attrs.input.payloads, [UnloadRequest])
                    if request.kind == UnloadKind.EVICTED:
                        reasons[name] = request.reason
        assert len(reasons) >= MODELS - ROOM_FOR, reasons
        mib = 2**20
        print(
            f"\n{MODELS} models onto room for {ROOM_FOR} ({booking / mib:.0f} MiB each, {capacity / mib:.0f} MiB): "
            f"most booked {most_booked['ledger'] / mib:.0f} MiB (ledger), {most_booked['metric'] / mib:.0f} MiB "
            f"(metric); {evictions:.0f} evictions; phases seen: {', '.join(sorted(phases_seen))}"
        )
        for reason in reasons.values():
            assert reason.startswith("evicted to make room for m"), reason
            assert "reloads in" in reason and "score" in reason
