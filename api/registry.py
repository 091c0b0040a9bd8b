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
from api.errors import BadRequest, ControlPlaneUnavailable
from modelium.names import workflow_id
from modelium.types import ModelState, Phase
from workflows.contracts import PHASE_KEY, listed_state, running_models_query
from workflows.lifecycle import ModelLifecycleWorkflow

log = logging.getLogger(__name__)

NOT_LOADED_TTL = 0.2
QUERY_TIMEOUT = timedelta(seconds=10)


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
        # The loaded models as last listed (refresh_forever), for the idle gauge.
        self._listed_loaded: dict[str, ModelState] = {}

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

    async def some_names(self, limit: int) -> tuple[list[str], bool]:
        """Up to `limit` model names from one page of the visibility store, sorted, and whether
        there are more."""
        states, token = await self.listed(limit=limit)
        return sorted(s.name for s in states), token is not None

    async def listed(
        self, *, phase: str | None = None, limit: int | None = None, page_token: bytes | None = None
    ) -> tuple[list[ModelState], bytes | None]:
        """Models as the visibility store lists them, from one paginated List call and no query
        to any workflow: each keeps its state there as a summary (its memo). `limit` gives one
        page (and the token of the next, None at the end); without it, every model."""
        self._control.require("list models")
        query = running_models_query(**({PHASE_KEY.name: phase} if phase else {}))
        found: list[ModelState] = []
        try:
            listing = self._client.list_workflows(query, page_size=limit or 1000, next_page_token=page_token)
            if limit is None:
                executions = [execution async for execution in listing]
                token = None
            else:
                await listing.fetch_next_page()
                executions = list(listing.current_page or [])
                token = listing.next_page_token or None
            for execution in executions:
                state = await listed_state(execution)
                if state is not None and state.phase != Phase.REMOVED:
                    found.append(self._freshest(state))
        except RPCError as exc:
            if page_token is not None and exc.status == RPCStatusCode.INVALID_ARGUMENT:
                raise BadRequest(f"page_token was not accepted: {exc.message}", param="page_token") from None
            if is_unreachable(exc):
                self._control.mark_down(exc.message)
            raise ControlPlaneUnavailable(f"cannot list models: {exc.message}", retry_after=5) from exc
        return found, token

    def _freshest(self, state: ModelState) -> ModelState:
        """The listed summary, with what this gateway knows to be newer: the last request it
        served (a summary records usage at most every 30 s) or a state it just read."""
        cached = self._cache.get(state.name)
        if cached is not None and (cached[1].updated_at or 0.0) > (state.updated_at or 0.0):
            state = cached[1]
        mine = self._last_request.get(state.name)
        if mine is not None and state.phase == Phase.LOADED and mine > (state.last_used_at or 0.0):
            state.last_used_at = mine
        return state

    async def all(self) -> list[ModelState]:
        """Every model's state, sorted by name, from the visibility store (one List call)."""
        states, _ = await self.listed()
        present = {s.name for s in states}
        for gone in (set(self._cache) | set(self._last_loaded)) - present:
            self.invalidate(gone)
        return sorted(states, key=lambda s: s.name)

    async def refresh_forever(self, interval: float) -> None:
        """Keep the loaded models' summaries fresh for the idle gauge, with one List call of the
        loaded models (a number bounded by memory, not by how many models exist)."""
        while True:
            try:
                states, _ = await self.listed(phase=Phase.LOADED)
                self._listed_loaded = {s.name: s for s in states}
            except ControlPlaneUnavailable as exc:
                log.debug("state refresh skipped: %s", exc.message)
            await asyncio.sleep(interval)

    def last_use(self) -> dict[str, float]:
        """Loaded models -> last use, for the idle-seconds gauge."""
        out = {}
        latest = dict(self._listed_loaded)
        for name, (_, state) in self._cache.items():
            if name not in latest or (state.updated_at or 0.0) >= (latest[name].updated_at or 0.0):
                latest[name] = state
        for name, state in latest.items():
            if state.phase != Phase.LOADED:
                continue
            candidates = [state.last_used_at, state.loaded_at, self._last_request.get(name)]
            known = [c for c in candidates if c is not None]
            if known:
                out[name] = max(known)
        return out
