"""Hostile settings and payloads never wedge a model's workflow.

Anyone who reaches Temporal (the UI, `temporal workflow signal`, a script) can send any signal or
update with any payload, or none at all. The workflow must take what makes sense, ignore or refuse
the rest, and never fail a workflow task: a failed task repeats forever, and the model can then
not be queried, loaded, unloaded or removed. The gateway and the configuration refuse the same
values at their boundary with the field named."""

from __future__ import annotations

import asyncio
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowHandle, WorkflowUpdateFailedError
from temporalio.testing import WorkflowEnvironment

from modelium.names import workflow_id
from tests.helpers import (
    copy_model,
    make_settings,
    modelium_http,
    runtime_pids,
    serving_model,
    unique,
    wait_for,
    wait_phase,
)
from workflows.lifecycle import ModelLifecycleWorkflow

pytestmark = pytest.mark.slow

NAN, INF = float("nan"), float("inf")
# Every kind of bad value: not numbers, non-finite, negative, huge, wrong shapes.
# (`False` rather than `True`: Temporal's converter reads a boolean as 1.0 for a float field, and
# `pin: true` is a valid request.)
# Tiny positive durations too: a timer rounded to zero is refused by Temporal, and an idle timeout
# under a second unloads a model before anyone can use it.
BAD_VALUES: list[Any] = [NAN, INF, -INF, -1, 0, 5e-324, 1e-7, 0.5, 1e308, 2**70, "many", [1, 2], {"x": 1}, None, False]
# Signals that leave a loaded model loaded whatever they carry (remove/unload are sent later).
HARMLESS_SIGNALS = ["record_usage", "files_changed", "retry", "load", "capacity_freed", "report_unhealthy"]
FIELDS = {
    "record_usage": ["count", "by_organization"],
    "files_changed": ["name", "path", "fingerprint"],
    "retry": ["reason"],
    "load": ["pin", "idle_seconds", "reason"],
    "capacity_freed": ["node", "model"],
    "report_unhealthy": ["reason"],
}


def payloads(signal: str) -> list[Any]:
    """No input, whole payloads of the wrong type, and each field set to each bad value."""
    out: list[Any] = [..., None, "junk", 42, [], {}, {"unknown": 1}]
    for field in FIELDS[signal]:
        out += [{field: value} for value in BAD_VALUES]
    return out


async def send(handle: WorkflowHandle[Any, Any], name: str, payload: Any) -> None:
    if payload is ...:
        await handle.signal(name)  # no input at all, as the Temporal UI sends it
    else:
        await handle.signal(name, payload)


async def no_task_failed(handle: WorkflowHandle[Any, Any]) -> None:
    failed = [
        e async for e in handle.fetch_history_events() if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED
    ]
    assert not failed, failed[0].workflow_task_failed_event_attributes.failure.message


