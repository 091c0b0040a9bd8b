"""The node agent: the activities of one machine's task queue, and its runtime processes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from datetime import timedelta

from temporalio.client import Client, WorkflowQueryFailedError
from temporalio.service import RPCError
from temporalio.worker import Worker

from activities.node import NodeActivities
from modelium.config import Settings
from modelium.gpu import GpuReader, MemoryProfiles, NvmlReader
from modelium.ledger import Ledger, system_memory_bytes
from modelium.metrics import Metrics
from modelium.names import PARKED_MARK, model_of, node_task_queue, node_workflow_id, workflow_id
from modelium.runtimes import EMBEDDED, RAY_SERVE, TRITON, VLLM, enabled_runtimes
from modelium.runtimes.base import RuntimeAdapter
from modelium.runtimes.embedded import EmbeddedRuntimeAdapter
from modelium.runtimes.ray_serve import RayServeRuntimeAdapter
from modelium.runtimes.triton import TritonRuntimeAdapter
from modelium.runtimes.vllm import VllmRuntimeAdapter
from modelium.runtimes.warm_pool import POOL_BOOKING
from modelium.types import DeviceInventory, ModelState, NodeInventory, Phase
from workflows.contracts import (
    NODE_KEY,
    PHASE_KEY,
    HealthReport,
    LeaveRequest,
    NodeRegistryInput,
    running_models_query,
)
from workflows.lifecycle import ModelLifecycleWorkflow
from workflows.nodes import NodeRegistryWorkflow

log = logging.getLogger(__name__)

# Placement stops using a node silent for this many announcement intervals (RegistryNodes); it is
# declared lost, and its models moved, after node.lost_after_seconds, and never sooner.
LOST_AFTER_ANNOUNCEMENTS = 3
# After a booking changes, the next announcement waits this long, so that a burst of bookings
# makes one announcement.
BOOKING_ANNOUNCE_DELAY = 0.1


@dataclass
class NodeAgent:
    worker: Worker
    adapters: dict[str, RuntimeAdapter]
    ledger: Ledger
    node_id: str
    gpu: GpuReader
    activities: NodeActivities
    adopted: list[str] = field(default_factory=list)

    async def adopt_runtimes(self) -> list[str]:
        """Before taking work: take over the runtimes a killed node agent left running."""
        adopted = []
        for adapter in self.adapters.values():
            adopted += await adapter.adopt()
        self.adopted = adopted
        if adopted:
            log.info("node %s adopted %d running model(s): %s", self.node_id, len(adopted), ", ".join(adopted))
        return adopted

    def start_warm_pool(self) -> None:
        """After `adopt_runtimes`: the embedded runtime's spares, booked in the CPU budget."""
        embedded = self.adapters.get(EMBEDDED)
        if isinstance(embedded, EmbeddedRuntimeAdapter):
            embedded.start_pool(self.ledger, self.activities.bookings_changed.set)

    async def shutdown_runtimes(self) -> None:
        for adapter in self.adapters.values():
            await adapter.stop_all()

    def inventory(self) -> NodeInventory:
        gpus = {g.device: g for g in self.gpu.gpus()}
        devices = []
        for device, total in self.ledger.capacities.items():
            gpu = gpus.get(device)
            devices.append(
                DeviceInventory(
                    device=device,
                    name=gpu.name if gpu else "CPU (memory budget)",
                    total_bytes=total,
                    used_bytes=gpu.used_bytes if gpu else None,
                    booked_bytes=self.ledger.booked(device),
                )
            )
        return NodeInventory(self.node_id, devices, sorted(self.adapters), time.time())


