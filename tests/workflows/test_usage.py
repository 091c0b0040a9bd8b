"""Usage counting keeps workflow histories bounded: one signal per model per flush interval,
or one per request with an interval of 0. Checked in the real history of a real workflow."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowHandle
from temporalio.testing import WorkflowEnvironment

from api.usage import UsageBatcher
from modelium.names import workflow_id
from modelium.types import ModelSource
from tests.helpers import unique
from workflows.contracts import LifecycleInput
from workflows.lifecycle import ModelLifecycleWorkflow


async def _workflow(client: Client) -> tuple[str, WorkflowHandle]:
    # No worker polls this queue: the server still records every signal in the history, which
    # is exactly what is counted here.
    name = unique("usage")
    handle = await client.start_workflow(
        ModelLifecycleWorkflow.run,
        LifecycleInput(ModelSource(name, "/nowhere", "f")),
        id=workflow_id(name),
        task_queue=unique("no-worker"),
    )
    return name, handle


async def _usage_signals(handle: WorkflowHandle) -> list[dict[str, Any]]:
    """What each `record_usage` signal in the history carries (its one payload, a UsageReport)."""
    reports = []
    async for event in handle.fetch_history_events():
        if event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED:
            attrs = event.workflow_execution_signaled_event_attributes
            if attrs.signal_name == "record_usage":
                (payload,) = attrs.input.payloads
                reports.append(json.loads(payload.data))
    return reports


async def test_coalesced_into_one_signal_per_interval(temporal_env: WorkflowEnvironment) -> None:
    name, handle = await _workflow(temporal_env.client)
    batcher = UsageBatcher(temporal_env.client, flush_seconds=60)
    for i in range(500):
        batcher.record(name, "acme" if i % 5 else "beta")
    await batcher.flush()
    assert batcher.signals_sent == 1
    # One signal, carrying all 500 requests, split by organization as they came.
    assert await _usage_signals(handle) == [{"count": 500, "by_organization": {"acme": 400, "beta": 100}}]
    await handle.terminate("test over")


async def test_zero_interval_sends_one_signal_per_request(temporal_env: WorkflowEnvironment) -> None:
    name, handle = await _workflow(temporal_env.client)
    batcher = UsageBatcher(temporal_env.client, flush_seconds=0)
    batcher.start()
    for _ in range(7):
        batcher.record(name, "acme")
    await batcher.stop()
    assert batcher.signals_sent == 7
    assert await _usage_signals(handle) == [{"count": 1, "by_organization": {"acme": 1}}] * 7
    await handle.terminate("test over")


async def test_unsent_counts_are_kept() -> None:
    # Temporal cannot be reached: the counts stay and go out with a later flush.
    client = await Client.connect("127.0.0.1:9", lazy=True)
    batcher = UsageBatcher(client, flush_seconds=60)
    batcher.record("kept-model", "acme", 3)
    await batcher.flush()
    assert batcher.signals_sent == 0
    assert batcher.pending() == {("kept-model", "acme"): 3}


async def test_counts_unsent_at_shutdown_reach_the_workflow_after_the_next_start(
    temporal_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    # `serve` stops while Temporal is down: 37 requests were served and not yet counted.
    name, handle = await _workflow(temporal_env.client)
    spool = tmp_path / "state" / "gateway" / "usage"
    dead = await Client.connect("127.0.0.1:9", lazy=True)
    down = UsageBatcher(dead, flush_seconds=60, spool=spool)
    down.start()
    for i in range(37):
        down.record(name, "acme" if i % 2 else "beta")
    await down.stop()
    assert down.pending() == {} and len(list(spool.glob("usage-*.json"))) == 1
    # The next gateway on the same state directory sends them with its first flush.
    up = UsageBatcher(temporal_env.client, flush_seconds=60, spool=spool)
    up.start()
    await up.stop()
    assert list(spool.iterdir()) == []
    signals = []
    async for event in handle.fetch_history_events():
        if event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED:
            signals.append(json.loads(event.workflow_execution_signaled_event_attributes.input.payloads[0].data))
    assert signals == [{"count": 37, "by_organization": {"acme": 18, "beta": 19}}]
    await handle.terminate("test over")
