"""The control worker: ModelLifecycle and node workflows, and the analyze/decide/evict activities."""

from __future__ import annotations

import logging
from datetime import timedelta

from temporalio.client import Client
from temporalio.worker import Worker

from activities.control import ControlActivities, RegistryNodes, RegistryResidents
from modelium.config import Settings
from modelium.metrics import Metrics
from modelium.runtimes.embedded import NAME as EMBEDDED
from modelium.runtimes.ray_serve import NAME as RAY_SERVE
from modelium.runtimes.triton import NAME as TRITON
from modelium.runtimes.vllm import NAME as VLLM
from workers.node import LOST_AFTER_ANNOUNCEMENTS
from workflows.lifecycle import ModelLifecycleWorkflow
from workflows.nodes import NodeRegistryWorkflow

log = logging.getLogger(__name__)


def available_runtimes(settings: Settings) -> list[str]:
    """The runtimes models may be placed on: the embedded one, and those enabled that this build
    has an adapter for (a node places a model only on a runtime it runs too)."""
    runtimes = [EMBEDDED]
    if settings.vllm.enabled:
        runtimes.append(VLLM)
    if settings.triton.enabled:
        runtimes.append(TRITON)
    if settings.ray_serve.enabled:
        runtimes.append(RAY_SERVE)
    return runtimes


def control_worker(client: Client, settings: Settings, metrics: Metrics | None = None) -> Worker:
    acts = ControlActivities(
        available_runtimes(settings),
        RegistryNodes(client, alive_seconds=LOST_AFTER_ANNOUNCEMENTS * settings.node.announce_seconds),
        residents=RegistryResidents(client),
        eviction=settings.orchestration.eviction,
        llm=settings.brain.llm,
        models=settings.models,
        metrics=metrics,
        client=client,
    )
    return Worker(
        client,
        task_queue=settings.temporal.control_task_queue,
        workflows=[ModelLifecycleWorkflow, NodeRegistryWorkflow],
        activities=acts.all(),
        # Evictions wait for other models' unloads: keep room beside them for the quick steps.
        max_concurrent_activities=64,
        # A worker killed outright leaves its sticky queue behind: workflow tasks and queries sent
        # there move to the normal queue after this long (Temporal's 10 s default would have the
        # gateway's state queries time out after a restart).
        sticky_queue_schedule_to_start_timeout=timedelta(seconds=2),
    )