async def announce_forever(
    client: Client, agent: NodeAgent, control_queue: str, interval: float, lost_after: float
) -> None:
    """Tell the control plane, every `interval` seconds, what this node has (signal-with-start of
    the node's workflow), so decide can place models here and sees when the node is gone."""
    wf_id = node_workflow_id(agent.node_id)
    changed = agent.activities.bookings_changed
    while True:
        try:
            await report_peaks(client, agent)
        except Exception:
            # Announcing is how the control plane knows this node is alive: a failed measurement
            # must not stop it (it is logged, and tried again next time).
            log.exception("tracking the memory peaks of node %s failed", agent.node_id)
        agent.activities.refresh_device_gauges()
        changed.clear()
        inventory = agent.inventory()
        try:
            await client.start_workflow(
                NodeRegistryWorkflow.run,
                NodeRegistryInput(inventory, max(lost_after, LOST_AFTER_ANNOUNCEMENTS * interval)),
                id=wf_id,
                task_queue=control_queue,
                start_signal="announce",
                start_signal_args=[inventory],
            )
        except RPCError as exc:
            log.warning("could not announce node %s: %s", agent.node_id, exc.message)
        # Early when a booking was made or released: placement then sees the room as it is
        # (decisions racing on a stale inventory would lose their reservations).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), timeout=interval)
            await asyncio.sleep(BOOKING_ANNOUNCE_DELAY)


async def report_peaks(client: Client, agent: NodeAgent) -> None:
    """Tell each model's workflow when its runtime held more memory than ever before."""
    for peak in await asyncio.to_thread(agent.activities.track_peaks):
        agent.activities.bookings_changed.set()  # its booking may have grown
        try:
            await client.get_workflow_handle(workflow_id(model_of(peak.model))).signal(
                ModelLifecycleWorkflow.memory_peak, peak
            )
        except RPCError as exc:
            log.info("could not report %s's memory peak: %s", peak.model, exc.message)


async def watch_processes(client: Client, agent: NodeAgent, interval: float) -> None:
    """Notice runtime processes that exited on their own (crashed, killed) and tell their
    workflows, which restart them; each death is reported once."""
    reported: set[tuple[str, int | None]] = set()
    while True:
        dead = {(model, pid) for adapter in agent.adapters.values() for model, pid in adapter.dead().items()}
        for model, pid in dead - reported:
            log.warning("runtime process %s of %s exited on its own", pid, model)
            try:
                await client.get_workflow_handle(workflow_id(model_of(model))).signal(
                    ModelLifecycleWorkflow.report_unhealthy,
                    HealthReport(f"its runtime process {pid} ({model}) on node {agent.node_id} exited"),
                )
            except RPCError as exc:
                log.warning("could not report %s's exit: %s", model, exc.message)
                continue
            reported.add((model, pid))
        reported &= dead
        await asyncio.sleep(interval)


async def leave(client: Client, agent: NodeAgent, reason: str) -> None:
    try:
        await client.get_workflow_handle(node_workflow_id(agent.node_id)).signal(
            NodeRegistryWorkflow.leave, LeaveRequest(reason)
        )
    except RPCError as exc:
        log.info("could not tell the control plane that node %s leaves: %s", agent.node_id, exc.message)


def node_agent(client: Client, settings: Settings, metrics: Metrics, gpu: GpuReader | None = None) -> NodeAgent:
    """`gpu` is the NVML seam: the real NVML unless a caller (a CPU-only test) gives another."""
    node_id = settings.node.id
    node_dir = settings.state_dir / "nodes" / node_id
    reader = gpu if gpu is not None else NvmlReader()
    budget = settings.node.cpu_memory_budget_bytes or system_memory_bytes() // 2
    # Every GPU by its total memory, and the CPU's budget for models served on CPU.
    capacities = {"cpu": budget, **{g.device: g.total_bytes for g in reader.gpus()}}
    ledger = Ledger(node_dir / "bookings.json", node_id, capacities)
    # Runtimes listen on node.runtime_host; their endpoints name node.advertise_host, if set.
    host, advertise = settings.node.runtime_host, settings.node.advertise_host
    # vLLM follows node.runtime_host unless vllm.host is set.
    vllm = (
        settings.vllm if "host" in settings.vllm.model_fields_set else settings.vllm.model_copy(update={"host": host})
    )
    # The same runtimes the control worker offers (modelium.runtimes), each with its adapter.
    enabled = set(enabled_runtimes(settings))
    adapters: dict[str, RuntimeAdapter] = {
        EMBEDDED: EmbeddedRuntimeAdapter(
            node_id,
            node_dir / "logs",
            settings.runtimes.embedded,
            state_dir=node_dir / "runtimes" / EMBEDDED,
            host=host,
            advertise=advertise,
        )
    }
    if TRITON in enabled:
        adapters[TRITON] = TritonRuntimeAdapter(
            node_id, node_dir / "triton", node_dir / "logs", settings.triton, host=host, advertise=advertise
        )
    if RAY_SERVE in enabled:
        adapters[RAY_SERVE] = RayServeRuntimeAdapter(
            node_id, node_dir / "ray", node_dir / "logs", settings.ray_serve, host=host, advertise=advertise
        )
    if VLLM in enabled:
        adapters[VLLM] = VllmRuntimeAdapter(
            node_id,
            node_dir / "logs",
            vllm,
            capacities,
            reader,
            state_dir=node_dir / "runtimes" / VLLM,
            advertise=advertise,
        )
    profiles = MemoryProfiles(node_dir / "memory-profiles.json")
    acts = NodeActivities(node_id, ledger, adapters, metrics, reader, profiles)
    acts.refresh_device_gauges()
    worker = Worker(
        client,
        task_queue=node_task_queue(node_id),
        activities=acts.all(),
        # Loads wait on processes for minutes; keep room for many at once.
        max_concurrent_activities=64,
        # A load's heartbeat carries the runtime's latest output line, which GET /events shows:
        # sent every 2 s (otherwise 8 s, 0.8 of the heartbeat timeout).
        max_heartbeat_throttle_interval=timedelta(seconds=2),
    )
    return NodeAgent(worker=worker, adapters=adapters, ledger=ledger, node_id=node_id, gpu=reader, activities=acts)


