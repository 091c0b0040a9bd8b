"""Activities of the control task queue: read a model directory, decide where it runs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Collection
from datetime import timedelta
from typing import Any

from temporalio import activity
from temporalio.client import Client, WorkflowQueryFailedError
from temporalio.exceptions import ApplicationError, ApplicationErrorCategory
from temporalio.service import RPCError

from modelium.analyzer import ModelDirectoryError, analyze_directory, warm_up
from modelium.brain import NoCapacity, NoRuntimeAvailable, place
from modelium.types import DecideRequest, Decision, ModelAnalysis, ModelSource, NodeInventory
from workflows.contracts import ActivityName, ErrorType, running_nodes_query
from workflows.nodes import NodeRegistryWorkflow

# Where the nodes' inventories come from: the node workflows in production, a fixed list in tests.
NodeSource = Callable[[], Awaitable[list[NodeInventory]]]


def static_nodes(*nodes: NodeInventory) -> NodeSource:
    async def source() -> list[NodeInventory]:
        return list(nodes)

    return source


class RegistryNodes:
    """The node agents that announced themselves within `alive_seconds`, from their workflows."""

    def __init__(self, client: Client, alive_seconds: float) -> None:
        self._client = client
        self._alive_seconds = alive_seconds

    async def __call__(self) -> list[NodeInventory]:
        found = []
        now = time.time()
        async for execution in self._client.list_workflows(running_nodes_query()):
            try:
                inventory = await self._client.get_workflow_handle(execution.id).query(
                    NodeRegistryWorkflow.inventory, rpc_timeout=timedelta(seconds=5)
                )
            except (RPCError, WorkflowQueryFailedError) as exc:
                activity.logger.warning("node workflow %s did not answer: %s", execution.id, exc)
                continue
            if now - inventory.announced_at <= self._alive_seconds:
                found.append(inventory)
        return found


class ControlActivities:
    def __init__(self, runtimes: Collection[str], nodes: NodeSource) -> None:
        # The analyzer's transformers tables: read them now, not inside the first analysis.
        warm_up()
        self._runtimes = tuple(runtimes)
        self._nodes = nodes

    @activity.defn(name=ActivityName.ANALYZE_MODEL)
    async def analyze_model(self, source: ModelSource) -> ModelAnalysis:
        try:
            analysis = await asyncio.to_thread(analyze_directory, source.path, source.name)
        except ModelDirectoryError as exc:
            raise ApplicationError(
                f"{source.path}: {exc}",
                type=ErrorType.BAD_MODEL_DIRECTORY,
                non_retryable=True,
                # A user's broken directory is an expected outcome, not a worker fault to trace.
                category=ApplicationErrorCategory.BENIGN,
            ) from None
        activity.logger.info("analyzed %s: %s", source.name, analysis.summary())
        return analysis

    @activity.defn(name=ActivityName.DECIDE_RUNTIME)
    async def decide_runtime(self, request: DecideRequest) -> Decision:
        nodes = await self._nodes()
        try:
            return place(request.analysis, self._runtimes, nodes, request.runtime_override)
        except NoRuntimeAvailable as exc:
            raise ApplicationError(str(exc), type=ErrorType.NO_RUNTIME, non_retryable=True) from None
        except NoCapacity as exc:
            raise ApplicationError(
                str(exc), type=ErrorType.NO_CAPACITY, non_retryable=True, category=ApplicationErrorCategory.BENIGN
            ) from None

    def all(self) -> list[Callable[..., Any]]:
        return [self.analyze_model, self.decide_runtime]