async def test_no_signal_or_update_payload_wedges_the_workflow(
    temporal_env: WorkflowEnvironment, demo_models: dict[str, Path], tmp_path: Path
) -> None:
    settings = make_settings(tmp_path)
    name = unique("hostile")
    client = temporal_env.client
    async with serving_model(settings, client, demo_models["text-generation"], name) as (_, http):
        handle = client.get_workflow_handle(workflow_id(name))
        before = await handle.query(ModelLifecycleWorkflow.state)
        sent = 0
        for signal in HARMLESS_SIGNALS:
            for payload in payloads(signal):
                await send(handle, signal, payload)
                sent += 1

        # Updates with bad input are refused with a reason; none fails a workflow task.
        for bad in [{"idle_seconds": v} for v in (NAN, INF, -1, 0, 5e-324, 0.5, 1e308)] + [{"pin": "yes"}]:
            with pytest.raises(WorkflowUpdateFailedError):
                await handle.execute_update("ensure_loaded", bad)
        for bad in [..., None, {}, {"for_model": ""}, {"reason": "r", "for_model": "x", "min_idle_seconds": NAN}]:
            with pytest.raises(WorkflowUpdateFailedError):
                if bad is ...:
                    await handle.execute_update("evict")
                else:
                    await handle.execute_update("evict", bad)

        # Still answering, still serving, settings untouched by the junk.
        async def settled() -> Any:
            state = await handle.query(ModelLifecycleWorkflow.state)
            return state if state.phase == "loaded" else None

        state = await wait_for(settled, timeout=60, what=f"{name} loaded after {sent} hostile signals")
        assert state.idle_seconds == before.idle_seconds and not state.pinned
        assert math.isfinite(state.request_count) and state.request_count == before.request_count
        assert state.load_count == before.load_count, "the junk must not have reloaded the model"
        served = await http.post(f"/predict/{name}", json={"prompt": "Hi", "max_tokens": 2})
        assert served.status_code == 200, served.text
        await no_task_failed(handle)

        # Empty payloads are the plain request: unload, then load, each with no input at all.
        await handle.signal("unload")
        await wait_phase(http, name, "unloaded", timeout=60)
        await handle.signal("load")
        await wait_phase(http, name, "loaded", timeout=120)
        await handle.signal("retry")
        assert (await handle.execute_update("ensure_loaded"))["phase"] == "loaded"
        assert (await handle.execute_update("ensure_unloaded"))["phase"] == "unloaded"
        await no_task_failed(handle)

        # The management API refuses the same values, naming the field.
        for value in ("1e308", "Infinity", "NaN", "-5", "5e-324", "0.5"):
            answer = await http.post(
                f"/models/{name}/load",
                content=f'{{"idle_timeout_seconds": {value}}}',
                headers={"content-type": "application/json"},
            )
            assert answer.status_code == 422, (value, answer.text)
            assert answer.json()["error"]["param"] == "idle_timeout_seconds"
        await handle.signal("remove")
        await wait_for(lambda: _ended(handle), timeout=60, what=f"{name} removed by an empty remove signal")
        await no_task_failed(handle)


async def _ended(handle: WorkflowHandle[Any, Any]) -> bool:
    return (await handle.describe()).close_time is not None


async def test_infinite_idle_timeout_in_the_model_folder_fails_the_model_naming_it(
    temporal_env: WorkflowEnvironment, demo_models: dict[str, Path], tmp_path: Path
) -> None:
    settings = make_settings(tmp_path)
    name = unique("inf-idle")
    async with modelium_http(settings, temporal_env.client, timeout=60) as (_, http):
        staged = copy_model(demo_models["text-generation"], tmp_path / "staging" / name)
        (staged / "modelium.yaml").write_text(yaml.safe_dump({"idle_timeout_seconds": INF}))
        staged.rename(settings.watch_directories[0] / name)
        failed = await wait_phase(http, name, "failed", timeout=60)
        assert "idle_timeout_seconds: Input should be a finite number" in failed["last_error"]


async def test_a_model_larger_than_every_node_fails_instead_of_waiting(
    temporal_env: WorkflowEnvironment, demo_models: dict[str, Path], tmp_path: Path
) -> None:
    # The demo model is estimated at about 400 MiB; this node has 100 MiB in all.
    settings = make_settings(tmp_path, node={"id": unique("tiny"), "cpu_memory_budget_bytes": 100 * 2**20})
    name = unique("too-big")
    async with modelium_http(settings, temporal_env.client, timeout=60) as (_, http):
        copy_model(demo_models["text-generation"], settings.watch_directories[0] / name)
        failed = await wait_phase(http, name, "failed", timeout=60)
        assert "more than any device of a live node holds even when empty" in failed["last_error"]
        assert "has 100 MiB free of 100 MiB" in failed["last_error"]


async def test_folder_deleted_mid_load_cancels_the_load_and_leaves_nothing(
    temporal_env: WorkflowEnvironment, demo_models: dict[str, Path], tmp_path: Path
) -> None:
    settings = make_settings(tmp_path)
    name = unique("vanishing")
    client = temporal_env.client
    async with modelium_http(settings, client, timeout=60) as (_, http):
        folder = copy_model(demo_models["text-generation"], settings.watch_directories[0] / name)
        await wait_phase(http, name, "loading", timeout=60)
        shutil.rmtree(folder)
        handle = client.get_workflow_handle(workflow_id(name))
        result = await asyncio.wait_for(handle.result(), timeout=60)
        assert result["phase"] == "removed"
    starts, cancelled = [], 0
    async for event in handle.fetch_history_events():
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
            starts.append(event.activity_task_started_event_attributes.attempt)
        cancelled += event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_CANCEL_REQUESTED
    # The load was cancelled at once: never retried against the missing folder.
    assert cancelled == 1 and max(starts) == 1, (starts, cancelled)
    assert runtime_pids(name) == []
