"""12 models dropped at once onto a node with room for 4: the ledger's journal of every booking
never shows more booked than exists, nor does the metric, the rest wait or evict idle models, and
every model answers in the end.

Real parts throughout: the Temporal dev server, the control worker and node agent of `serve`, the
gateway, and an embedded runtime process per loaded model (a tiny GPT-2 on CPU). The node is a
CPU-only node whose memory budget is set to four of these models' bookings.
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

# The property, not the scale (bench/churn.py and bench/scale.py measure that).
MODELS = 12
ROOM_FOR = 4


async def test_twelve_models_onto_room_for_four(
    temporal_env: WorkflowEnvironment, demo_models: dict[str, Path], tmp_path: Path
) -> None:
    model = demo_models["text-generation"]
    booking = analyze_directory(model, "probe").memory_estimates["embedded"]
    capacity = ROOM_FOR * booking + booking // 2  # room for 4, not for 5
    settings = make_settings(
        tmp_path,
        node={"id": unique("four"), "cpu_memory_budget_bytes": capacity, "announce_seconds": 0.5},
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
        most_booked_metric = 0.0
        phases_seen: set[str] = set()

        async def watch_phases_and_metric(http: httpx.AsyncClient) -> None:
            # What a dashboard would show, sampled; the ledger's own journal is checked after.
            nonlocal most_booked_metric
            while True:
                metric = metrics.registry.get_sample_value(
                    "modelium_gpu_memory_bytes", {"node": node, "gpu": "cpu", "kind": "booked"}
                )
                total = metrics.registry.get_sample_value(
                    "modelium_gpu_memory_bytes", {"node": node, "gpu": "cpu", "kind": "total"}
                )
                assert total == capacity
                assert metric is None or metric <= total, f"the metric shows {metric} booked of {total}"
                most_booked_metric = max(most_booked_metric, metric or 0.0)
                listing = (await http.get("/models")).json()
                phases_seen.update(m["phase"] for m in listing["models"] if m["name"] in names)
                await asyncio.sleep(0.1)

        base = f"http://127.0.0.1:{running.gateway_port}"
        async with httpx.AsyncClient(base_url=base, timeout=600) as http:
            watcher = asyncio.create_task(watch_phases_and_metric(http))
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
        # Every booking the ledger made, resized or released, with the total after it: never past
        # the capacity, at one time every slot full, and every model booked at least once.
        journal = ledger.journal()
        over = [e for e in journal if e["booked"]["cpu"] > capacity]
        assert over == [], f"the ledger booked past {capacity}: {over[:3]}"
        assert max(e["booked"]["cpu"] for e in journal) >= ROOM_FOR * booking * 0.9
        assert {e["model"] for e in journal if e["op"] == "reserve"} == set(names)
        assert sum(e["op"] == "release" for e in journal) >= MODELS - ROOM_FOR
        assert 0 < most_booked_metric <= capacity
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
            f"most booked {max(e['booked']['cpu'] for e in journal) / mib:.0f} MiB (ledger's journal of {len(journal)} "
            f"changes), {most_booked_metric / mib:.0f} MiB "
            f"(metric); {evictions:.0f} evictions; phases seen: {', '.join(sorted(phases_seen))}"
        )
        for reason in reasons.values():
            assert reason.startswith("evicted to make room for m"), reason
            assert "reloads in" in reason and "score" in reason
