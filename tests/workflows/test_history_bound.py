"""A model loaded and unloaded thousands of times keeps a bounded history: its workflow continues
as new when Temporal suggests it, and carries its counts and settings over.

Real: the Temporal dev server, the ModelLifecycle workflow (its own history bound set low, so
that the cycles cross it many times), the control activities (analysis of
a real model folder, placement), the node activities with a real ledger, and one real embedded
runtime process that answers on the endpoint. Stand-in: the runtime adapter's start and stop
reuse that one running process rather than starting torch thousands of times (3 s each); what is
under test is the workflow's history, not the process start.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.control import ControlActivities, static_nodes
from activities.node import NodeActivities
from modelium.ledger import Ledger
from modelium.metrics import Metrics
from modelium.names import node_task_queue, workflow_id
from modelium.runtimes.base import Progress
from modelium.runtimes.embedded import EmbeddedRuntimeAdapter
from modelium.types import DeviceInventory, Endpoint, LoadRequest, ModelSource, NodeInventory, Phase
from modelium.watcher import fingerprint
from tests.helpers import copy_model, unique
from workers.temporal_server import temporal_binary
from workflows.contracts import (
    SEARCH_ATTRIBUTES,
    EnsureLoadedRequest,
    EnsureUnloadedRequest,
    LifecycleInput,
    UsageReport,
)
from workflows.lifecycle import ModelLifecycleWorkflow

pytestmark = pytest.mark.slow

# A cycle takes about 0.5 s on the dev server (a dozen task dispatches): the suite runs 50, enough
# for several runs past the history limit; MODELIUM_TEST_CYCLES=2000 runs the thousands (README,
# "Many models"). Temporal's time-skipping server took twice as long per cycle here (1.1 s).
CYCLES = int(os.environ.get("MODELIUM_TEST_CYCLES", "50"))
HISTORY_LIMIT = 120


class OneRunningProcess:
    """Stands in for the embedded adapter's process start: every load gets the endpoint of one
    embedded runtime process started once (real, serving the model); unload forgets it."""

    name = "embedded"

    def __init__(self, real: EmbeddedRuntimeAdapter, first: LoadRequest) -> None:
        self._real = real
        self._first = first
        self._endpoint: Endpoint | None = None
        self._running: set[str] = set()

    async def start(self, request: LoadRequest, progress: Progress) -> Endpoint:
        if self._endpoint is None:
            self._endpoint = await self._real.start(self._first, progress)
        self._running.add(request.model)
        return self._endpoint

    async def check_health(self, model: str) -> None:
        await self._real.check_health(self._first.model)

    async def stop(self, model: str) -> bool:
        was = model in self._running
        self._running.discard(model)
        return was

    async def stop_all(self) -> None:
        await self._real.stop_all()

    def running(self) -> list[str]:
        return sorted(self._running)

    def dead(self) -> dict[str, int | None]:
        return {}

    async def adopt(self) -> list[str]:
        return []


async def test_thousands_of_load_unload_cycles_keep_history_bounded(
    demo_models: dict[str, Path], tmp_path: Path
) -> None:
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=temporal_binary(), search_attributes=SEARCH_ATTRIBUTES, ui=False
    )
    name, node, control_queue = unique("cycles"), unique("node"), unique("control")
    model_dir = copy_model(demo_models["text-generation"], tmp_path / "m")
    ledger = Ledger(tmp_path / "bookings.json", node, {"cpu": 8 * 2**30})
    cpu = DeviceInventory("cpu", "CPU", 8 * 2**30, None, 0)
    real = EmbeddedRuntimeAdapter(node, tmp_path / "logs")
    booking = ledger.reserve("the-process", "cpu", 1)
    runtime = OneRunningProcess(real, LoadRequest(name, str(model_dir), "embedded", "text-generation", booking))
    control = ControlActivities(
        ["embedded"], static_nodes(NodeInventory(node, [cpu], ["embedded"], time.time())), client=env.client
    )
    node_acts = NodeActivities(node, ledger, {"embedded": runtime}, Metrics())  # type: ignore[dict-item]
    try:
        async with (
            Worker(env.client, task_queue=control_queue, workflows=[ModelLifecycleWorkflow], activities=control.all()),
            Worker(env.client, task_queue=node_task_queue(node), activities=node_acts.all()),
        ):
            fp, _ = fingerprint(model_dir)
            handle = await env.client.start_workflow(
                ModelLifecycleWorkflow.run,
                LifecycleInput(ModelSource(name, str(model_dir), fp), idle_seconds=600, history_limit=HISTORY_LIMIT),
                id=workflow_id(name),
                task_queue=control_queue,
            )
            started = time.monotonic()
            first_run = handle.result_run_id
            first = await handle.execute_update(
                ModelLifecycleWorkflow.ensure_loaded, EnsureLoadedRequest(idle_seconds=1234)
            )
            assert first.phase == Phase.LOADED and first.load_count == 1
            for cycle in range(1, CYCLES + 1):
                if cycle > 1:
                    state = await handle.execute_update(ModelLifecycleWorkflow.ensure_loaded, EnsureLoadedRequest())
                    assert state.phase == Phase.LOADED
                await handle.signal(ModelLifecycleWorkflow.record_usage, UsageReport(2, {"acme": 2}))
                down = await handle.execute_update(
                    ModelLifecycleWorkflow.ensure_unloaded, EnsureUnloadedRequest(f"cycle {cycle}")
                )
                assert down.phase == Phase.UNLOADED
            took = time.monotonic() - started

            state = await handle.query(ModelLifecycleWorkflow.state)
            assert state.load_count == CYCLES
            assert state.request_count == 2 * CYCLES
            assert state.requests_by_organization == {"acme": 2 * CYCLES}
            assert state.idle_seconds == 1234, "a setting made in the first run survives every continue-as-new"
            assert ledger.get(name) is None

            # Every run ended by continuing as new within the suggested bound, and the current one
            # is short: the history of a model does not grow with its number of loads.
            runs, longest = 0, 0
            # Follow the chain of runs from the first: each ended by continuing as new.
            runs, longest, current = 0, 0, 0
            run_id: str | None = first_run
            while run_id:
                run = env.client.get_workflow_handle(workflow_id(name), run_id=run_id)
                events = [e async for e in run.fetch_history_events()]
                runs += 1
                longest = max(longest, len(events))
                last = events[-1]
                if last.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW:
                    run_id = last.workflow_execution_continued_as_new_event_attributes.new_execution_run_id
                else:
                    current, run_id = len(events), None
            assert runs >= CYCLES * 20 // HISTORY_LIMIT, f"only {runs} runs for {CYCLES} cycles"
            # A run ends at the first rest or idle loop past the bound: at most one cycle beyond it.
            assert longest < HISTORY_LIMIT + 40, f"a run grew to {longest} events"
            assert current < HISTORY_LIMIT + 40
            print(
                f"\n{CYCLES} load/unload cycles in {took:.0f}s: {runs} runs, the longest {longest} events, "
                f"the current {current}"
            )
            await handle.terminate("test over")
    finally:
        await runtime.stop_all()
        await env.shutdown()
