"""The control worker: ModelLifecycle and node workflows, and the analyze/decide/evict activities."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from datetime import timedelta

from temporalio.client import Client
from temporalio.worker import Worker

from activities.control import ControlActivities, RegistryNodes, RegistryResidents
from modelium.config import Settings
from modelium.metrics import Metrics
from modelium.runtimes import enabled_runtimes
from workflows.contracts import running_models_query
from workflows.lifecycle import ModelLifecycleWorkflow
from workflows.logs import RuntimeLogWorkflow
from workflows.nodes import NodeRegistryWorkflow

log = logging.getLogger(__name__)


def available_runtimes(settings: Settings) -> list[str]:
    """The runtimes models may be placed on: the embedded one, and those enabled (a node places
    a model only on a runtime it runs too)."""
    return enabled_runtimes(settings)


@dataclass(frozen=True)
class WorkerSizing:
    """The control worker's settings for a fleet of `models` models (see `sized_for`)."""

    models: int
    max_cached_workflows: int
    max_concurrent_workflow_tasks: int
    max_concurrent_activities: int
    sticky_queue_schedule_to_start_timeout: timedelta


# Largest cache `sized_for` picks by itself: at about 0.3 MB per cached workflow (bench/scale.py,
# 1,000 models) that is 1.2 GB; temporal.max_cached_workflows sets another.
MAX_AUTO_CACHE = 4000


def sized_for(models: int, max_cached: int | None = None) -> WorkerSizing:
    """Worker settings from the number of models.

    - Cache: every model workflow stays cached (each signal, update or query on an evicted one
      replays its history first), with headroom for the fleet to grow, up to MAX_AUTO_CACHE
      (memory: about 0.3 MB each); below 1,000 the SDK default stands. Past that, resting models
      leave the cache: they are touched only when asked for, and a replay takes milliseconds.
    - Workflow tasks: registration of thousands of models at once is a burst of short tasks;
      more than 100 at a time only queue behind the GIL, so the default holds up to 1,000
      models, and 200 beyond keeps the queue drained between polls.
    - Activities: evictions wait on other models' unloads, so there is room beside them for the
      quick steps; analysis and decisions of a registration burst get more.
    - Sticky queue: 2 s (the default is 10 s), so that after a worker restart the first query or
      task of each of thousands of workflows is not held on a dead worker's queue.
    """
    models = max(0, models)
    return WorkerSizing(
        models=models,
        max_cached_workflows=max_cached or max(1000, min(models + models // 5 + 100, MAX_AUTO_CACHE)),
        max_concurrent_workflow_tasks=100 if models <= 1000 else 200,
        max_concurrent_activities=64 if models <= 1000 else 128,
        sticky_queue_schedule_to_start_timeout=timedelta(seconds=2),
    )


async def count_models(client: Client, settings: Settings) -> int:
    """How many models this control plane serves, or is about to: running model workflows, or
    the folders in the watched directories, whichever is more."""
    running = (await client.count_workflows(running_models_query())).count
    folders = 0
    for directory in settings.watch_directories:
        with contextlib.suppress(OSError):
            folders += sum(1 for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))
    return max(running, folders)


def control_worker(client: Client, settings: Settings, metrics: Metrics | None = None, *, models: int = 0) -> Worker:
    acts = ControlActivities(
        available_runtimes(settings),
        RegistryNodes(client),
        residents=RegistryResidents(client),
        eviction=settings.orchestration.eviction,
        llm=settings.brain.llm,
        models=settings.models,
        metrics=metrics,
        client=client,
    )
    size = sized_for(models, settings.temporal.max_cached_workflows)
    log.info(
        "control worker sized for %d models: %d cached workflows, %d workflow tasks and %d activities at once",
        size.models,
        size.max_cached_workflows,
        size.max_concurrent_workflow_tasks,
        size.max_concurrent_activities,
    )
    return Worker(
        client,
        task_queue=settings.temporal.control_task_queue,
        workflows=[ModelLifecycleWorkflow, NodeRegistryWorkflow, RuntimeLogWorkflow],
        activities=acts.all(),
        max_cached_workflows=size.max_cached_workflows,
        max_concurrent_workflow_tasks=size.max_concurrent_workflow_tasks,
        max_concurrent_activities=size.max_concurrent_activities,
        sticky_queue_schedule_to_start_timeout=size.sticky_queue_schedule_to_start_timeout,
    )
