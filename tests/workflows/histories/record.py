"""Re-records the workflow histories that tests/workflows/test_replay.py replays.

Run only when a workflow change is *meant* to be incompatible (and say so in the commit):
    .venv/bin/python -m tests.workflows.histories.record
Each scenario runs the real workers and runtime against a fresh Temporal dev server.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

from temporalio.client import WorkflowHandle
from temporalio.testing import WorkflowEnvironment

from cli.demo import write_demo_model
from modelium.names import workflow_id
from modelium.types import ModelSource, Phase
from modelium.watcher import fingerprint
from tests.helpers import make_settings, running_modelium, wait_for
from workers.temporal_server import temporal_binary
from workers.watch import WorkflowBridge
from workflows.contracts import SEARCH_ATTRIBUTES, LoadCommand, RemoveCommand, RetryRequest, UsageReport
from workflows.lifecycle import ModelLifecycleWorkflow

HERE = Path(__file__).parent


async def _phase(handle: WorkflowHandle, phase: str) -> bool:
    return (await handle.query(ModelLifecycleWorkflow.state)).phase == phase  # type: ignore[no-any-return]


async def main() -> None:
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=temporal_binary(), search_attributes=SEARCH_ATTRIBUTES, ui=False
    )
    tmp = Path(tempfile.mkdtemp())
    try:
        good = write_demo_model(tmp / "good")
        settings = make_settings(tmp, orchestration={"policies": {"evict_after_idle_seconds": 2}})
        async with running_modelium(settings, env.client, gateway=False, watch=False):
            bridge = WorkflowBridge(env.client, settings)
            # 1. load -> usage -> idle unload -> load on request -> remove
            await bridge.model_ready(ModelSource("lifecycle", str(good), fingerprint(good)[0]))
            h = env.client.get_workflow_handle(workflow_id("lifecycle"))
            await wait_for(lambda: _phase(h, Phase.LOADED), 120, what="loaded")
            await h.signal(ModelLifecycleWorkflow.record_usage, UsageReport(5))
            await wait_for(lambda: _phase(h, Phase.UNLOADED), 60, what="idle unload")
            await h.signal(ModelLifecycleWorkflow.load, LoadCommand())
            await wait_for(lambda: _phase(h, Phase.LOADED), 120, what="reloaded")
            await h.signal(ModelLifecycleWorkflow.remove, RemoveCommand())
            await h.result()
            (HERE / "lifecycle.json").write_text((await h.fetch_history()).to_json())
            # 2. broken directory -> failed -> retry after the fix -> loaded -> remove
            broken = tmp / "broken"
            shutil.copytree(good, broken)
            (broken / "config.json").unlink()
            await bridge.model_ready(ModelSource("broken", str(broken), fingerprint(broken)[0]))
            h = env.client.get_workflow_handle(workflow_id("broken"))
            await wait_for(lambda: _phase(h, Phase.FAILED), 60, what="failed")
            shutil.copy2(good / "config.json", broken / "config.json")
            await h.signal(ModelLifecycleWorkflow.retry, RetryRequest())
            await wait_for(lambda: _phase(h, Phase.LOADED), 120, what="loaded after retry")
            await h.signal(ModelLifecycleWorkflow.remove, RemoveCommand())
            await h.result()
            (HERE / "failed-then-retried.json").write_text((await h.fetch_history()).to_json())
    finally:
        await env.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
