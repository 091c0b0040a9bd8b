"""What the gateway knows about models: their workflow state, cached for a short while.

Routing reads a model's endpoint from its workflow's `state` query; to keep that off the hot
path the answer is reused for `ttl` seconds, and dropped at once when the endpoint fails. For
each loaded model it routes to, the gateway also keeps a question open with its workflow (the
`route_changed` update), answered in the workflow step that moves its route (a switch to a new
version, an unload), so that requests follow a switch at once rather than after the cache time.
While Temporal is unreachable, a model last seen loaded is routed to its last known endpoint
(until that endpoint fails), and every other model is refused at once with a 503.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Iterable
from datetime import datetime, timedelta

from temporalio.client import Client, WorkflowExecution, WorkflowExecutionStatus, WorkflowQueryFailedError
from temporalio.service import RPCError, RPCStatusCode

from api.control_plane import ControlPlane
from api.errors import BadRequest, ControlPlaneUnavailable, is_unreachable, temporal_error
from modelium.names import workflow_id
from modelium.types import ModelState, NodeInventory, Phase
from workflows.contracts import (
    PHASE_KEY,
    SWITCH_NEAR,
    UPDATED_KEY,
    ActivityName,
    RouteWatch,
    listed_inventory,
    listed_state,
    models_changed_query,
    running_models_query,
    running_nodes_query,
)
from workflows.lifecycle import ModelLifecycleWorkflow

log = logging.getLogger(__name__)

NOT_LOADED_TTL = 0.2
# Route notices (route_changed): loaded models followed at most; one whose question was refused
# is not asked about for this long; one is asked about again only if this gateway sent it a
# request this recently.
MAX_FOLLOWED = 256
UNFOLLOWED_SECONDS = 5.0
FOLLOW_IF_USED_WITHIN = 300.0
QUERY_TIMEOUT = timedelta(seconds=10)
# How far before the latest change seen a listing asks again: covers a visibility store that
# makes a write visible after later ones (its writes are asynchronous).
CHANGES_OVERLAP = timedelta(seconds=60)
# A full listing is read again in the background this often while models are being listed: it
# catches summaries written without their time (by workflows older than that attribute).
FULL_LISTING_SECONDS = 600.0


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
        self._phases: Counter[str] = Counter()
        self._fleet = FleetIndex(client)
        # Loaded models whose route changes this gateway waits to be told of (route_changed), and
        # those not asked about again until a time (their question was refused).
        self._watches: dict[str, asyncio.Task[None]] = {}
        self._unfollowed_until: dict[str, float] = {}

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

    def _remember(self, model: str, state: ModelState | None, *, follow: bool = True) -> None:
        if state is None:
            self._cache.pop(model, None)
        else:
            self._cache[model] = (time.monotonic(), state)
        if state is not None and state.phase == Phase.LOADED and state.endpoint is not None:
            self._last_loaded[model] = state
            if follow:
                self._follow(model, state)
        else:
            self._last_loaded.pop(model, None)

    def _follow(self, model: str, state: ModelState) -> None:
        """Keep a `route_changed` question open for a loaded model this gateway routes to."""
        if model in self._watches or len(self._watches) >= MAX_FOLLOWED or not self._control.available:
            return
        if time.monotonic() < self._unfollowed_until.get(model, 0.0):
            return
        self._watches[model] = asyncio.create_task(self._await_route(model, state.key), name=f"route-watch-{model}")

    async def _await_route(self, model: str, key: str) -> None:
        """Wait for the workflow to say that requests should leave instance `key` (a switch to a
        new version, an unload, ...), and take the state it answers with. When it cannot (the
        state changed first, a workflow older than the question, Temporal unreachable), the
        model's state is read again on the next request, and not asked about for a while."""
        handle = self._client.get_workflow_handle(workflow_id(model))
        try:
            state = await handle.execute_update(ModelLifecycleWorkflow.route_changed, RouteWatch(key))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a refused or failed update, or an RPC error: all mean "read it"
            log.debug("no route notice for %s: %s", model, exc)
            self._cache.pop(model, None)
            self._unfollowed_until[model] = time.monotonic() + UNFOLLOWED_SECONDS
            return
        finally:
            self._watches.pop(model, None)
        if state.phase != Phase.LOADED:
            # Taken down (unloaded, parked, restarting, removed): the answer is the state at the
            # step that began it, its reason maybe not written yet. Requests stop going to the
            # old endpoint, and the next one reads the state as it is then.
            self._cache.pop(model, None)
            self._last_loaded.pop(model, None)
            return
        # Asked again only for a model this gateway still sends requests to.
        used = time.time() - self._last_request.get(model, 0.0) < FOLLOW_IF_USED_WITHIN
        self._remember(model, state, follow=used)

    async def close(self) -> None:
        """Stop waiting for route notices (the gateway stops)."""
        watches = list(self._watches.values())
        for task in watches:
            task.cancel()
        await asyncio.gather(*watches, return_exceptions=True)

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
        # "not loaded" would turn clients away after the load finished: read again within
        # NOT_LOADED_TTL. A switch to a new version is pushed (route_changed) while this gateway
        # waits for its notice; without one, the state is read again within NOT_LOADED_TTL too.
        if state.phase != Phase.LOADED:
            return min(self._ttl, NOT_LOADED_TTL)
        if state.update_state in SWITCH_NEAR and state.name not in self._watches:
            return min(self._ttl, NOT_LOADED_TTL)
        return self._ttl

    async def _query(self, model: str, timeout: timedelta) -> ModelState | None:
        handle = self._client.get_workflow_handle(workflow_id(model))
        try:
            state: ModelState = await self._control.guard(
                handle.query(ModelLifecycleWorkflow.state, rpc_timeout=timeout), f"read the state of {model}"
            )
        except (RPCError, WorkflowQueryFailedError) as exc:
            if isinstance(exc, RPCError) and exc.status == RPCStatusCode.NOT_FOUND:
                return None
            raise temporal_error(exc, model, "read the state of", on_unreachable=self._control.mark_down) from exc
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
            raise self._list_failed(exc) from exc
        return found, token

    def _list_failed(self, exc: RPCError) -> ControlPlaneUnavailable:
        """The error a failed List call answers with (and Temporal marked down if unreachable)."""
        if is_unreachable(exc):
            self._control.mark_down(exc.message)
        return ControlPlaneUnavailable(f"cannot list models: {exc.message}", retry_after=5)

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
        """Every model's state, sorted by name, from the visibility store: the first call reads
        every summary, later ones only those written since (one List call each)."""
        self._control.require("list models")
        try:
            states = [self._freshest(s) for s in await self._fleet.states()]
        except RPCError as exc:
            raise self._list_failed(exc) from exc
        present = {s.name for s in states}
        for gone in (set(self._cache) | set(self._last_loaded)) - present:
            self.invalidate(gone)
        return sorted(states, key=lambda s: s.name)

    async def refresh_forever(self, interval: float) -> None:
        """Keep the summaries behind the gauges fresh (idle seconds of loaded models, models by
        phase) with one List call each time: the first reads every summary, later ones only those
        written since (the fleet index GET /models keeps too)."""
        while True:
            if self._control.available:
                seen = self._fleet.version
                try:
                    states = await self._fleet.states(full_refresh=False)
                except RPCError as exc:
                    log.debug("state refresh skipped: %s", exc.message)
                else:
                    # Counted again only when something changed: at rest, nothing is.
                    if self._fleet.version != seen or not self._phases:
                        self._listed_loaded = {s.name: s for s in states if s.phase == Phase.LOADED}
                        self._phases = Counter(str(s.phase) for s in states)
            await asyncio.sleep(interval)

    async def fleet(self) -> list[ModelState]:
        """Every model's summary from the fleet index, reading only those written since the last
        read (one List call): what `GET /events` follows."""
        self._control.require("follow the models")
        return await self._fleet.states(full_refresh=False)

    async def nodes(self) -> list[NodeInventory]:
        """The node agents' inventories as their workflows keep them in the visibility store (one
        List call)."""
        self._control.require("follow the nodes")
        found = []
        try:
            async for execution in self._client.list_workflows(running_nodes_query()):
                inventory = await listed_inventory(execution)
                if inventory is not None:
                    found.append(inventory)
        except RPCError as exc:
            raise self._list_failed(exc) from exc
        return found

    async def load_report(self, model: str) -> tuple[str | None, str | None] | None:
        """What the model's running load last reported by heartbeat: what it waits on, and the
        runtime's own last output line (one describe call; None when no load is running)."""
        description = await self._client.get_workflow_handle(workflow_id(model)).describe()
        for pending in description.raw_description.pending_activities:
            if pending.activity_type.name != ActivityName.LOAD_MODEL or not pending.HasField("heartbeat_details"):
                continue
            values = await self._client.data_converter.decode(pending.heartbeat_details.payloads)
            message = values[0] if values and isinstance(values[0], str) else None
            line = values[1] if len(values) > 1 and isinstance(values[1], str) else None
            return message, line
        return None

    def phase_counts(self) -> dict[str, int]:
        """Models by phase as last listed (empty until the first listing), for `modelium_models`."""
        return dict(self._phases)

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


