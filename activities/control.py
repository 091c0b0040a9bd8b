"""Activities of the control task queue: read a model directory, decide where it runs."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection
from typing import Any

from temporalio import activity
from temporalio.exceptions import ApplicationError, ApplicationErrorCategory

from modelium.analyzer import ModelDirectoryError, analyze_directory, warm_up
from modelium.brain import NoRuntimeAvailable, decide_rules
from modelium.types import DecideRequest, Decision, ModelAnalysis, ModelSource
from workflows.contracts import ActivityName, ErrorType


class ControlActivities:
    def __init__(self, node: str, device: str, runtimes: Collection[str]) -> None:
        # The analyzer's transformers tables: read them now, not inside the first analysis.
        warm_up()
        # Placement across several nodes arrives with node inventories; until then the control
        # worker places every model on the node it is configured with.
        self._node = node
        self._device = device
        self._runtimes = tuple(runtimes)

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
        try:
            return decide_rules(
                request.analysis, self._runtimes, self._node, self._device,
                request.runtime_override,
            )  # fmt: skip
        except NoRuntimeAvailable as exc:
            raise ApplicationError(str(exc), type=ErrorType.NO_RUNTIME, non_retryable=True) from None

    def all(self) -> list[Callable[..., Any]]:
        return [self.analyze_model, self.decide_runtime]
