"""A long-lived model workflow continues as new when Temporal suggests it, and keeps everything:
the served model stays up (same process), counts and settings carry over.

A second dev server is started with a low history limit (dynamic config) so that the suggestion
comes after a few dozen events instead of thousands.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.testing import WorkflowEnvironment

from modelium.names import workflow_id
from tests.helpers import make_settings, serving_model, unique, wait_for
from workers.temporal_server import temporal_binary
from workflows.contracts import SEARCH_ATTRIBUTES, UsageReport
from workflows.lifecycle import ModelLifecycleWorkflow

pytestmark = pytest.mark.slow


async def test_usage_heavy_workflow_continues_as_new_and_keeps_serving(
    demo_models: dict[str, Path], tmp_path: Path
) -> None:
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=temporal_binary(),
        search_attributes=SEARCH_ATTRIBUTES,
        ui=False,
        dev_server_extra_args=["--dynamic-config-value", "limit.historyCount.suggestContinueAsNew=60"],
    )
    try:
        settings = make_settings(tmp_path)
        name = unique("long-lived")
        model = demo_models["text-generation"]
        async with serving_model(settings, env.client, model, name) as (_, http):
            before = (await http.get(f"/models/{name}")).json()
            pin = await http.post(f"/models/{name}/load", json={"pin": True, "idle_timeout_seconds": 99})
            assert pin.status_code == 200
            handle = env.client.get_workflow_handle(workflow_id(name))
            first_run = (await handle.describe()).run_id
            for _ in range(80):  # one signal each: far past the limit of 60 events
                await handle.signal(ModelLifecycleWorkflow.record_usage, UsageReport(1, {"acme": 1}))

            async def continued() -> str | None:
                run_id = (await handle.describe()).run_id
                return run_id if run_id != first_run else None

            await wait_for(continued, timeout=30, what="continue-as-new")
            first = env.client.get_workflow_handle(workflow_id(name), run_id=first_run)
            events = [e async for e in first.fetch_history_events()]
            assert events[-1].event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW

            async def all_counted() -> dict[str, object] | None:
                info = (await http.get(f"/models/{name}")).json()
                return info if info["request_count"] == 80 else None

            after = await wait_for(all_counted, timeout=30, what="every usage signal counted")
            assert after["phase"] == "loaded"
            assert after["requests_by_organization"] == {"acme": 80}
            assert after["pinned"] and after["idle_timeout_seconds"] == 99
            # The model was not reloaded: same process, same load count, and it answers.
            assert after["endpoint"] == before["endpoint"]  # type: ignore[index]
            assert after["load_count"] == before["load_count"]
            answer = await http.post(f"/predict/{name}", json={"prompt": "Hi", "max_tokens": 2})
            assert answer.status_code == 200, answer.text
    finally:
        await env.shutdown()