class FleetIndex:
    """Every model's summary as the visibility store lists it, kept here between listings.

    The first listing reads them all (10 pages at 10,000 models: seconds). Each later one asks
    only for the runs whose summary was written since the latest one it saw (less an overlap,
    for writes made visible out of order), or since the time before which every write was
    visible at the last listing's start, if that is later: one List call whose size is the
    churn, not the fleet, and none at all while nothing changes. A new model, or a new run of one,
    writes its summary as it starts; a removed one writes `removed` as it ends. The times
    compared are all the workflows' (the server's clock), so clocks here do not matter. What
    writes no summary (a workflow terminated by hand, one from before the summary's time was
    kept) is caught by the full listing read again every FULL_LISTING_SECONDS in the background."""

    def __init__(self, client: Client, overlap: timedelta = CHANGES_OVERLAP) -> None:
        self._client = client
        self._overlap = overlap
        # How many runs the last List call returned (the whole fleet, or the changes).
        self.last_read = 0
        # Goes up whenever a listing changed the index.
        self.version = 0
        self._runs: dict[str, tuple[str, ModelState]] = {}  # workflow id -> (run id, summary)
        self._latest: datetime | None = None
        # When the latest summary was first seen here (monotonic): the server's clock was at or
        # past its time then.
        self._latest_seen_at = 0.0
        # Every summary written before this is in the index (None: only `_latest - overlap` is
        # known to be). It moves on while nothing changes, so a resting fleet's listings come
        # back empty instead of reading the last overlap's writes again each time.
        self._floor: datetime | None = None
        self._full_at = 0.0
        self._lock = asyncio.Lock()
        self._refresh: asyncio.Task[None] | None = None

    async def states(self, *, full_refresh: bool = True) -> list[ModelState]:
        """`full_refresh`: also start the periodic full read when it is due (listings for people
        do; the gauges' refresh does not, so an idle gateway never reads the whole fleet again)."""
        async with self._lock:
            if self._latest is None:
                await self._read_all()
            else:
                bound = self._visible_before()
                since = self._latest - self._overlap
                await self._read_changes(max(since, self._floor) if self._floor else since)
                self._floor = max(bound, self._floor) if self._floor else bound
                if full_refresh:
                    self._refresh_in_background()
            return [state for _, state in self._runs.values()]

    def _visible_before(self) -> datetime:
        """A time before which every summary write is visible now: a write is visible within
        the overlap of its time, and the server's clock is now at least the latest summary's time
        plus the time passed here since it was seen (a monotonic difference, so no clock here is
        compared with the server's). A listing that starts now reads all of them."""
        assert self._latest is not None
        return self._latest + timedelta(seconds=time.monotonic() - self._latest_seen_at) - self._overlap

    def _refresh_in_background(self) -> None:
        if time.monotonic() - self._full_at < FULL_LISTING_SECONDS or self._refresh is not None:
            return

        async def refresh() -> None:
            # Without the lock: listings go on meanwhile. A change they applied that this read
            # (begun earlier) misses was written after it began: the floor goes back to where it
            # was then, so the next listing reads that change again.
            floor = self._visible_before() if self._latest is not None else None
            try:
                await self._read_all()
                self._floor = floor
            except RPCError as exc:
                log.info("background model listing failed: %s", exc.message)
            finally:
                self._refresh = None

        self._refresh = asyncio.create_task(refresh(), name="full-listing")

    async def _read_all(self) -> None:
        """Every running model's summary; the index is replaced at the end, in one step."""
        started = time.monotonic()
        executions = [e async for e in self._client.list_workflows(running_models_query(), page_size=1000)]
        runs = {}
        for execution in executions:
            state = await listed_state(execution)
            if state is not None and state.phase != Phase.REMOVED:
                runs[execution.id] = (execution.run_id or "", state)
        self._runs = runs
        self.version += 1
        self.last_read = len(executions)
        self._see(executions)
        self._full_at = started

    async def _read_changes(self, since: datetime) -> None:
        executions = [e async for e in self._client.list_workflows(models_changed_query(since), page_size=1000)]
        running: dict[str, WorkflowExecution] = {}
        ended: dict[str, str] = {}
        for execution in executions:
            if execution.status == WorkflowExecutionStatus.RUNNING:
                running[execution.id] = execution
            elif execution.status != WorkflowExecutionStatus.CONTINUED_AS_NEW:
                ended[execution.id] = execution.run_id or ""
        for wf_id, execution in running.items():
            state = await listed_state(execution)
            if state is None or state.phase == Phase.REMOVED:
                self._runs.pop(wf_id, None)
            else:
                self._runs[wf_id] = (execution.run_id or "", state)
        for wf_id, run_id in ended.items():
            # A model whose workflow ended is gone, unless a newer run of it is known.
            if wf_id not in running and wf_id in self._runs and self._runs[wf_id][0] == run_id:
                del self._runs[wf_id]
        if executions:
            self.version += 1
        self.last_read = len(executions)
        self._see(executions)

    def _see(self, executions: Iterable[WorkflowExecution]) -> None:
        for execution in executions:
            # Runs from before the summary's time was kept: their start time, until they write one.
            at = execution.typed_search_attributes.get(UPDATED_KEY) or execution.start_time
            if self._latest is None or at > self._latest:
                self._latest = at
                self._latest_seen_at = time.monotonic()
