"""The control worker: ModelLifecycle and node workflows, and the analyze/decide/evict activities."""

from __future__ import annotations

import logging

from temporalio.client import Client
from temporalio.worker import Worker

from activities.control import ControlActivities, RegistryNodes, RegistryResidents
from modelium.config import Settings
from modelium.metrics import Metrics
from modelium.runtimes.embedded import NAME as EMBEDDED
from workflows.lifecycle import ModelLifecycleWorkflow
from workflows.nodes import NodeRegistryWorkflow

log = logging.getLogger(__name__)


def available_runtimes(settings: Settings) -> list[str]:
    # Only runtimes with an adapter in this build; vLLM, Triton and Ray Serve join as theirs land.
    asked = [key for key in ("vllm", "triton", "ray_serve") if getattr(settings, key).enabled]
    if asked:
        log.warning(
            "%s set in the configuration, but this version has no adapter for %s yet; "
            "models are served by the embedded runtime",
            ", ".join(f"{k}.enabled=true" for k in asked),
            "it" if len(asked) == 1 else "them",
        )
    return [EMBEDDED]


def control_worker(client: Client, settings: Settings, metrics: Metrics | None = None) -> Worker:
    acts = ControlActivities(
        available_runtimes(settings),
        RegistryNodes(client, alive_seconds=3 * settings.node.announce_seconds),
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
    )