async def reconcile_node(client: Client, agent: NodeAgent) -> int:
    """After a (re)start: tell workflows that believe a model is loaded here, but whose runtime is
    not running, to check and reload it; stop adopted runtimes no workflow wants here any more.
    Returns how many workflows were told."""
    running = {m for adapter in agent.adapters.values() for m in adapter.running()}
    query = running_models_query(**{NODE_KEY.name: agent.node_id, PHASE_KEY.name: Phase.LOADED})
    told = 0
    async for execution in client.list_workflows(query):
        handle = client.get_workflow_handle(execution.id)
        state = await handle.query(ModelLifecycleWorkflow.state)
        if state.key in running:
            continue
        await handle.signal(
            ModelLifecycleWorkflow.report_unhealthy,
            HealthReport(f"node agent {agent.node_id} started and does not run {state.name}"),
        )
        told += 1
    if told:
        log.info("asked %d workflow(s) to reload models this node no longer runs", told)
    # Adopted runtimes, and bookings whose runtime did not survive (the machine was lost, its models
    # were placed elsewhere meanwhile): what no workflow wants here any more is stopped and released.
    # The warm pool's booking is the node's own, not a model's.
    booked = {b.model for b in agent.ledger.bookings() if b.model != POOL_BOOKING}
    for model in sorted(set(agent.adopted) | booked):
        # A parked model's host memory (its key and PARKED_MARK) is wanted while it is parked.
        parked = model.endswith(PARKED_MARK)
        key = model.removesuffix(PARKED_MARK)
        known: ModelState | None
        try:
            known = await client.get_workflow_handle(workflow_id(model_of(key))).query(ModelLifecycleWorkflow.state)
        except (RPCError, WorkflowQueryFailedError):
            known = None
        # Wanted: its workflow holds a booking here (or is taking one now) under this key, the
        # serving instance's or, during an update, the new version's. A model written off when
        # this node was lost holds none, even while it waits to be placed again.
        held = [b for b in (known.booking, known.update_booking) if b is not None] if known else []
        if parked:
            wanted = (
                known is not None
                and known.phase in (Phase.PARKED, Phase.WAKING)
                and known.booking is not None
                and known.booking.node == agent.node_id
                and known.booking.model == key
            )
        else:
            wanted = known is not None and (
                any(b.node == agent.node_id and b.model == model for b in held)
                or (known.node == agent.node_id and known.phase == Phase.RESERVING and model == known.key)
                or (known.update_state == "loading_beside" and model != known.key)
            )
        if not wanted:
            log.info("stopping %s and dropping its booking: no workflow wants it on node %s", model, agent.node_id)
            for adapter in agent.adapters.values():
                await adapter.stop(model)
            agent.ledger.release(model)
            agent.activities.refresh_device_gauges()
    return told
