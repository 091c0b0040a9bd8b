"""ModelLifecycle: one durable workflow per model, from discovery to removal.

discovered -> analyzing -> deciding -> reserving -> loading -> loaded <-> (usage) -> unloading
-> unloaded; failed waits for a retry signal or new files; removed ends the workflow. A runtime
that parks (vLLM's sleep mode) goes loaded -> parked when idle, and parked -> waking -> loaded
when asked for again (unloaded for real when evicted, unloaded or removed).
"""

from __future__ import annotations

import functools
from dataclasses import replace
from datetime import timedelta
from typing import TypeVar

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from modelium.types import (
        MAX_USAGE_PER_REPORT,
        MIN_IDLE_SECONDS,
        MIN_TIMER_SECONDS,
        Booking,
        Decision,
        LoadRequest,
        ModelAnalysis,
        ModelSource,
        ModelState,
        Phase,
        UnloadKind,
        valid_seconds,
    )
    from workflows import steps
    from workflows.contracts import (
        NODE_KEY,
        PHASE_KEY,
        RUNTIME_KEY,
        STATE_MEMO,
        UPDATED_KEY,
        WORKFLOW_TYPE,
        CapacityFreed,
        EnsureLoadedRequest,
        EnsureUnloadedRequest,
        ErrorType,
        EvictCommand,
        EvictRequest,
        HealthReport,
        LifecycleInput,
        LoadCommand,
        MemoryPeak,
        NodeLost,
        Preload,
        RemoveCommand,
        RetryRequest,
        RollbackRequest,
        RouteWatch,
        UnloadCommand,
        UsageReport,
        WithdrawDemand,
    )
    from workflows.failures import Interrupted as _Interrupted
    from workflows.failures import NodeGone as _NodeLost
    from workflows.failures import describe as _describe
    from workflows.failures import error_type as _error_type
    from workflows.failures import valid_bytes as _valid_bytes
    from workflows.parking import Parking
    from workflows.updates import NewVersions

_T = TypeVar("_T")
# Crashes counted against `max_restarts` within this window.
_CRASH_WINDOW_SECONDS = 600
# A waiter for capacity decides again after this long at most, in case a wake-up was lost.
_CAPACITY_RECHECK_MAX = 30.0
# A preload whose reservation lost a race decides again this many times before it rests.
_PRELOAD_RACES = 3
# Usage alone (no phase change) refreshes the visibility summary at most this often.
_SUMMARY_USAGE_INTERVAL = 30.0
# A gateway's route_changed question is answered, changed or not, after this long: one left by a
# gateway that went away does not stay open (a timer each, per loaded model a gateway routes to).
ROUTE_WATCH_SECONDS = 300.0
# Open route_changed questions at most (one per gateway that routes to the model).
MAX_ROUTE_WATCHES = 4


