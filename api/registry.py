"""What the gateway knows about models: their workflow state, cached for a short while.

Routing reads a model's endpoint from its workflow's `state` query; to keep that off the hot
path the answer is reused for `ttl` seconds, and dropped at once when the endpoint fails.
While Temporal is unreachable, a model last seen loaded is routed to its last known endpoint
(until that endpoint fails), and every other model is refused at once with a 503.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import timedelta

from temporalio.client import Client, WorkflowQueryFailedError
from temporalio.service import RPCError, RPCStatusCode

from api.control_plane import ControlPlane, is_unreachable
from api.errors import ControlPlaneUnavailable
from modelium.names import model_from_workflow_id, workflow_id
from modelium.types import ModelState, Phase
from workflows.contracts import NODE_KEY, PHASE_KEY, RUNTIME_KEY, running_models_query
from workflows.lifecycle import ModelLifecycleWorkflow

log = logging.getLogger(__name__)

NOT_LOADED_TTL = 0.2
QUERY_TIMEOUT = timedelta(seconds=10)
# Listing every model should not hang on one whose worker is down; it is shown from visibility.
LIST_QUERY_TIMEOUT = timedelta(seconds=2)


class ModelRegistry:
    def __init__(self, client: Client, ttl: float, control: ControlPlane | None = None) -> None:
        self._client = client
        self._ttl = ttl
        self._control = control or ControlPlane(client)
        self._cache: dict[str, tuple[float, ModelState]] = {}
        # The last state of each model seen serving: what routes it while Temporal is down.
        self._last_loaded: dict[str, ModelState] = {}
        self._inflight: dict[str, asyncio.Future[ModelState | None]] = {}
        # Last request this gateway served per model (epoch seconds).
        self._last_request: dict[str, float] = {}

    async def get(self, model: str, *, fresh: bool = False, timeout: timedelta = QUERY_TIMEOUT) -> ModelState | None:
        """The model's state, or None when no such model exists (or it was removed)."""
        cached = self._cache.get(model)
        if cached is not None and not fresh and time.monotonic() - cached[0] < self._ttl_for(cached[1]):
            return cached[1]
        if not self._control.available:
            return self._last_known(model)
        # Concurrent requests for the same model share one query.
        pending = self._inflight.get(model)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[ModelState | None] = asyncio.get_running_loop().create_future()
        self._inflight[model] = future
        try:
            try:
                state = await self._query(model, timeout)
            except ControlPlaneUnavailable:
                if not self._control.available and model in self._last_loaded:
                    state = self._last_known(model)
                else:
                    raise
            else:
                self._remember(model, state)
            future.set_result(state)
            return state
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it, nobody logs it as lost
            raise
        finally:
            self._inflight.pop(model, None)

    def _remember(self, model: str, state: ModelState | None) -> None:
        if state is None:
            self._cache.pop(model, None)
        else:
            self._cache[model] = (time.monotonic(), state)
        if state is not None and state.phase == Phase.LOADED and state.endpoint is not None:
            self._last_loaded[model] = state
        else:
            self._last_loaded.pop(model, None)

    def _last_known(self, model: str) -> ModelState:
        """Temporal is down: the model's last serving state, or a 503 at once."""
        state = self._last_loaded.get(model)
        if state is None:
            raise ControlPlaneUnavailable(
                f"cannot read the state of {model}: Temporal is unreachable ({self._control.last_error}); "
                "only models last seen loaded are served meanwhile",
                retry_after=self._control.retry_after,
            )
        return state

    def _ttl_for(self, state: ModelState) -> float:
        # A serving endpoint is stable; a model on its way up changes any moment, and a stale
        # "not loaded" would turn clients away after the load finished.
        return self._ttl if state.phase == Phase.LOADED else min(self._ttl, NOT_LOADED_TTL)

    async def _query(self, model: str, timeout: timedelta) -> ModelState | None:
        handle = self._client.get_workflow_handle(workflow_id(model))
        try:
            state: ModelState = await self._control.guard(
                handle.query(ModelLifecycleWorkflow.state, rpc_timeout=timeout), f"read the state of {model}"
            )
        except RPCError as exc:
            if exc.status == RPCStatusCode.NOT_FOUND:
                return None
            if is_unreachable(exc):
                self._control.mark_down(exc.message)
            raise ControlPlaneUnavailable(
                f"cannot read the state of {model} from Temporal: {exc.message}", retry_after=5
            ) from exc
        except WorkflowQueryFailedError as exc:
            raise ControlPlaneUnavailable(
                f"the workflow of {model} did not answer its state query: {exc}", retry_after=5
            ) from exc
        return None if state.phase == Phase.REMOVED else state

    def store(self, state: ModelState) -> None:
        """Take a state learned elsewhere (an update's answer) as the freshest one."""
        self._remember(state.name, state)

    def invalidate(self, model: str) -> None:
        """Forget the model's state, its last serving endpoint too (it failed, or is changing)."""
        self._cache.pop(model, None)
        self._last_loaded.pop(model, None)

    def mark_used(self, model: str) -> None:
        self._last_request[model] = time.time()

    async def names(self) -> list[str]:
        """Names of every model with a running workflow (from Temporal's visibility store)."""
        return sorted(await self._visible())

    async def _visible(self) -> dict[str, ModelState]:
        """Running models as the visibility store sees them: name, phase, runtime, node."""
        self._control.require("list models")
        found = {}
        try:
            async for execution in self._client.list_workflows(running_models_query()):
                name = model_from_workflow_id(execution.id)
                if name:
                    attrs = execution.typed_search_attributes
                    found[name] = ModelState(
                        name=name,
                        path="",
                        phase=attrs.get(PHASE_KEY) or Phase.DISCOVERED,
                        runtime=attrs.get(RUNTIME_KEY),
                        node=attrs.get(NODE_KEY),
                    )
        except RPCError as exc:
            if is_unreachable(exc):
                self._control.mark_down(exc.message)
            raise ControlPlaneUnavailable(f"cannot list models: {exc.message}", retry_after=5) from exc
        return found

    async def all(self) -> list[ModelState]:
        """Every model's state. A workflow that cannot answer its query right now (its worker is
        down) is listed from the visibility store, with the reason, rather than failing the list."""
        visible = await self._visible()
        for gone in (set(self._cache) | set(self._last_loaded)) - set(visible):
            self.invalidate(gone)
        names = sorted(visible)
        states = await asyncio.gather(
            *(self.get(n, fresh=True, timeout=LIST_QUERY_TIMEOUT) for n in names), return_exceptions=True
        )
        out = []
        for name, state in zip(names, states, strict=True):
            if isinstance(state, ControlPlaneUnavailable):
                fallback = visible[name]
                fallback.last_error = f"live state unavailable: {state.message}"
                out.append(fallback)
            elif isinstance(state, BaseException):
                raise state
            elif state is not None:
                out.append(state)
        return out

    async def refresh_forever(self, interval: float) -> None:
        """Keep every model's state fresh, so metrics describe models nobody asked about yet."""
        while True:
            try:
                await self.all()
            except ControlPlaneUnavailable as exc:
                log.debug("state refresh skipped: %s", exc.message)
            await asyncio.sleep(interval)

    def last_use(self) -> dict[str, float]:
        """Loaded models -> last use, for the idle-seconds gauge."""
        out = {}
        for name, (_, state) in self._cache.items():
            if state.phase != Phase.LOADED:
                continue
            candidates = [state.last_used_at, state.loaded_at, self._last_request.get(name)]
            known = [c for c in candidates if c is not None]
            if known:
                out[name] = max(known)
        return out
