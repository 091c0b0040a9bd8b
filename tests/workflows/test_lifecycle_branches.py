"""The lifecycle's branches in seconds: the real ModelLifecycle workflow on the session's Temporal,
with its activities stubbed by functions of the same names (a workflow change is checked here
without loading a model; the end-to-end tests run the real activities)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from temporalio import activity
from temporalio.client import Client, WorkflowHandle, WorkflowUpdateFailedError, WorkflowUpdateStage
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from modelium.names import node_task_queue, workflow_id
from modelium.types import (
    Booking,
    Decision,
    Endpoint,
    EndpointProtocol,
    LoadRequest,
    ModelAnalysis,
    ModelSource,
    Phase,
    Task,
)
from tests.helpers import end_workflows_of, unique, wait_for
from workflows.contracts import (
    ActivityName,
    CapacityFreed,
    EnsureLoadedRequest,
    ErrorType,
    LifecycleInput,
    Preload,
    RouteWatch,
)
from workflows.lifecycle import ModelLifecycleWorkflow
from workflows.steps import (
    DecideRequest,
    DrainRequest,
    HealthRequest,
    LoadResult,
    ParkRequest,
    ParkResult,
    ReserveRequest,
    SmokeRequest,
    UnloadRequest,
    UpdateOutcome,
    WakeRequest,
)

NODE = "stub-node"


@dataclass
class Stubs:
    """What the stubbed activities answer, and what they were asked."""

    bad_directory: bool = False
    no_room: str | None = None
    park_error: str | None = None
    wake_error: str | None = None
    # Answers of the next decisions' `no_room`, first to last (then `no_room`).
    no_room_next: list[str | None] = field(default_factory=list)
    # When set, a smoke check waits for it (a switch held near).
    smoke_gate: asyncio.Event | None = None
    calls: list[str] = field(default_factory=list)

    def activities(self) -> list[object]:
        @activity.defn(name=ActivityName.ANALYZE_MODEL)
        async def analyze_model(source: ModelSource) -> ModelAnalysis:
            self.calls.append("analyze")
            if self.bad_directory:
                raise ApplicationError(
                    "config.json: not valid JSON", type=ErrorType.BAD_MODEL_DIRECTORY, non_retryable=True
                )
            return ModelAnalysis(
                source.name,
                source.path,
                "huggingface",
                "GPT2LMHeadModel",
                "gpt2",
                Task.TEXT_GENERATION,
                "text",
                memory_estimate_bytes=2**20,
            )

        @activity.defn(name=ActivityName.DECIDE_RUNTIME)
        async def decide_runtime(request: DecideRequest) -> Decision:
            self.calls.append(f"decide may_evict={request.may_evict}")
            no_room = self.no_room_next.pop(0) if self.no_room_next else self.no_room
            if no_room is not None and request.may_evict:
                # As the rules answer demand that finds no room: an error, not a decision.
                raise ApplicationError(no_room, type=ErrorType.NO_CAPACITY, non_retryable=True)
            return Decision("embedded", NODE, "cpu", "stub", memory_bytes=2**20, no_room=no_room)

        @activity.defn(name=ActivityName.RESERVE_GPU)
        async def reserve_gpu(request: ReserveRequest) -> Booking:
            self.calls.append("reserve")
            return Booking(request.model, NODE, request.device, request.bytes)

        @activity.defn(name=ActivityName.LOAD_MODEL)
        async def load_model(request: LoadRequest) -> LoadResult:
            self.calls.append("load")
            return LoadResult(Endpoint("http://127.0.0.1:9", EndpointProtocol.OPENAI, "embedded", NODE, 1), 0.1)

        @activity.defn(name=ActivityName.UNLOAD_MODEL)
        async def unload_model(request: UnloadRequest) -> None:
            self.calls.append(f"unload {request.kind}")

        @activity.defn(name=ActivityName.RELEASE_GPU)
        async def release_gpu(model: str) -> None:
            self.calls.append("release")

        @activity.defn(name=ActivityName.CHECK_HEALTH)
        async def check_health(request: HealthRequest) -> None:
            self.calls.append("health")

        @activity.defn(name=ActivityName.NOTIFY_WAITING)
        async def notify_waiting(notice: CapacityFreed) -> int:
            return 0

        @activity.defn(name=ActivityName.SMOKE_CHECK)
        async def smoke_check(request: SmokeRequest) -> str:
            self.calls.append("smoke")
            if self.smoke_gate is not None:
                await self.smoke_gate.wait()
            return "answered one token"

        @activity.defn(name=ActivityName.DRAIN_RUNTIME)
        async def drain_runtime(request: DrainRequest) -> str:
            self.calls.append(f"drain {request.model}")
            return "drained"

        @activity.defn(name=ActivityName.COUNT_UPDATE)
        async def count_update(outcome: UpdateOutcome) -> None:
            self.calls.append(f"update {outcome.result}")

        @activity.defn(name=ActivityName.PARK_MODEL)
        async def park_model(request: ParkRequest) -> ParkResult:
            self.calls.append("park")
            if self.park_error:
                raise ApplicationError(self.park_error, type=ErrorType.INSUFFICIENT_CAPACITY, non_retryable=True)
            return ParkResult(gpu_bytes=2**10, host_bytes=request.host_bytes)

        @activity.defn(name=ActivityName.WAKE_MODEL)
        async def wake_model(request: WakeRequest) -> Booking:
            self.calls.append("wake")
            if self.wake_error:
                raise ApplicationError(self.wake_error, type=ErrorType.INSUFFICIENT_CAPACITY, non_retryable=True)
            return Booking(request.model, NODE, request.device, request.bytes)

        return [
            analyze_model,
            decide_runtime,
            reserve_gpu,
            load_model,
            unload_model,
            release_gpu,
            check_health,
            notify_waiting,
            park_model,
            wake_model,
            smoke_check,
            drain_runtime,
            count_update,
        ]


@pytest.fixture
async def stubbed(temporal_env: WorkflowEnvironment) -> AsyncIterator[tuple[Client, Stubs, str]]:
    client, stubs, queue = temporal_env.client, Stubs(), unique("control")
    control = Worker(client, task_queue=queue, workflows=[ModelLifecycleWorkflow], activities=stubs.activities())
    node = Worker(client, task_queue=node_task_queue(NODE), activities=stubs.activities())
    async with control, node:
        yield client, stubs, queue
        await end_workflows_of(client, queue)


async def _start(client: Client, queue: str, **inp: object) -> WorkflowHandle[ModelLifecycleWorkflow, object]:
    name = unique("branch")
    source = ModelSource(name, f"/models/{name}", "f1")
    return await client.start_workflow(
        ModelLifecycleWorkflow.run,
        LifecycleInput(source, **inp),  # type: ignore[arg-type]
        id=workflow_id(name),
        task_queue=queue,
    )


async def _phase(handle: WorkflowHandle[ModelLifecycleWorkflow, object], phase: Phase) -> object:
    async def reached() -> object:
        state = await handle.query(ModelLifecycleWorkflow.state)
        return state if state.phase == phase else None

    return await wait_for(reached, timeout=20, interval=0.05, what=f"phase {phase}")


async def test_fits_loads_and_unloads_on_request(stubbed: tuple[Client, Stubs, str]) -> None:
    client, stubs, queue = stubbed
    handle = await _start(client, queue)
    state = await _phase(handle, Phase.LOADED)
    assert state.endpoint.url == "http://127.0.0.1:9" and state.load_count == 1  # type: ignore[attr-defined]
    assert stubs.calls == ["analyze", "decide may_evict=False", "reserve", "load"]
    await handle.execute_update(ModelLifecycleWorkflow.ensure_unloaded)
    await _phase(handle, Phase.UNLOADED)
    assert stubs.calls[-2:] == ["unload requested", "release"]


async def test_a_bad_directory_fails_without_retries(stubbed: tuple[Client, Stubs, str]) -> None:
    client, stubs, queue = stubbed
    stubs.bad_directory = True
    handle = await _start(client, queue)
    state = await _phase(handle, Phase.FAILED)
    assert "not valid JSON" in (state.last_error or "")  # type: ignore[attr-defined]
    assert stubs.calls == ["analyze"]  # non-retryable: asked once, nothing booked


async def test_no_room_rests_until_demand_then_may_evict(stubbed: tuple[Client, Stubs, str]) -> None:
    client, stubs, queue = stubbed
    stubs.no_room = "node stub-node is full"
    handle = await _start(client, queue, preload=Preload.FIT)
    state = await _phase(handle, Phase.UNLOADED)
    assert "not preloaded: no free room" in (state.rest_reason or "")  # type: ignore[attr-defined]
    assert stubs.calls == ["analyze", "decide may_evict=False"]
    # A request is demand: it decides again, now allowed to evict, and loads.
    stubs.no_room = None
    demand = asyncio.create_task(
        handle.execute_update(ModelLifecycleWorkflow.ensure_loaded, EnsureLoadedRequest("a request", wait_seconds=20))
    )
    loaded = await asyncio.wait_for(demand, timeout=30)
    assert loaded.phase == Phase.LOADED
    assert stubs.calls[2:] == ["decide may_evict=True", "reserve", "load"]


async def test_parks_when_idle_wakes_on_demand_and_falls_back_when_either_fails(
    stubbed: tuple[Client, Stubs, str],
) -> None:
    client, stubs, queue = stubbed
    handle = await _start(client, queue, idle_seconds=1, park_runtimes=["embedded"])

    async def asleep() -> object:
        state = await handle.query(ModelLifecycleWorkflow.state)
        return state if state.phase == Phase.PARKED and state.parked_bytes else None

    parked = await wait_for(asleep, timeout=20, interval=0.05, what="parked, its bookings taken")
    assert stubs.calls[-1] == "park" and "release" not in stubs.calls
    assert (parked.booking.bytes, parked.wake_bytes) == (2**10, 2**20)  # type: ignore[attr-defined]
    # A request wakes it: the GPU booking comes back, nothing is loaded again.
    loaded = await handle.execute_update(ModelLifecycleWorkflow.ensure_loaded, EnsureLoadedRequest("a request"))
    assert loaded.phase == Phase.LOADED and loaded.load_count == 1 and loaded.booking.bytes == 2**20
    assert stubs.calls[-1] == "wake"
    # Idle again, and it cannot wake this time (its GPU room went): it is loaded afresh.
    await wait_for(asleep, timeout=20, interval=0.05, what="parked again")
    stubs.wake_error = "no room to wake it"
    loaded = await handle.execute_update(ModelLifecycleWorkflow.ensure_loaded, EnsureLoadedRequest("a request"))
    assert loaded.phase == Phase.LOADED and loaded.load_count == 2
    assert stubs.calls[-6:] == ["wake", "unload unhealthy", "release", "decide may_evict=True", "reserve", "load"]
    # Idle once more, and there is no room to park it: it is unloaded as before parking existed.
    stubs.park_error = "no room to park it"
    state = await _phase(handle, Phase.UNLOADED)
    assert stubs.calls[-3:] == ["park", "unload idle", "release"]
    assert "could not park it" in (state.last_error or "")  # type: ignore[attr-defined]


async def test_a_new_version_placed_on_a_stale_view_decides_again_before_it_recreates(
    stubbed: tuple[Client, Stubs, str],
) -> None:
    """Right after a booking was released, placement's view of the node can still count it: the
    first decision finds no room beside the serving version, the second (on a fresh view) does,
    and the update is blue/green, not a recreate."""
    client, stubs, queue = stubbed
    handle = await _start(client, queue, beside_runtimes=["embedded"])
    state = await _phase(handle, Phase.LOADED)
    stubs.no_room_next = ["stub-node/cpu has 0 MiB free (a view from before a release)", None]
    await handle.signal(ModelLifecycleWorkflow.files_changed, ModelSource(state.name, state.path, "f2"))  # type: ignore[attr-defined]

    async def switched() -> object:
        now = await handle.query(ModelLifecycleWorkflow.state)
        return now if now.switched_at is not None and now.update_state is None else None

    done = await wait_for(switched, timeout=30, interval=0.05, what="the new version switched to")
    assert done.load_count == 2 and done.key.endswith("@u1")  # type: ignore[attr-defined]
    after = stubs.calls[stubs.calls.index("load") + 1 :]
    assert after[:6] == [
        "analyze",
        "decide may_evict=True",
        "decide may_evict=True",
        "reserve",
        "load",
        "smoke",
    ], after
    assert "update switched" in after and "update recreated" not in after


async def test_a_gateway_is_told_of_the_switch_it_asked_about(stubbed: tuple[Client, Stubs, str]) -> None:
    """`route_changed`, asked about a loaded model's instance, answers with the new instance in
    the step that switches to it (here while its new version was being checked); asked about an
    instance requests no longer go to, it is refused."""
    client, stubs, queue = stubbed
    handle = await _start(client, queue, beside_runtimes=["embedded"])
    state = await _phase(handle, Phase.LOADED)
    with pytest.raises(WorkflowUpdateFailedError) as refused:
        await handle.execute_update(ModelLifecycleWorkflow.route_changed, RouteWatch(f"{state.name}@u9"))  # type: ignore[attr-defined]
    assert "read its state" in str(refused.value.cause)
    notice = await handle.start_update(
        ModelLifecycleWorkflow.route_changed,
        RouteWatch(state.key),  # type: ignore[attr-defined]
        wait_for_stage=WorkflowUpdateStage.ACCEPTED,
    )
    stubs.smoke_gate = asyncio.Event()
    await handle.signal(ModelLifecycleWorkflow.files_changed, ModelSource(state.name, state.path, "f2"))  # type: ignore[attr-defined]

    async def checking() -> object:
        now = await handle.query(ModelLifecycleWorkflow.state)
        return now if now.update_state == "smoke_check" else None

    await wait_for(checking, timeout=30, interval=0.05, what="the new version's smoke check")
    stubs.smoke_gate.set()
    switched = await notice.result()
    assert switched.key == f"{state.name}@u1" and switched.update_state == "draining"  # type: ignore[attr-defined]
    assert switched.switched_at is not None
