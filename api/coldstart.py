"""Scale from zero: a request for a model that is not serving waits for it to load.

Every request waiting on one model in this gateway shares a single `ensure_loaded` update (and
the workflow itself shares one load among all gateways). At most `max_waiting` requests wait per
model; past that a 429 tells the client when to come back. A wait is bounded by `timeout`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections import Counter

from temporalio.client import Client, WorkflowUpdateFailedError, WorkflowUpdateRPCTimeoutOrCancelledError
from temporalio.service import RPCError, RPCStatusCode

from api.control_plane import ControlPlane
from api.errors import (
    GatewayError,
    ModelNotReady,
    TooManyWaiting,
    public_detail,
    temporal_error,
)
from api.registry import ModelRegistry
from modelium.metrics import Metrics
from modelium.names import workflow_id
from modelium.types import ModelState
from workflows.contracts import EnsureLoadedRequest, WithdrawDemand
from workflows.lifecycle import ModelLifecycleWorkflow

log = logging.getLogger(__name__)

# What a client is told to wait when nothing is known about the model's load time.
DEFAULT_LOAD_ESTIMATE = 10.0


class ColdStarts:
    def __init__(
        self,
        client: Client,
        registry: ModelRegistry,
        metrics: Metrics,
        control: ControlPlane,
        *,
        timeout: float,
        max_waiting: int,
    ) -> None:
        self._client = client
        self._control = control
        self._registry = registry
        self._metrics = metrics
        self._timeout = timeout
        self._max_waiting = max_waiting
        self._loads: dict[str, asyncio.Task[ModelState]] = {}
        self._waiting: Counter[str] = Counter()
        # Each load this gateway asks for is a demand under its own id, withdrawn when every
        # request waiting on it gave up, so the model does not go on waiting for room for nobody.
        self._demand_prefix = f"gateway-{uuid.uuid4().hex[:12]}"
        self._demand_seq = itertools.count(1)
        self._demand_ids: dict[str, str] = {}
        self._withdrawals: set[asyncio.Task[None]] = set()

    def waiting(self, model: str) -> int:
        return self._waiting[model]

    async def wait_loaded(self, state: ModelState) -> ModelState:
        """Start (or join) the load of `state.name` and return its state once it serves."""
        name = state.name
        estimate = state.load_seconds or DEFAULT_LOAD_ESTIMATE
        if self._waiting[name] >= self._max_waiting:
            raise TooManyWaiting(
                f"{self._waiting[name]} requests already wait for model {name} to load "
                f"(gateway.max_waiting_requests); retry in about {estimate:.0f}s",
                retry_after=estimate,
            )
        task = self._loads.get(name)
        if task is None:
            demand_id = self._demand_ids[name] = f"{self._demand_prefix}-{next(self._demand_seq)}"
            task = asyncio.create_task(self._ensure_loaded(name, demand_id), name=f"ensure-loaded-{name}")
            self._loads[name] = task
            task.add_done_callback(lambda done: self._forget(name, done))
        self._waiting[name] += 1
        self._metrics.requests_waiting.labels(model=name).set(self._waiting[name])
        started = time.perf_counter()
        try:
            loaded = await asyncio.wait_for(asyncio.shield(task), timeout=self._timeout)
        except TimeoutError:
            raise ModelNotReady(
                f"model {name} did not finish loading within {self._timeout:g}s "
                f"(gateway.cold_start_timeout_seconds); it is still {state.phase}, retry later",
                retry_after=estimate,
                extra={"phase": state.phase},
            ) from None
        finally:
            # Every wait is measured, also those that ended in an error or a timeout.
            self._metrics.cold_start_wait.labels(model=name).observe(time.perf_counter() - started)
            self._waiting[name] -= 1
            self._metrics.requests_waiting.labels(model=name).set(self._waiting[name])
            if self._waiting[name] <= 0:
                del self._waiting[name]
                if not task.done():
                    # Nobody waits any more: the demand is withdrawn. A load under way finishes
                    # (it is cheaper to keep than to stop); a model waiting for room rests again.
                    self._loads.pop(name, None)
                    task.cancel()
                    self._withdraw(name)
        return loaded

    def _withdraw(self, name: str) -> None:
        demand_id = self._demand_ids.pop(name, None)
        if demand_id is None:
            return
        handle = self._client.get_workflow_handle(workflow_id(name))

        async def send() -> None:
            try:
                await handle.signal(ModelLifecycleWorkflow.withdraw_demand, WithdrawDemand(demand_id))
            except RPCError as exc:
                # Its deadline ends the demand anyway (the cold-start timeout).
                log.info("could not withdraw the demand for %s: %s", name, exc.message)

        task = asyncio.create_task(send(), name=f"withdraw-demand-{name}")
        self._withdrawals.add(task)
        task.add_done_callback(self._withdrawals.discard)

    def _forget(self, name: str, task: asyncio.Task[ModelState]) -> None:
        if self._loads.get(name) is task:
            del self._loads[name]
            self._demand_ids.pop(name, None)
        if not task.cancelled():
            task.exception()  # retrieved: every waiter re-raises it; nothing is "never retrieved"

    async def _ensure_loaded(self, name: str, demand_id: str) -> ModelState:
        handle = self._client.get_workflow_handle(workflow_id(name))
        log.info("model %s is not serving; loading it for waiting requests", name)
        request = EnsureLoadedRequest("a request is waiting", wait_seconds=self._timeout, demand_id=demand_id)
        try:
            state = await self._control.guard(
                handle.execute_update(ModelLifecycleWorkflow.ensure_loaded, request),
                f"load {name}",
            )
        except (WorkflowUpdateFailedError, WorkflowUpdateRPCTimeoutOrCancelledError, RPCError) as exc:
            if isinstance(exc, RPCError) and exc.status == RPCStatusCode.NOT_FOUND:
                self._registry.invalidate(name)
            raise temporal_error(exc, name, "load", on_unreachable=self._control.mark_down) from None
        self._registry.store(state)
        return state


def failed_model(state: ModelState) -> GatewayError:
    return ModelNotReady(
        f"model {state.name} failed: {public_detail(state.last_error or 'unknown error')}; fix the model "
        f"directory, or load it again (POST /models/{state.name}/load) to retry",
        retry_after=30,
        extra={"phase": state.phase},
    )
