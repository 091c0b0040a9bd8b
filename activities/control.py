"""Activities of the control task queue: read a model directory, decide where it runs, make room."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import replace
from datetime import timedelta
from typing import Any

from temporalio import activity
from temporalio.client import Client, WorkflowQueryFailedError, WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError

from activities import expected_failure
from modelium import llm_brain
from modelium.analyzer import ModelDirectoryError, analyze_directory, warm_up
from modelium.brain import EvictionPolicy, ModelTooLarge, NoCapacity, NoRuntimeAvailable, place
from modelium.config import Eviction as EvictionConfig
from modelium.config import LlmBrain, ModelSettings
from modelium.metrics import Metrics
from modelium.names import workflow_id
from modelium.overrides import read_overrides
from modelium.types import Decision, ModelAnalysis, ModelSource, ModelState, NodeInventory, Phase, Resident
from workflows.contracts import (
    NODE_KEY,
    PHASE_KEY,
    ActivityName,
    CapacityFreed,
    ErrorType,
    EvictCommand,
    EvictRequest,
    EvictResult,
    NodeLost,
    failure_message,
    listed_inventory,
    listed_state,
    running_models_query,
    running_nodes_query,
)
from workflows.nodes import NodeRegistryWorkflow
from workflows.steps import DecideRequest, UpdateOutcome

# Where the nodes' inventories and the loaded models come from: workflows in production, fixed
# lists in tests.
NodeSource = Callable[[], Awaitable[list[NodeInventory]]]
ResidentSource = Callable[[], Awaitable[list[Resident]]]
_QUERY_TIMEOUT = timedelta(seconds=5)
# How long a decision waits for a first live node before it says there is none.
NODE_WAIT_SECONDS = 10.0


def static_nodes(*nodes: NodeInventory) -> NodeSource:
    async def source() -> list[NodeInventory]:
        return list(nodes)

    return source


async def no_residents() -> list[Resident]:
    return []


class RegistryNodes:
    """The node agents not declared lost, from their workflows (each declares its node lost once
    it missed `node.lost_after_seconds` of announcements, and marks it so in its memo)."""

    # Inventories are announced every few seconds anyway: decisions within this long of each
    # other share one read (a burst of thousands of registrations would query once each).
    FRESH_SECONDS = 0.5

    def __init__(self, client: Client) -> None:
        self._client = client
        self._read: tuple[float, asyncio.Task[list[NodeInventory]]] | None = None

    async def __call__(self) -> list[NodeInventory]:
        now = time.monotonic()
        last = self._read
        failed = last is not None and last[1].done() and (last[1].cancelled() or last[1].exception() is not None)
        if last is None or now - last[0] > self.FRESH_SECONDS or failed:
            last = self._read = (now, asyncio.ensure_future(self._read_nodes()))
        return list(await asyncio.shield(last[1]))

    async def _read_nodes(self) -> list[NodeInventory]:
        """From one List call: each node workflow keeps its inventory in its memo. One that does
        not (started by an older version) is asked by query."""
        found: list[NodeInventory] = []
        unlisted: list[str] = []
        async for execution in self._client.list_workflows(running_nodes_query()):
            inventory = await listed_inventory(execution)
            if inventory is None:
                unlisted.append(execution.id)
            else:
                found.append(inventory)

        async def one(wf_id: str) -> NodeInventory | None:
            try:
                inventory: NodeInventory = await self._client.get_workflow_handle(wf_id).query(
                    NodeRegistryWorkflow.inventory, rpc_timeout=_QUERY_TIMEOUT
                )
            except (RPCError, WorkflowQueryFailedError) as exc:
                activity.logger.warning("node workflow %s did not answer: %s", wf_id, exc)
                return None
            return inventory

        # All at once: one node workflow that cannot answer costs one timeout, not one each.
        found += [inv for inv in await asyncio.gather(*(one(i) for i in unlisted)) if inv is not None]
        return [inv for inv in found if inv.lost is None]


class RegistryResidents:
    """The loaded models, from their workflows: what they hold and how they have been used."""

    def __init__(self, client: Client) -> None:
        self._client = client

    async def __call__(self) -> list[Resident]:
        from workflows.lifecycle import ModelLifecycleWorkflow

        # Loaded models, and parked ones (asleep: evicting them frees their host memory, and
        # what they still hold on the GPU).
        handles = [
            self._client.get_workflow_handle(execution.id)
            for phase in (Phase.LOADED, Phase.PARKED)
            async for execution in self._client.list_workflows(running_models_query(**{PHASE_KEY.name: phase}))
        ]

        async def state(handle: Any) -> ModelState | None:
            try:
                return await handle.query(ModelLifecycleWorkflow.state, rpc_timeout=_QUERY_TIMEOUT)  # type: ignore[no-any-return]
            except (RPCError, WorkflowQueryFailedError):
                return None

        found = []
        for s in await asyncio.gather(*(state(h) for h in handles)):
            if s is None or s.phase not in (Phase.LOADED, Phase.PARKED) or s.booking is None:
                continue
            resident = Resident(
                model=s.name,
                node=s.booking.node,
                devices=s.booking.all_devices,
                bytes=s.booking.bytes,
                # One whose new version is on its way (or whose old one drains) is not evicted.
                pinned=s.pinned or s.update_state not in (None, "update_failed"),
                loaded_at=s.loaded_at or 0.0,
                last_used_at=s.last_used_at or s.loaded_at or 0.0,
                load_seconds=s.load_seconds,
                pid=s.endpoint.pid if s.endpoint else None,
            )
            found.append(resident)
            if s.phase == Phase.PARKED and s.parked_bytes:
                # Its weights in the node's host memory: the same model, evicted once.
                found.append(replace(resident, devices=["cpu"], bytes=s.parked_bytes))
        return found


def _bad_directory(message: str) -> ApplicationError:
    return expected_failure(message, ErrorType.BAD_MODEL_DIRECTORY)


class ControlActivities:
    def __init__(
        self,
        runtimes: Collection[str],
        nodes: NodeSource,
        *,
        residents: ResidentSource = no_residents,
        eviction: EvictionConfig | None = None,
        llm: LlmBrain | None = None,
        models: Mapping[str, ModelSettings] | None = None,
        metrics: Metrics | None = None,
        client: Client | None = None,
    ) -> None:
        # The analyzer's transformers tables: read them now, not inside the first analysis.
        warm_up()
        self._runtimes = tuple(runtimes)
        self._nodes = nodes
        self._residents = residents
        self._eviction = eviction or EvictionConfig()
        self._llm = llm
        self._models = dict(models or {})
        self._metrics = metrics or Metrics()
        self._client = client

    @activity.defn(name=ActivityName.ANALYZE_MODEL)
    async def analyze_model(self, source: ModelSource) -> ModelAnalysis:
        try:
            analysis = await asyncio.to_thread(analyze_directory, source.path, source.name, version=source.version)
        except ModelDirectoryError as exc:
            raise _bad_directory(f"{source.path}: {exc}") from None
        try:
            analysis.overrides = read_overrides(source.path, source.name, self._models)
        except ModelDirectoryError as exc:
            raise _bad_directory(str(exc)) from None
        activity.logger.info("analyzed %s: %s", source.name, analysis.summary())
        return analysis

    @activity.defn(name=ActivityName.DECIDE_RUNTIME)
    async def decide_runtime(self, request: DecideRequest) -> Decision:
        async def usable() -> list[NodeInventory]:
            return [n for n in await self._nodes() if n.node not in request.avoid_nodes]

        nodes = await usable()
        # At start-up the node agents' first announcements may not be read yet: a model found in
        # that moment waits for one a little rather than resting for want of a node.
        deadline = time.monotonic() + NODE_WAIT_SECONDS
        while not nodes and time.monotonic() < deadline:
            if not activity.info().is_local:  # a local activity (the usual) has no heartbeat
                activity.heartbeat("waiting for a node agent to announce itself")
            await asyncio.sleep(0.5)
            nodes = await usable()
        policy = EvictionPolicy(
            now=time.time(),
            min_resident_seconds=self._eviction.min_resident_seconds,
            min_idle_seconds=self._eviction.min_idle_seconds,
            enabled=self._eviction.enabled,
            policy=self._eviction.policy,
        )
        analysis, override = request.analysis, request.runtime_override
        try:
            try:
                decision = place(analysis, self._runtimes, nodes, override, overrides=request.overrides)
            except ModelTooLarge:
                raise
            except NoCapacity as exc:
                if not request.may_evict:
                    return self._where_it_would_go(request, nodes, exc)
                if not policy.enabled:
                    raise
                # Only now is it worth reading every loaded model's state: to choose whom to evict.
                decision = place(
                    analysis,
                    self._runtimes,
                    nodes,
                    override,
                    overrides=request.overrides,
                    residents=await self._residents(),
                    policy=policy,
                )
        except NoRuntimeAvailable as exc:
            raise ApplicationError(str(exc), type=ErrorType.NO_RUNTIME, non_retryable=True) from None
        except ModelTooLarge as exc:
            # Not a wait for room: no node could ever hold it. The model fails, saying why.
            raise ApplicationError(str(exc), type=ErrorType.MODEL_TOO_LARGE, non_retryable=True) from None
        except NoCapacity as exc:
            raise expected_failure(str(exc), ErrorType.NO_CAPACITY) from None
        overridden = request.overrides is not None and (
            request.overrides.runtime or request.overrides.devices or request.overrides.node
        )
        # The LLM proposes only where the rules found room without evicting and the user fixed
        # nothing; when its answer cannot be used, the rules' decision stands and says why.
        # (Nor for the brain's own model, when Modelium serves it: it cannot answer before it runs.)
        llm = self._llm
        if (
            llm is not None
            and llm.enabled
            and not decision.evict
            and not overridden
            and llm.model != request.analysis.name
        ):
            try:
                decision = await llm_brain.ask(llm, request.analysis, self._runtimes, nodes)
            except llm_brain.LlmAnswerRejected as exc:
                activity.logger.warning("LLM brain answer not used for %s: %s", request.analysis.name, exc)
                decision.reason = f"{decision.reason} (LLM brain answer not used: {exc})"
        self._metrics.brain_decisions.labels(runtime=decision.runtime, source=decision.source).inc()
        return decision

    def _where_it_would_go(self, request: DecideRequest, nodes: list[NodeInventory], no_room: NoCapacity) -> Decision:
        """A preload with no free room: the placement it would get on emptied nodes, marked
        `no_room`, so the resting model shows its runtime and node. Without even that (no
        live node, say), the NoCapacity stands."""
        emptied = [replace(n, devices=[replace(d, booked_bytes=0) for d in n.devices]) for n in nodes]
        try:
            decision = place(
                request.analysis, self._runtimes, emptied, request.runtime_override, overrides=request.overrides
            )
        except (NoCapacity, NoRuntimeAvailable):
            raise no_room from None
        decision.no_room = str(no_room)
        return decision

    @activity.defn(name=ActivityName.EVICT_MODELS)
    async def evict_models(self, request: EvictRequest) -> EvictResult:
        """Ask each chosen model's workflow to unload (its `evict` update re-checks that it is
        still idle and unpinned); wait until each is down. The reason lands in its history."""
        from workflows.lifecycle import ModelLifecycleWorkflow

        client = self._require_client()
        evicted: list[str] = []
        refused: dict[str, str] = {}
        pids: list[int] = []

        async def one(victim: Any) -> None:
            handle = client.get_workflow_handle(workflow_id(victim.model))
            command = EvictCommand(victim.reason, request.for_model, self._eviction.min_idle_seconds)
            try:
                await handle.execute_update(ModelLifecycleWorkflow.evict, command)
            except WorkflowUpdateFailedError as exc:
                refused[victim.model] = failure_message(exc)
                return
            except RPCError as exc:
                refused[victim.model] = exc.message
                return
            evicted.append(victim.model)
            if victim.pid is not None:
                pids.append(victim.pid)
            self._metrics.evictions.labels(node=victim.node).inc()

        await asyncio.gather(*(one(v) for v in request.victims))
        activity.logger.info("evicted %s for %s; kept %s", evicted or "nothing", request.for_model, refused or "none")
        return EvictResult(sorted(evicted), refused, pids)

    @activity.defn(name=ActivityName.NOTIFY_WAITING)
    async def notify_waiting(self, notice: CapacityFreed) -> int:
        """Memory was released on `notice.node`: wake the first models waiting for capacity, in
        order (pinned, then first asked), as many as the freed bytes hold by their estimates and
        at least one. Not a broadcast: every other waiter stays asleep. With `notice.after`, only
        waiters behind that place are woken (a woken waiter that did not fit passes it on)."""
        from workflows.lifecycle import ModelLifecycleWorkflow

        client = self._require_client()
        query = running_models_query(**{PHASE_KEY.name: Phase.WAITING_FOR_CAPACITY})
        waiters: list[tuple[tuple[int, float], str, int]] = []
        async for execution in client.list_workflows(query):
            state = await listed_state(execution)
            if state is None or state.name == notice.model:
                continue
            order = state.wait_order()
            if notice.after is not None and order <= tuple(notice.after):
                continue
            need = state.measured_memory_bytes or state.memory_estimate_bytes or 0
            waiters.append((order, execution.id, need))
        told, room = 0, notice.bytes
        for _order, wf_id, need in sorted(waiters):
            if told and need > room:
                break
            try:
                await client.get_workflow_handle(wf_id).signal(ModelLifecycleWorkflow.capacity_freed, notice)
            except RPCError:
                continue  # it ended meanwhile
            told += 1
            room -= need
        activity.logger.info(
            "%s freed room on %s: woke %d of %d waiting model(s)", notice.model, notice.node, told, len(waiters)
        )
        return told

    @activity.defn(name=ActivityName.NOTIFY_NODE_LOST)
    async def notify_node_lost(self, notice: NodeLost) -> int:
        """Tell every model placed on a lost node: each stops waiting on the node's task queue,
        writes off its booking there, and is placed again."""
        from workflows.lifecycle import ModelLifecycleWorkflow

        client = self._require_client()
        told = 0
        async for execution in client.list_workflows(running_models_query(**{NODE_KEY.name: notice.node})):
            try:
                await client.get_workflow_handle(execution.id).signal(ModelLifecycleWorkflow.node_lost, notice)
                told += 1
            except RPCError:
                continue  # it ended meanwhile
        activity.logger.warning("%s; told %d model(s) to be placed again", notice.reason, told)
        return told

    def _require_client(self) -> Client:
        if self._client is None:
            raise ApplicationError("this control worker has no Temporal client", non_retryable=True)
        return self._client

    @activity.defn(name=ActivityName.COUNT_UPDATE)
    async def count_update(self, outcome: UpdateOutcome) -> None:
        self._metrics.updates.labels(model=outcome.model, result=outcome.result).inc()

    def all(self) -> list[Callable[..., Any]]:
        return [
            self.analyze_model,
            self.decide_runtime,
            self.evict_models,
            self.notify_waiting,
            self.notify_node_lost,
            self.count_update,
        ]
