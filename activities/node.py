"""Activities of a node agent's own task queue: book memory, start and stop runtimes."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from temporalio import activity
from temporalio.exceptions import ApplicationError, ApplicationErrorCategory

from modelium.ledger import InsufficientCapacity, Ledger
from modelium.metrics import Metrics
from modelium.runtimes.base import RuntimeAdapter, RuntimeStartError, RuntimeUnhealthy
from modelium.types import (
    Booking,
    HealthRequest,
    LoadRequest,
    LoadResult,
    ReserveRequest,
    UnloadRequest,
)
from workflows.contracts import ActivityName, ErrorType


class NodeActivities:
    def __init__(
        self,
        node: str,
        ledger: Ledger,
        adapters: Mapping[str, RuntimeAdapter],
        metrics: Metrics,
    ) -> None:
        self._node = node
        self._ledger = ledger
        self._adapters = dict(adapters)
        self._metrics = metrics

    def _adapter(self, runtime: str) -> RuntimeAdapter:
        adapter = self._adapters.get(runtime)
        if adapter is None:
            raise ApplicationError(
                f"runtime {runtime!r} is not available on node {self._node} (available: {', '.join(self._adapters)})",
                type=ErrorType.NO_RUNTIME,
                non_retryable=True,
            )
        return adapter

    def _refresh_loaded_gauge(self) -> None:
        for name, adapter in self._adapters.items():
            self._metrics.models_loaded.labels(runtime=name, node=self._node).set(len(adapter.running()))

    @activity.defn(name=ActivityName.RESERVE_GPU)
    async def reserve_gpu(self, request: ReserveRequest) -> Booking:
        try:
            return self._ledger.reserve(request.model, request.device, request.bytes)
        except InsufficientCapacity as exc:
            raise ApplicationError(str(exc), type=ErrorType.INSUFFICIENT_CAPACITY, non_retryable=True) from None

    @activity.defn(name=ActivityName.RELEASE_GPU)
    async def release_gpu(self, model: str) -> None:
        self._ledger.release(model)

    @activity.defn(name=ActivityName.LOAD_MODEL)
    async def load_model(self, request: LoadRequest) -> LoadResult:
        adapter = self._adapter(request.runtime)
        started = time.monotonic()
        try:
            endpoint = await adapter.start(request, progress=lambda msg: activity.heartbeat(msg))
        except RuntimeStartError as exc:
            raise ApplicationError(
                f"{request.runtime} could not start {request.model}: {exc}",
                type=ErrorType.RUNTIME_START,
                non_retryable=not exc.retryable,
            ) from None
        finally:
            self._refresh_loaded_gauge()
        seconds = time.monotonic() - started
        self._metrics.load_duration.labels(model=request.model, runtime=request.runtime).observe(seconds)
        activity.logger.info("loaded %s in %.2fs at %s", request.model, seconds, endpoint.url)
        return LoadResult(endpoint=endpoint, load_seconds=seconds)

    @activity.defn(name=ActivityName.UNLOAD_MODEL)
    async def unload_model(self, request: UnloadRequest) -> None:
        adapter = self._adapter(request.runtime)
        try:
            await adapter.stop(request.model)
        finally:
            self._refresh_loaded_gauge()
        self._metrics.unloads.labels(reason=request.kind).inc()
        activity.logger.info("unloaded %s: %s", request.model, request.reason)

    @activity.defn(name=ActivityName.CHECK_HEALTH)
    async def check_health(self, request: HealthRequest) -> None:
        try:
            await self._adapter(request.runtime).check_health(request.model)
        except RuntimeUnhealthy as exc:
            raise ApplicationError(
                str(exc),
                type=ErrorType.RUNTIME_UNHEALTHY,
                non_retryable=True,
                category=ApplicationErrorCategory.BENIGN,
            ) from None

    def all(self) -> list[Callable[..., Any]]:
        return [self.reserve_gpu, self.release_gpu, self.load_model, self.unload_model,
                self.check_health]  # fmt: skip