@workflow.defn(name=WORKFLOW_TYPE)
class ModelLifecycleWorkflow(NewVersions, Parking):
    @workflow.init
    def __init__(self, inp: LifecycleInput) -> None:
        src = inp.source
        self._state = inp.state or ModelState(
            name=src.name, path=src.path, fingerprint=src.fingerprint, idle_seconds=inp.idle_seconds
        )
        self._input = inp
        self._analysis: ModelAnalysis | None = None
        # What the outside world asked for, consumed by the main loop.
        self._want_loaded = self._state.phase not in (Phase.UNLOADED, Phase.FAILED, Phase.PARKED)
        self._new_source: ModelSource | None = None
        self._retry = False
        self._unload_reason: str | None = None
        self._unload_kind = UnloadKind.REQUESTED
        self._remove_reason: str | None = None
        self._health_report: str | None = None
        self._usage_seq = 0
        # Counts load wishes (signals, updates), so that one arriving mid-unload is not lost.
        self._load_wishes = 0
        # Bumped when the idle timeout or the pin changes, so a waiting `loaded` loop re-reads them.
        self._settings_seq = 0
        self._capacity_wait = 2.0
        self._capacity_freed = False
        self._bringups = 0
        self._upserted: tuple[str | None, str | None, str | None] | None = None
        # A node declared lost that this model was placed on (`node_lost`), until handled.
        self._lost_node: str | None = None
        # The node just lost: the next decision does not choose it, whatever the listing says.
        self._avoid_node: str | None = None
        self._lost_reason = ""
        # Demand, which alone may evict or wait for capacity: a manual load holds until the model
        # loads; requests' demands (id -> deadline) end when they time out or are withdrawn.
        self._held_demand = False
        self._demands: dict[str, float] = {}
        # Times the model went back to rest for want of demand or room (ends waiting updates).
        self._rests = 0
        # Times it was taken down (ends a waiting `ensure_unloaded` even if it loads again at once).
        self._taken_down = 0
        # The wake-up this waiter got, passed on down the queue if it still does not fit.
        self._woken: CapacityFreed | None = None
        self._summary: tuple[object, ...] | None = None
        self._summary_at = 0.0
        self._demand_driven = False
        self._local_steps = False
        self._lost_races = 0
        # A rollback asked for (POST /models/{name}/rollback), until the main loop has done it.
        self._rollback_wanted: RollbackRequest | None = None
        # While a new version is recreated (taken down, then loaded): the version that served
        # before it, when its files are still there (a numbered version, a release a symlink
        # pointed to), to be served again if the new one does not come up.
        self._recreate_fallback: ModelSource | None = None
        # Gateways' open `route_changed` questions, and whether this run is handing over to the
        # next (continue-as-new), which answers them all.
        self._route_watches = 0
        self._handing_over = False

    # -- messages ------------------------------------------------------------------------------
    @workflow.query
    def state(self) -> ModelState:
        return self._state

    # Every handler takes its payload as optional: the Temporal UI and CLI send a signal with no
    # input at all, and a handler that raised on one would fail every workflow task from then on.
    # Values are checked here too (not only at the gateway): anyone who reaches Temporal can send.
    @workflow.signal
    def record_usage(self, report: UsageReport | None = None) -> None:
        if report is None or not _valid_count(report.count):
            return
        self._state.request_count += report.count
        counts = self._state.requests_by_organization
        for org, n in report.by_organization.items():
            if isinstance(org, str) and _valid_count(n):
                counts[org] = counts.get(org, 0) + n
        self._state.last_used_at = workflow.now().timestamp()
        self._usage_seq += 1

    @workflow.update
    async def route_changed(self, watch: RouteWatch | None = None) -> ModelState:
        """Answers the model's state once requests should no longer go where they go now (to
        instance `watch.key` at its endpoint): a switch to a new version, an unload, a park, a
        restart, a move, a removal. Gateways keep one such question open for each loaded model
        they route to, so that they follow a switch in the step that makes it, not after their
        cache time. It is also answered, unchanged, after ROUTE_WATCH_SECONDS (a gateway that
        went away leaves no question open for long) and when this run hands over to the next."""
        assert watch is not None  # the validator refuses a question without input
        endpoint = self._state.endpoint
        self._route_watches += 1
        try:
            await workflow.wait_condition(
                lambda: (
                    self._state.key != watch.key
                    or self._state.phase != Phase.LOADED
                    or self._state.endpoint != endpoint
                    or self._handing_over
                ),
                timeout=ROUTE_WATCH_SECONDS,
            )
        except TimeoutError:
            pass
        finally:
            self._route_watches -= 1
        return self._state

    @route_changed.validator
    def _validate_route_changed(self, watch: RouteWatch | None = None) -> None:
        st = self._state
        if watch is None or not isinstance(watch.key, str) or not watch.key:
            raise ApplicationError('route_changed needs {"key": the instance requests go to now}')
        if st.phase != Phase.LOADED or st.key != watch.key or self._handing_over:
            raise ApplicationError(f"{st.name} is {st.phase} as {st.key}, not {watch.key}; read its state")
        if self._route_watches >= MAX_ROUTE_WATCHES:
            # Temporal admits 10 updates in flight per workflow: these must leave room for the rest.
            raise ApplicationError(f"{st.name} has {self._route_watches} route watches open; read its state")

    @workflow.signal
    def files_changed(self, source: ModelSource | None = None) -> None:
        if source is None or not source.path:
            return
        if source.fingerprint == self._state.held_fingerprint and self._state.phase != Phase.FAILED:
            # The files this model was rolled back from: they are no new version.
            return
        if source.fingerprint != self._state.fingerprint or self._state.phase == Phase.FAILED:
            self._new_source = source
        elif self._state.update_state == "update_failed":
            # The files are the serving version's again: the failed update is over.
            self._state.update_state = self._state.update_error = None
            self._upsert_summary()

    @workflow.update
    async def rollback(self, request: RollbackRequest | None = None) -> ModelState:
        """Serve the version served before the last switch again, beside the current one first
        (as an update); answers once it serves, or fails with why it could not."""
        self._rollback_wanted = request or RollbackRequest()
        await workflow.wait_condition(lambda: self._rollback_wanted is None)
        if self._state.update_state == "update_failed":
            raise ApplicationError(f"rollback failed, the current version serves on: {self._state.update_error}")
        return self._state

    @rollback.validator
    def _validate_rollback(self, request: RollbackRequest | None = None) -> None:
        st = self._state
        if st.phase != Phase.LOADED:
            raise ApplicationError(f"only a loaded model can be rolled back; {st.name} is {st.phase}")
        if st.previous is None:
            raise ApplicationError(
                f"{st.name} has no previous version to roll back to: none was switched from since it "
                "was loaded, or its files were replaced in place (keep versions in numbered folders, "
                "or point the model's folder at releases with a symlink)"
            )
        if st.update_state not in (None, "update_failed") or self._rollback_wanted is not None:
            raise ApplicationError(f"{st.name} is being updated ({st.update_state}); roll back once it is done")

    @workflow.signal
    def retry(self, request: RetryRequest | None = None) -> None:
        reason = request.reason if request is not None else "retry signal without input"
        if self._state.phase != Phase.FAILED:
            # Remembered, it would bring the model back up after a later unload.
            workflow.logger.info("retry of %s ignored: it is %s, not failed", self._state.name, self._state.phase)
            return
        workflow.logger.info("retry of %s: %s", self._state.name, reason)
        self._retry = True

    @workflow.signal
    def load(self, command: LoadCommand | None = None) -> None:
        """A manual load (POST /models/{name}/load): demand that holds until the model loads."""
        command = command or LoadCommand()
        self._held_demand = True
        self._wish_load(command.pin, command.idle_seconds)

    def _wish_load(self, pin: bool | None, idle_seconds: float | None) -> None:
        self._configure(pin, idle_seconds)
        self._want_loaded = True
        self._load_wishes += 1
        self._unload_reason = None  # the newer wish wins
        if self._state.demanded_at is None:
            self._state.demanded_at = workflow.now().timestamp()
        if self._state.phase == Phase.FAILED:
            self._retry = True

    @workflow.signal
    def memory_peak(self, peak: MemoryPeak | None = None) -> None:
        """Its node measured a new peak: shown in the state, and the booking follows it."""
        st = self._state
        if peak is None or not _valid_bytes(peak.bytes) or st.phase != Phase.LOADED or peak.model != st.key:
            return
        st.peak_memory_bytes = max(peak.bytes, st.peak_memory_bytes or 0)
        if st.booking is not None and _valid_bytes(peak.booked_bytes):
            st.booking.bytes = peak.booked_bytes  # type: ignore[assignment]
        if peak.over_capacity:
            st.last_error = (
                f"holds {peak.bytes / 2**20:.0f} MiB, more than was booked: "
                f"{', '.join(map(str, peak.over_capacity))} booked past capacity"
            )
        self._settings_seq += 1  # the loaded loop wakes and refreshes the summary

    @workflow.signal
    def withdraw_demand(self, notice: WithdrawDemand | None = None) -> None:
        if notice is not None and isinstance(notice.demand_id, str):
            self._demands.pop(notice.demand_id, None)

    def _demanded(self) -> bool:
        """Someone asks for the model now: a pin, a manual load, or a request still waiting."""
        if self._state.pinned or self._held_demand:
            return True
        now = workflow.now().timestamp()
        return any(deadline > now for deadline in self._demands.values())

    def _demand_deadline(self) -> float | None:
        """When the current demand ends by itself (requests time out); None when it holds."""
        if self._state.pinned or self._held_demand or not self._demands:
            return None
        return max(self._demands.values())

    @workflow.signal
    def unload(self, command: UnloadCommand | None = None) -> None:
        command = command or UnloadCommand()
        self._want_loaded = False
        self._held_demand = False
        if self._state.pinned:
            self._state.pinned = False
            self._settings_seq += 1
        # Only a model that is (or is about to be) serving has anything to take down; a request
        # kept from an unloaded model would unload its next load at once.
        if self._state.phase not in (Phase.UNLOADED, Phase.FAILED, Phase.REMOVED):
            self._unload_reason = command.reason
            self._unload_kind = UnloadKind.REQUESTED

    def _configure(self, pin: bool | None, idle_seconds: float | None) -> None:
        """Apply settings; a value out of bounds (NaN, infinite, not positive, over a year) is
        ignored with a warning: the gateway and the config refuse them, a raw signal may not."""
        if isinstance(pin, bool) and pin != self._state.pinned:
            self._state.pinned = pin
            self._settings_seq += 1
        if idle_seconds is None:
            return
        seconds = valid_seconds(idle_seconds, MIN_IDLE_SECONDS)
        if seconds is None:
            workflow.logger.warning(
                "model %s: idle timeout %r ignored: not a number of seconds in [1 s, 1 year]",
                self._state.name,
                idle_seconds,
            )
        elif seconds != self._state.idle_seconds:
            self._state.idle_seconds = seconds
            self._settings_seq += 1

    @workflow.signal
    def capacity_freed(self, notice: CapacityFreed | None = None) -> None:
        self._capacity_freed = True
        self._woken = notice

    @workflow.update
    async def evict(self, command: EvictCommand | None = None) -> ModelState:
        """Unload this idle model to make room for another; returns once nothing of it runs.
        A request that arrives before the unload starts keeps the model (the update fails)."""
        assert command is not None  # the validator refuses an evict without input
        self._want_loaded = False
        self._unload_reason = f"evicted to make room for {command.for_model}: {command.reason}"
        self._unload_kind = UnloadKind.EVICTED
        await workflow.wait_condition(
            lambda: self._nothing_running() or (self._state.phase == Phase.LOADED and self._unload_reason is None)
        )
        if not self._nothing_running():
            raise ApplicationError(f"model {self._state.name} was used while it was to be evicted; it stays")
        return self._state

    @evict.validator
    def _validate_evict(self, command: EvictCommand | None = None) -> None:
        state = self._state
        if command is None or not command.for_model:
            raise ApplicationError('evict needs {"reason", "for_model"}')
        if state.phase not in (Phase.LOADED, Phase.PARKED):
            raise ApplicationError(f"model {state.name} is {state.phase}, not loaded")
        if state.pinned:
            raise ApplicationError(f"model {state.name} is pinned")
        if self._unload_reason is not None or self._remove_reason is not None or self._new_source is not None:
            raise ApplicationError(f"model {state.name} is already on its way down")
        if state.update_state not in (None, "update_failed") or self._rollback_wanted is not None:
            # Its new version is loading beside it (or its old one drains): evicting it would
            # wait for that, and then free less than the evictor was promised.
            raise ApplicationError(f"model {state.name} is being updated ({state.update_state or 'rollback'})")
        idle = workflow.now().timestamp() - (state.last_used_at or state.loaded_at or 0.0)
        min_idle = command.min_idle_seconds
        if isinstance(min_idle, bool) or not isinstance(min_idle, int | float) or not min_idle >= 0:
            raise ApplicationError(f"min_idle_seconds must be a number >= 0, got {min_idle!r}")
        if idle < min_idle:
            raise ApplicationError(f"model {state.name} was used {idle:.0f}s ago")

    @workflow.signal
    def node_lost(self, notice: NodeLost | None = None) -> None:
        """The node this model is placed on missed its announcements: stop waiting on it."""
        if notice is None or not notice.node:
            return
        st = self._state
        on_it = notice.node in (st.node, st.booking.node if st.booking else None)
        if on_it and st.phase not in (Phase.UNLOADED, Phase.FAILED, Phase.REMOVED):
            self._lost_node, self._lost_reason = notice.node, notice.reason or f"node {notice.node} lost"

    @workflow.signal
    def remove(self, command: RemoveCommand | None = None) -> None:
        self._remove_reason = (command or RemoveCommand()).reason or RemoveCommand().reason

    @workflow.signal
    def report_unhealthy(self, report: HealthReport | None = None) -> None:
        if self._state.phase == Phase.LOADED:
            self._health_report = report.reason if report is not None else "reported unhealthy"

    def _current_phase(self) -> Phase:
        return self._state.phase

    @workflow.update
    async def ensure_loaded(self, request: EnsureLoadedRequest | None = None) -> ModelState:
        """Ask for the model to be loaded and return its state once it is serving."""
        request = request or EnsureLoadedRequest()
        if self._state.phase == Phase.LOADED:
            self._configure(request.pin, request.idle_seconds)
            self._unload_reason = None
            return self._state
        demand_id = None
        wait = valid_seconds(request.wait_seconds)
        if wait is None:
            self._held_demand = True
        else:
            demand_id = request.demand_id or f"update-{workflow.current_update_info().id}"  # type: ignore[union-attr]
            self._demands[demand_id] = workflow.now().timestamp() + wait
        self._wish_load(request.pin, request.idle_seconds)
        start, rests = self._bringups, self._rests
        try:
            await workflow.wait_condition(
                lambda: (
                    self._state.phase in (Phase.LOADED, Phase.REMOVED)
                    or (self._state.phase == Phase.FAILED and self._bringups > start)
                    or self._rests > rests
                    or (demand_id is not None and demand_id not in self._demands)
                )
            )
        finally:
            if demand_id is not None:
                self._demands.pop(demand_id, None)
        phase = self._current_phase()  # changed during the wait above
        if phase == Phase.REMOVED:
            raise ApplicationError(
                f"model {self._state.name} was removed",
                type=ErrorType.MODEL_REMOVED,
                non_retryable=True,
            )
        if phase == Phase.FAILED:
            raise ApplicationError(
                f"model {self._state.name} failed to load: {self._state.last_error}",
                type=ErrorType.LOAD_FAILED,
                non_retryable=True,
            )
        if phase != Phase.LOADED:
            raise ApplicationError(
                f"model {self._state.name} was not loaded: "
                f"{self._state.rest_reason or 'the request that asked for it was withdrawn'}",
                type=ErrorType.NO_CAPACITY,
                non_retryable=True,
            )
        return self._state

    @ensure_loaded.validator
    def _validate_ensure_loaded(self, request: EnsureLoadedRequest | None = None) -> None:
        if self._state.phase == Phase.REMOVED or self._remove_reason:
            raise ApplicationError(f"model {self._state.name} was removed")
        if request is None:
            return
        if request.idle_seconds is not None and valid_seconds(request.idle_seconds, MIN_IDLE_SECONDS) is None:
            raise ApplicationError(
                f"idle_seconds must be a number of seconds in [1, 31536000], got {request.idle_seconds!r}"
            )
        if request.pin is not None and not isinstance(request.pin, bool):
            raise ApplicationError(f"pin must be true or false, got {request.pin!r}")
        if request.wait_seconds is not None and valid_seconds(request.wait_seconds) is None:
            raise ApplicationError(
                f"wait_seconds must be a number of seconds in (0, 31536000], got {request.wait_seconds!r}"
            )
        if request.demand_id is not None and not isinstance(request.demand_id, str):
            raise ApplicationError(f"demand_id must be a string, got {request.demand_id!r}")

    @workflow.update
    async def ensure_unloaded(self, request: EnsureUnloadedRequest | None = None) -> ModelState:
        """Unload the model (and unpin it); return its state once nothing of it is running, or
        once it was taken down (a request that arrives meanwhile may load it again at once: then
        the unload happened, and the state says what came after it)."""
        taken_down = self._taken_down
        self.unload(UnloadCommand((request or EnsureUnloadedRequest()).reason))
        await workflow.wait_condition(lambda: self._nothing_running() or self._taken_down > taken_down)
        return self._state

    def _history_full(self) -> bool:
        """Time to continue as new: Temporal suggests it, or this run's history reached the
        model's own bound (not every server suggests it; a model loaded and unloaded thousands
        of times must never reach Temporal's hard limit)."""
        info = workflow.info()
        if info.is_continue_as_new_suggested():
            return True
        limit = self._input.history_limit
        return self._demand_driven and limit is not None and info.get_current_history_length() >= limit

    def _nothing_running(self) -> bool:
        phase = self._state.phase
        # `discovered` with no wish to load is a model resting before its first bring-up.
        return phase in (Phase.UNLOADED, Phase.FAILED, Phase.REMOVED) or (
            phase == Phase.DISCOVERED and not self._want_loaded
        )

    # -- main loop -----------------------------------------------------------------------------
    @workflow.run
    async def run(self, inp: LifecycleInput) -> ModelState:
        # Histories recorded before demand-driven placement replay as they ran: they preloaded
        # with eviction, woke every waiter, and kept no summary memo.
        self._demand_driven = workflow.patched("demand-driven")
        # Analysis and placement run as local activities: each is milliseconds of work in this
        # worker, and as task-queue activities they were two round trips through Temporal and two
        # more workflow tasks per model (a third of a 1,000-model registration burst).
        self._local_steps = workflow.patched("local-control-steps")
        self._set_phase(self._state.phase)
        while True:
            if self._lost_node is not None:
                self._abandon_lost_node()
            if self._remove_reason is not None:
                await self._take_down(Phase.REMOVED, self._remove_reason, UnloadKind.REMOVED)
                self._state.unload_reason = self._remove_reason
                workflow.logger.info("model %s removed", self._state.name)
                await workflow.wait_condition(workflow.all_handlers_finished)
                return self._state
            if self._new_source is not None:
                await self._apply_new_source()
                continue
            if self._rollback_wanted is not None:
                await self._roll_back()
                continue
            if self._retry:
                self._retry = False
                self._want_loaded = True
                if self._state.phase == Phase.FAILED:
                    self._set_phase(Phase.DISCOVERED)
            if self._state.phase == Phase.LOADED:
                await self._serve_until_interrupted()
                continue
            if self._state.phase == Phase.PARKED and (self._want_loaded or self._unload_reason is not None):
                await self._leave_park()
                continue
            if self._state.phase == Phase.FAILED or not self._want_loaded:
                if self._history_full():
                    await self._continue_as_new()
                # A failed model waits for a retry or new files; `want_loaded` alone (still set
                # from before the failure) must not wake it, or this loop would spin.
                await workflow.wait_condition(self._woken_from_rest)
                continue
            await self._bring_up()

    def _abandon_lost_node(self) -> None:
        """Write off what the model had on the lost node, and place it again if it was wanted."""
        node, reason, st = self._lost_node, self._lost_reason, self._state
        self._lost_node = None
        self._avoid_node = node
        if st.booking is not None and st.booking.node == node:
            workflow.logger.warning("model %s: booking on lost node %s written off", st.name, node)
            st.booking = None
        if st.node != node or st.phase in (Phase.UNLOADED, Phase.FAILED, Phase.REMOVED):
            return
        if st.endpoint is not None:
            st.unload_reason = reason
        st.endpoint = None
        st.parked_bytes = st.wake_bytes = None
        st.last_error = f"{reason}; placing it again"
        workflow.logger.warning("model %s: %s; placing it again", st.name, reason)
        if st.phase == Phase.LOADED:
            self._want_loaded = True
        self._set_phase(Phase.DISCOVERED if self._want_loaded else Phase.UNLOADED)

    async def _on_node(self, node: str, handle: workflow.ActivityHandle[_T], *, interruptible: bool = False) -> _T:
        """Await an activity on `node`'s task queue. If the node is declared lost meanwhile, the
        activity is cancelled (it would wait for a worker that is gone) and _NodeLost raised.
        `interruptible`: removal or new files cancel it too (a load of a deleted folder would
        only fail and retry), raising _Interrupted."""

        def settled() -> bool:
            interrupted = interruptible and (self._remove_reason is not None or self._new_source is not None)
            return handle.done() or self._lost_node == node or interrupted

        await workflow.wait_condition(settled)
        if not handle.done():
            handle.cancel()
            raise _NodeLost(node) if self._lost_node == node else _Interrupted()
        return await handle

    def _woken_from_rest(self) -> bool:
        failed = self._state.phase == Phase.FAILED
        return (
            (self._want_loaded and not failed)
            or (self._state.phase == Phase.PARKED and self._unload_reason is not None)
            or self._retry
            or self._new_source is not None
            or self._remove_reason is not None
            or self._history_full()
        )

    async def _bring_up(self) -> None:
        step = "analyze"
        try:
            if self._analysis is None:
                self._set_phase(Phase.ANALYZING)
                self._take_analysis(
                    await steps.analyze_model(
                        ModelSource(
                            self._state.name, self._state.path, self._state.fingerprint, version=self._state.version_pin
                        ),
                        local=self._local_steps,
                    )
                )
            assert self._analysis is not None  # read just now, or by an earlier bring-up
            self._check_interrupt()
            step = "decide"
            self._set_phase(Phase.DECIDING)
            demanded = self._demanded() or not self._demand_driven
            decision = await steps.decide_runtime(
                steps.DecideRequest(
                    self._analysis,
                    overrides=self._analysis.overrides,
                    may_evict=demanded,
                    avoid_nodes=[self._avoid_node] if self._avoid_node else [],
                ),
                local=self._local_steps,
            )
            self._state.decision = decision
            self._avoid_node = None
            self._state.runtime, self._state.node = decision.runtime, decision.node
            self._state.device = decision.device
            workflow.logger.info(
                "model %s -> %s on %s/%s: %s",
                self._state.name,
                decision.runtime,
                decision.node,
                decision.device,
                decision.reason,
            )
            self._check_interrupt()
            if decision.no_room is not None:
                # Asked for meanwhile, it decides again with the right to evict or wait.
                if self._demanded():
                    return
                self._rest(f"not preloaded: no free room on any node ({decision.no_room})")
                return
            if not demanded and self._input.preload == Preload.NONE and not self._demanded():
                self._rest(
                    f"not preloaded (orchestration.preload is none): a request or "
                    f"POST /models/{self._state.name}/load loads it"
                )
                return
            if decision.evict:
                step = "evict"
                await self._evict_for(decision)
                self._check_interrupt()
            step = "reserve"
            self._set_phase(Phase.RESERVING)
            booking: Booking = await self._on_node(
                decision.node,
                steps.reserve_gpu(
                    steps.ReserveRequest(
                        self._state.key,
                        decision.device,
                        decision.memory_bytes or self._analysis.memory_estimate_bytes,
                        decision.runtime,
                        decision.devices,
                    ),
                    decision.node,
                ),
            )
            self._state.booking = booking
            self._check_interrupt()
            step = "load"
            self._set_phase(Phase.LOADING)
            result = await self._on_node(
                decision.node,
                steps.load_model(
                    LoadRequest(
                        self._state.key,
                        # The folder analyzed (a symlink resolved, a numbered version): what is
                        # loaded is what was read, even if the link moves meanwhile.
                        self._analysis.path or self._state.path,
                        decision.runtime,
                        self._analysis.task,
                        booking,
                        self._analysis.format,
                    ),
                    decision.node,
                    self._load_timeout(decision.runtime),
                ),
                # Histories recorded before loads were interruptible replay as they ran.
                interruptible=workflow.patched("interruptible-load"),
            )
        except _Interrupted as interrupted:
            if step == "load" and not isinstance(interrupted, _NodeLost):
                # The cancelled load may have started a runtime: stop it before the booking goes.
                kind = UnloadKind.REMOVED if self._remove_reason is not None else UnloadKind.FILES_CHANGED
                await self._take_down(Phase.DISCOVERED, "load interrupted", kind, unload=True)
                return
            await self._release_booking()
            self._set_phase(Phase.DISCOVERED)
            return
        except (ActivityError, ApplicationError) as err:
            await self._release_booking()
            if _error_type(err) in (ErrorType.NO_CAPACITY, ErrorType.INSUFFICIENT_CAPACITY):
                if self._demand_driven and not self._demanded():
                    if _error_type(err) == ErrorType.INSUFFICIENT_CAPACITY and self._lost_races < _PRELOAD_RACES:
                        # The room it was placed in went to a model decided at the same moment;
                        # the next decision sees the node as it is now.
                        self._lost_races += 1
                        self._set_phase(Phase.DISCOVERED)
                        await workflow.sleep(_timer(self._lost_races))
                        return
                    # Only demand may evict or wait: a preload that does not fit rests.
                    self._rest(f"not preloaded: no free room on any node ({_describe(err)})")
                    return
                await self._pass_wake_on()
                await self._wait_for_capacity(_describe(err))
                return
            error = f"{step} failed: {_describe(err)}"
            if await self._fall_back(error):
                return
            self._state.last_error = error
            workflow.logger.warning("model %s: %s", self._state.name, self._state.last_error)
            self._bringups += 1
            self._set_phase(Phase.FAILED)
            return
        now = workflow.now().timestamp()
        self._recreate_fallback = None
        self._took_load(result, self._analysis, now)
        self._state.last_used_at = now
        self._state.unload_reason = None
        self._state.rest_reason = None
        self._state.demanded_at = None
        self._held_demand = False
        self._woken = None
        self._lost_races = 0
        self._bringups += 1
        self._set_phase(Phase.LOADED)

    def _take_analysis(self, analysis: ModelAnalysis) -> None:
        """The model is now what `analysis` read: its task, summary and memory estimate, and the
        settings its folder asks for (modelium.yaml, `models.<name>`)."""
        self._analysis = analysis
        self._state.task = analysis.task
        self._state.analysis_summary = analysis.summary()
        self._state.memory_estimate_bytes = analysis.memory_estimate_bytes
        if analysis.overrides is not None:
            self._configure(analysis.overrides.pin, analysis.overrides.idle_timeout_seconds)

    def _took_load(self, result: steps.LoadResult, analysis: ModelAnalysis, now: float) -> None:
        """What a finished load of `analysis`'s folder tells: where it answers, how long it took,
        what it holds (its booking follows the measurement), and which folder and version."""
        st = self._state
        st.endpoint = result.endpoint
        st.load_seconds = result.load_seconds
        st.measured_memory_bytes = result.measured_bytes
        st.peak_memory_bytes = result.measured_bytes
        if st.booking is not None and _valid_bytes(result.booked_bytes):
            st.booking.bytes = result.booked_bytes  # type: ignore[assignment]
        st.loaded_at = now
        st.serving_path = analysis.path or st.path
        st.version = analysis.details.get("version")
        st.load_count += 1
        st.last_error = None

    def _load_timeout(self, runtime: str) -> float:
        """The chosen runtime's own load timeout (a vLLM load may take 900 s, an embedded one 600 s)."""
        seconds = self._input.load_timeouts.get(runtime, self._input.load_timeout_seconds)
        return seconds if valid_seconds(seconds) else self._input.load_timeout_seconds

    def _rest(self, reason: str) -> None:
        """Go back to `unloaded` and cost nothing until demanded: no timer, no decision."""
        workflow.logger.info("model %s rests: %s", self._state.name, reason)
        self._lost_races = 0
        self._want_loaded = False
        self._held_demand = False
        self._woken = None
        self._state.rest_reason = reason
        self._state.demanded_at = None
        self._state.last_error = None
        self._rests += 1
        self._set_phase(Phase.UNLOADED)

    async def _pass_wake_on(self) -> None:
        """This waiter was woken for freed room and still does not fit: wake the next one."""
        woken, self._woken = self._woken, None
        if woken is None or not self._demand_driven:
            return
        notice = CapacityFreed(woken.node, woken.model, woken.bytes, after=list(self._state.wait_order()))
        await self._notify_waiting(notice)

    async def _notify_waiting(self, notice: CapacityFreed) -> None:
        try:
            await steps.notify_waiting(notice)
        except ActivityError as err:
            workflow.logger.info("could not wake models waiting for capacity: %s", _describe(err))

    async def _evict_for(self, decision: Decision, *, announce: bool = True) -> None:
        """Unload the idle models the brain chose, then confirm their memory came back on the
        node before this model books it. Raises NoCapacity when none could be evicted.
        `announce`: enter `evicting` (not for a new version: the old one serves meanwhile)."""
        if announce:
            self._set_phase(Phase.EVICTING)
        names = ", ".join(v.model for v in decision.evict)
        workflow.logger.info("model %s evicts %s on %s", self._state.name, names, decision.node)
        result = await steps.evict_models(EvictRequest(self._state.name, decision.evict))
        if result.pids:
            await self._on_node(
                decision.node,
                steps.confirm_memory_freed(steps.ConfirmFreedRequest(decision.device, result.pids), decision.node),
            )
        if not result.evicted:
            refused = "; ".join(f"{m}: {why}" for m, why in result.refused.items())
            raise ApplicationError(f"no model could be evicted ({refused})", type=ErrorType.NO_CAPACITY)

    async def _wait_for_capacity(self, reason: str) -> None:
        """No room anywhere now, and someone asks for the model: wait until room is freed for it
        (waiters are woken in order: pinned, then first asked), then decide again. Removal, new
        files, an unload, or the end of the demand (its requests gave up) end the wait at once;
        a timer backing off up to 30 s re-checks in case a wake-up was lost."""
        self._state.last_error = f"waiting for capacity: {reason}"
        if self._state.phase != Phase.WAITING_FOR_CAPACITY:
            workflow.logger.info("model %s waits for capacity: %s", self._state.name, reason)
            self._capacity_wait = 2.0
        self._set_phase(Phase.WAITING_FOR_CAPACITY)
        self._capacity_freed = False
        timeout = self._capacity_wait
        deadline = self._demand_deadline() if self._demand_driven else None
        if deadline is not None:
            timeout = min(timeout, deadline - workflow.now().timestamp())
        try:
            await workflow.wait_condition(
                lambda: (
                    self._remove_reason is not None
                    or self._new_source is not None
                    or not self._want_loaded
                    or self._capacity_freed
                    or (self._demand_driven and not self._demanded())
                ),
                timeout=_timer(timeout),
            )
        except TimeoutError:
            pass
        self._capacity_wait = min(self._capacity_wait * 2, _CAPACITY_RECHECK_MAX)
        if not self._want_loaded:
            self._unload_reason = None  # nothing was loaded: the unload is done
            self._set_phase(Phase.UNLOADED)
        elif self._demand_driven and not self._demanded() and self._remove_reason is None and self._new_source is None:
            self._rest(f"not loaded: every request that asked for it gave up while it waited for capacity ({reason})")

    def _check_interrupt(self) -> None:
        if self._remove_reason is not None or self._new_source is not None:
            raise _Interrupted()

    async def _serve_until_interrupted(self) -> None:
        """Wait in `loaded` until idle, or until asked to unload, reload or check health."""
        while True:
            idle = self._state.idle_seconds
            last = self._state.last_used_at or self._state.loaded_at or 0.0
            remaining = last + idle - workflow.now().timestamp()
            if remaining <= 0 and not self._state.pinned:
                wishes = self._load_wishes
                parks = self._state.runtime in self._input.park_runtimes
                if parks and workflow.patched("park-idle") and await self._park(idle):
                    if self._load_wishes == wishes:
                        self._want_loaded = False
                    return
                await self._take_down(Phase.UNLOADED, f"idle for {idle:g}s", UnloadKind.IDLE)
                # A load asked for while it was going down (a request, POST .../load) stands: it
                # is loaded again at once rather than left waiting on an unloaded model.
                if self._load_wishes == wishes:
                    self._want_loaded = False
                return
            seq = (self._usage_seq, self._settings_seq)
            try:
                await workflow.wait_condition(
                    functools.partial(self._woken_while_loaded, seq),
                    timeout=None if self._state.pinned else _timer(remaining),
                )
            except TimeoutError:
                continue
            if (
                self._remove_reason is not None
                or self._new_source is not None
                or self._lost_node is not None
                or self._rollback_wanted is not None
            ):
                return
            if self._unload_reason is not None:
                reason, self._unload_reason = self._unload_reason, None
                await self._take_down(Phase.UNLOADED, reason, self._unload_kind)
                return
            if self._health_report is not None:
                await self._check_health()
                if self._state.phase != Phase.LOADED:
                    return
            self._upsert_summary(throttle=True)
            if self._history_full():
                await self._continue_as_new()

    def _woken_while_loaded(self, seq: tuple[int, int]) -> bool:
        return (
            (self._usage_seq, self._settings_seq) != seq
            or self._unload_reason is not None
            or self._remove_reason is not None
            or self._new_source is not None
            or self._health_report is not None
            or self._lost_node is not None
            or self._history_full()
            or self._rollback_wanted is not None
        )

    async def _check_health(self) -> None:
        report, self._health_report = self._health_report, None
        try:
            await self._on_node(
                self._state.node or "",
                steps.check_health(
                    steps.HealthRequest(self._state.key, self._state.runtime or ""), self._state.node or ""
                ),
            )
        except _NodeLost:
            return  # the main loop places the model again
        except ActivityError as err:
            reason = f"runtime unhealthy ({report}): {_describe(err)}"
            workflow.logger.warning("model %s: %s; reloading", self._state.name, reason)
            await self._take_down(Phase.DISCOVERED, reason, UnloadKind.UNHEALTHY)
            self._state.last_error = reason
            self._want_loaded = True
            if workflow.patched("restart-backoff"):
                await self._restart_after_crash(reason)

    async def _restart_after_crash(self, reason: str) -> None:
        """Start a crashed runtime again after a backoff (doubling), at most `max_restarts` times
        in 10 minutes; past that the model is `failed` until someone asks to load it."""
        st, inp = self._state, self._input
        now = workflow.now().timestamp()
        if st.crashed_at is None or now - st.crashed_at > _CRASH_WINDOW_SECONDS:
            st.crash_count = 0
        st.crash_count += 1
        st.crashed_at = now
        if st.crash_count > inp.max_restarts:
            st.last_error = (
                f"the runtime failed {st.crash_count} times within {_CRASH_WINDOW_SECONDS // 60} minutes; "
                f"not restarted again (last: {reason}). Load it again (POST /models/{st.name}/load) to retry"
            )
            workflow.logger.warning("model %s: %s", st.name, st.last_error)
            self._bringups += 1
            self._set_phase(Phase.FAILED)
            return
        delay = inp.restart_backoff_seconds * 2 ** (st.crash_count - 1)
        st.last_error = f"{reason}; restart {st.crash_count} of {inp.max_restarts} in {delay:g}s"
        st.restart_at = now + delay
        self._set_phase(Phase.RESTARTING)
        try:
            await workflow.wait_condition(
                lambda: self._remove_reason is not None or self._new_source is not None or not self._want_loaded,
                timeout=_timer(delay),
            )
        except TimeoutError:
            pass
        st.restart_at = None
        if not self._want_loaded:
            self._unload_reason = None
            self._set_phase(Phase.UNLOADED)
            return
        self._set_phase(Phase.DISCOVERED)

    async def _apply_new_source(self) -> None:
        source, self._new_source = self._new_source, None
        assert source is not None
        workflow.logger.info("model %s: files changed, reading them again", self._state.name)
        # New files end a rollback's hold: they are the version to serve now.
        self._state.held_fingerprint = self._state.version_pin = None
        if self._state.phase == Phase.LOADED:
            # Histories recorded before blue/green updates replay as they ran (take down first).
            if self._input.update_strategy == "blue_green" and workflow.patched("blue-green-update"):
                if await self._update_beside(source):
                    return
                await steps.count_update(steps.UpdateOutcome(self._state.name, "recreated"))
            if workflow.patched("recreate-falls-back"):
                self._recreate_fallback = self._serving_source(source.path)
                # It was serving: its new version (or the old one again) is loaded whether or not
                # a request waits, as a manual load would be, never left to rest.
                self._held_demand = True
        if self._state.phase in (Phase.LOADED, Phase.PARKED):
            await self._take_down(Phase.DISCOVERED, "model files changed", UnloadKind.FILES_CHANGED)
        self._state.path, self._state.fingerprint = source.path, source.fingerprint
        self._analysis = None
        self._retry = False
        self._want_loaded = True
        self._set_phase(Phase.DISCOVERED)

    async def _fall_back(self, error: str) -> bool:
        """A recreated new version did not come up: serve the version before it again, with
        `update_failed` and the reason, holding the new files off until newer ones arrive. False
        when there is nothing to fall back to."""
        back, self._recreate_fallback = self._recreate_fallback, None
        if back is None:
            return False
        st = self._state
        workflow.logger.warning("model %s: new version did not come up (%s); serving the previous one", st.name, error)
        st.held_fingerprint = st.fingerprint
        st.path, st.fingerprint, st.version_pin = back.path, back.fingerprint, back.version
        st.update_error = error
        st.update_state = "update_failed"
        self._analysis = None
        self._want_loaded = True
        self._set_phase(Phase.DISCOVERED)
        await steps.count_update(steps.UpdateOutcome(st.name, "failed"))
        return True

    async def _take_down(
        self, final_phase: Phase, reason: str, kind: UnloadKind, *, unload: bool | None = None
    ) -> None:
        """Unload (if loaded, or `unload`) and release the booking, then enter `final_phase`."""
        if unload if unload is not None else self._state.phase in (Phase.LOADED, Phase.PARKED):
            self._set_phase(Phase.UNLOADING)
            try:
                await self._on_node(
                    self._state.node or "",
                    steps.unload_model(
                        steps.UnloadRequest(self._state.key, self._state.runtime or "", reason, kind),
                        self._state.node or "",
                    ),
                )
            except _NodeLost:
                pass  # nothing runs on a lost node any more
            except ActivityError as err:
                self._state.last_error = f"unload failed: {_describe(err)}"
        await self._release_booking(wake_waiters=kind != UnloadKind.EVICTED or not self._demand_driven)
        self._state.endpoint = None
        self._state.parked_bytes = self._state.wake_bytes = None
        self._state.unload_reason = reason
        workflow.logger.info("model %s -> %s: %s", self._state.name, final_phase, reason)
        self._set_phase(final_phase)
        self._taken_down += 1

    async def _release_booking(self, *, wake_waiters: bool = True) -> None:
        """Give the booking back. `wake_waiters`: the first models waiting for capacity decide
        again (not after an eviction: that room is the evicting model's)."""
        if self._state.booking is None:
            return
        node = self._state.booking.node
        try:
            await self._on_node(
                node,
                steps.release_gpu(self._state.key, node),
            )
            freed, self._state.booking = self._state.booking, None
        except _NodeLost:
            # Its ledger drops the booking when it comes back (the node agent's reconcile).
            workflow.logger.warning("model %s: booking on lost node %s written off", self._state.name, node)
            self._state.booking = None
            return
        except ActivityError as err:
            self._state.last_error = f"release failed: {_describe(err)}"
            return
        if wake_waiters and workflow.patched("notify-waiting-on-release"):
            # Models waiting for capacity decide again now rather than at their next backoff.
            await self._notify_waiting(CapacityFreed(freed.node, self._state.name, freed.bytes))

    async def _continue_as_new(self) -> None:
        self._handing_over = True  # open route_changed questions are answered, to be asked anew
        await workflow.wait_condition(workflow.all_handlers_finished)
        workflow.continue_as_new(replace(self._input, state=self._state))

    def _set_phase(self, phase: Phase) -> None:
        self._state.phase = phase
        self._state.updated_at = workflow.now().timestamp()
        workflow.set_current_details(self._details())
        self._upsert_summary()
        current = (phase, self._state.runtime, self._state.node)
        if current == self._upserted:
            return
        self._upserted = current
        updates = [PHASE_KEY.value_set(phase)]
        if self._state.runtime:
            updates.append(RUNTIME_KEY.value_set(self._state.runtime))
        if self._state.node:
            updates.append(NODE_KEY.value_set(self._state.node))
        workflow.upsert_search_attributes(updates)

    def _upsert_summary(self, *, throttle: bool = False) -> None:
        """Keep the state in the visibility store's memo, so that listing models is one List
        call. Written when something listed changed; for usage alone at most every 30 s."""
        if not self._demand_driven:
            return
        st = self._state
        now = workflow.now().timestamp()
        key = (
            st.phase,
            st.runtime,
            st.node,
            st.device,
            st.booking,
            st.measured_memory_bytes,
            st.peak_memory_bytes,
            st.last_error,
            st.rest_reason,
            st.pinned,
            st.idle_seconds,
            st.demanded_at,
            st.load_count,
            st.decision is None,
            st.update_state,
            st.update_error,
            st.parked_bytes,
        )
        usage_only = key == self._summary
        if usage_only and (not throttle or now - self._summary_at < _SUMMARY_USAGE_INTERVAL):
            return
        self._summary, self._summary_at = key, now
        workflow.upsert_memo({STATE_MEMO: st})
        if workflow.patched("listed-since"):
            # Lets a gateway that keeps every summary ask for those written since it last looked.
            workflow.upsert_search_attributes([UPDATED_KEY.value_set(workflow.now())])

    def _details(self) -> str:
        """What the Temporal UI shows as this workflow's current details (Markdown)."""
        st = self._state
        lines = [f"**{st.name}**: {st.phase}" + (" (pinned)" if st.pinned else "")]
        if st.decision is not None:
            d = st.decision
            where = f"{d.node}/{'+'.join(d.all_devices)}"
            lines.append(f"- decided by {d.source}: {d.runtime} on {where}: {d.reason}")
        if st.booking is not None:
            lines.append(f"- booked {st.booking.bytes / 2**20:.0f} MiB on each of {', '.join(st.booking.all_devices)}")
        if st.parked_bytes:
            lines.append(
                f"- parked: {st.parked_bytes / 2**20:.0f} MiB of weights in host memory; "
                f"{(st.wake_bytes or 0) / 2**20:.0f} MiB booked again on waking"
            )
        if st.unload_reason:
            lines.append(f"- last unloaded: {st.unload_reason}")
        if st.last_error:
            lines.append(f"- last error: {st.last_error}")
        if st.update_state == "update_failed":
            lines.append(f"- **update failed**, the previous version serves: {st.update_error}")
        elif st.update_state:
            lines.append(f"- new version: {st.update_state.replace('_', ' ')}")
        if st.switched_at is not None:
            lines.append(f"- serving version switched to at {st.switched_at:.0f} ({st.key}, {st.fingerprint[:12]})")
        return "\n".join(lines)


def _timer(seconds: float) -> timedelta:
    """A timer's length: never zero, which Temporal refuses (and the workflow task would fail)."""
    return timedelta(seconds=max(seconds, MIN_TIMER_SECONDS))


def _valid_count(n: object) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and 0 < n <= MAX_USAGE_PER_REPORT
