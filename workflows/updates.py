"""New versions of a loaded model, brought up beside the serving one (blue/green), and rollback:
the part of `ModelLifecycleWorkflow` that runs while the model stays `loaded` and its files
change (see `_update_beside`). A mixin of the workflow class: it uses the workflow's state and
its steps (`_on_node`, `_take_down`, ...), declared below for the type checker."""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, TypeVar

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from modelium.names import instance_key
    from modelium.types import (
        Booking,
        Decision,
        Endpoint,
        LoadRequest,
        ModelAnalysis,
        ModelSource,
        ModelState,
        Phase,
        UnloadKind,
    )
    from workflows import steps
    from workflows.contracts import ErrorType, LifecycleInput, RollbackRequest
    from workflows.failures import Interrupted as _Interrupted
    from workflows.failures import NodeGone as _NodeLost
    from workflows.failures import describe as _describe
    from workflows.failures import error_type as _error_type

_T = TypeVar("_T")
# How long placement's view of the nodes may lag a booking change: the node announces it within
# 0.1 s, and the control worker keeps a view for 0.5 s (RegistryNodes.FRESH_SECONDS).
_PLACEMENT_SETTLE = timedelta(seconds=1.5)


class NewVersions:
    if TYPE_CHECKING:
        _state: ModelState
        _input: LifecycleInput
        _analysis: ModelAnalysis | None
        _local_steps: bool
        _want_loaded: bool
        _rollback_wanted: RollbackRequest | None

        async def _on_node(
            self, node: str, handle: workflow.ActivityHandle[_T], *, interruptible: bool = False
        ) -> _T: ...

        async def _evict_for(self, decision: Decision, *, announce: bool = True) -> None: ...

        async def _take_down(
            self, final_phase: Phase, reason: str, kind: UnloadKind, *, unload: bool | None = None
        ) -> None: ...

        def _check_interrupt(self) -> None: ...

        def _load_timeout(self, runtime: str) -> float: ...

        def _take_analysis(self, analysis: ModelAnalysis) -> None: ...

        def _took_load(self, result: steps.LoadResult, analysis: ModelAnalysis, now: float) -> None: ...

        def _set_phase(self, phase: Phase) -> None: ...

        def _upsert_summary(self, *, throttle: bool = False) -> None: ...

        def _details(self) -> str: ...

    async def _update_beside(self, source: ModelSource) -> bool:
        """A new version of a loaded model, brought up beside the serving one: analyzed, placed
        (evicting idle models if need be, as demand would), booked and loaded as a second
        instance, checked with one real request, then switched to; the old instance drains and
        goes. The model stays `loaded` throughout. True when done: switched, or failed with the
        old version still serving (`update_failed`). False when it must be recreated instead
        (no room beside it, or a runtime that serves many models from one server)."""
        st = self._state
        st.update_count += 1
        key = instance_key(st.name, st.update_count)
        st.update_error = None
        self._updating("analyzing")
        new_booking: Booking | None = None
        loaded: steps.LoadResult | None = None
        decision: Decision | None = None
        node = ""
        step = "analyze"
        try:
            analysis = await steps.analyze_model(source, local=self._local_steps)
            self._check_interrupt()
            step = "place"
            decision = await self._place_beside(
                steps.DecideRequest(analysis, overrides=analysis.overrides, may_evict=True)
            )
            if decision.runtime not in self._input.beside_runtimes or decision.no_room is not None:
                why = decision.no_room or f"{decision.runtime} serves many models from one server"
                workflow.logger.info("model %s: new version recreated, not beside the old one (%s)", st.name, why)
                st.update_state = None
                return False
            node = decision.node
            if decision.evict:
                step = "evict"
                await self._evict_for(decision, announce=False)
            self._check_interrupt()
            step = "reserve"
            self._updating("loading_beside")
            new_booking = await self._on_node(
                node,
                steps.reserve_gpu(
                    steps.ReserveRequest(
                        key,
                        decision.device,
                        decision.memory_bytes or analysis.memory_estimate_bytes,
                        decision.runtime,
                        decision.devices,
                    ),
                    node,
                ),
            )
            st.update_booking = new_booking
            self._check_interrupt()
            step = "load"
            loaded = await self._on_node(
                node,
                steps.load_model(
                    LoadRequest(
                        key, analysis.path or source.path, decision.runtime, analysis.task, new_booking, analysis.format
                    ),
                    node,
                    self._load_timeout(decision.runtime),
                ),
                interruptible=True,
            )
            step = "smoke check"
            if analysis.overrides is None or analysis.overrides.smoke is not False:
                self._updating("smoke_check")
                checked = await self._on_node(
                    node,
                    steps.smoke_check(_smoke_request(key, decision.runtime, loaded.endpoint, analysis), node),
                )
                workflow.logger.info("model %s: new version %s", st.name, checked)
            self._check_interrupt()
        except (ActivityError, ApplicationError, _Interrupted) as err:
            runtime = decision.runtime if decision is not None else ""
            if isinstance(err, _NodeLost):
                loaded, new_booking = None, None  # nothing runs there any more
            await self._drop_instance(key, runtime, node, loaded is not None, new_booking)
            no_room = _error_type(err) in (ErrorType.NO_CAPACITY, ErrorType.INSUFFICIENT_CAPACITY)
            if isinstance(err, _Interrupted) or (no_room and step in ("place", "evict", "reserve")):
                # Removed, newer files or a lost node: the main loop handles them. No room beside
                # the old version: it is recreated.
                st.update_state = None
                return isinstance(err, _Interrupted)
            st.update_error = f"{step} failed: {_describe(err)}"
            workflow.logger.warning("model %s: new version not switched to: %s", st.name, st.update_error)
            # The old version serves on. Fixing the files tries again (a new fingerprint).
            self._updating("update_failed")
            await steps.count_update(steps.UpdateOutcome(st.name, "failed"))
            return True
        # The switch: from here on the new instance is the model's.
        old_key, old_runtime, old_node, old_booking = st.key, st.runtime or "", st.node or "", st.booking
        st.previous = self._serving_source(analysis.path or source.path)
        now = workflow.now().timestamp()
        st.path, st.fingerprint = source.path, source.fingerprint
        self._take_analysis(analysis)
        st.decision, st.runtime, st.node, st.device = decision, decision.runtime, decision.node, decision.device
        st.instance, st.booking, st.update_booking = key, new_booking, None
        self._took_load(loaded, analysis, now)
        st.switched_at = now
        workflow.logger.info("model %s switched to its new version (%s on %s)", st.name, key, st.node)
        self._updating("draining")
        await steps.count_update(steps.UpdateOutcome(st.name, "switched"))
        # The old instance: gateways stop sending it requests within their endpoint cache time;
        # it answers what it has (bounded), then goes, and its booking with it.
        try:
            drained = await self._on_node(
                old_node,
                steps.drain_runtime(
                    steps.DrainRequest(old_key, old_runtime, self._input.drain_seconds, settle_seconds=5.0), old_node
                ),
            )
            workflow.logger.info("model %s: old version %s", st.name, drained)
        except (ActivityError, _Interrupted) as err:
            workflow.logger.warning("model %s: drain of %s cut short: %s", st.name, old_key, _describe(err))
        await self._drop_instance(old_key, old_runtime, old_node, True, old_booking, reason="replaced by a new version")
        st.update_state = None
        self._set_phase(Phase.LOADED)
        return True

    async def _roll_back(self) -> None:
        """Serve `previous` again: beside the current version as an update, or, without room
        beside it, taken down and loaded again on it. Until new files arrive, the watched folder's
        current files are held off (they are the version rolled back from)."""
        st = self._state
        target, held = st.previous, st.fingerprint
        try:
            if target is None or st.phase != Phase.LOADED:
                return
            workflow.logger.info("model %s: rolling back to %s", st.name, target.version or target.path)
            if not await self._update_beside(target):
                await self._take_down(
                    Phase.DISCOVERED, "rolling back to the previous version", UnloadKind.FILES_CHANGED
                )
                st.path, st.fingerprint, st.previous = target.path, target.fingerprint, None
                self._analysis = None
                self._want_loaded = True
            if st.update_state != "update_failed":
                st.held_fingerprint, st.version_pin = held, target.version
        finally:
            self._rollback_wanted = None

    def _serving_source(self, new_path: str) -> ModelSource | None:
        """The version serving now, if it can be loaded again once the folder `new_path` serves
        instead: a numbered version of the same folder, or a folder of its own (a symlink's earlier
        target). None when its files were replaced in place: nothing to go back to."""
        st = self._state
        if st.version is not None:
            return ModelSource(st.name, st.path, st.fingerprint, version=st.version)
        serving = st.serving_path or st.path
        return ModelSource(st.name, serving, st.fingerprint) if serving != new_path else None

    async def _place_beside(self, request: steps.DecideRequest) -> Decision:
        """Where the new version goes. Placement reads the nodes' announced bookings, which lag
        a release by up to a second: right after an earlier version drained and went (a rollback
        after a switch), its room still looks taken. No room is therefore asked once more, on a
        fresh view, before the model is taken down for a recreate."""
        # (Histories recorded before this replay as they ran: the patch is asked only for no room.)
        try:
            decision = await steps.decide_runtime(request, local=self._local_steps)
        except (ActivityError, ApplicationError) as err:
            no_room = _error_type(err) in (ErrorType.NO_CAPACITY, ErrorType.INSUFFICIENT_CAPACITY)
            if not no_room or not workflow.patched("beside-decides-twice"):
                raise
        else:
            settled = decision.no_room is None or decision.runtime not in self._input.beside_runtimes
            if settled or not workflow.patched("beside-decides-twice"):
                return decision
        await workflow.sleep(_PLACEMENT_SETTLE)
        return await steps.decide_runtime(request, local=self._local_steps)

    def _updating(self, state: str) -> None:
        self._state.update_state = state
        workflow.set_current_details(self._details())
        self._upsert_summary()

    async def _drop_instance(
        self,
        key: str,
        runtime: str,
        node: str,
        running: bool,
        booking: Booking | None,
        *,
        reason: str = "new version not switched to",
    ) -> None:
        """Stop an instance that is not (or no longer) the model's and give back its booking;
        best effort, each step logged when it fails (the node's reconcile catches what is left)."""
        if running and node:
            try:
                await self._on_node(
                    node,
                    steps.unload_model(steps.UnloadRequest(key, runtime, reason, UnloadKind.FILES_CHANGED), node),
                )
            except (ActivityError, _Interrupted) as err:
                workflow.logger.warning("model %s: could not stop %s: %s", self._state.name, key, _describe(err))
        if booking is not None:
            try:
                await self._on_node(booking.node, steps.release_gpu(key, booking.node))
            except (ActivityError, _Interrupted) as err:
                workflow.logger.warning("model %s: could not release %s: %s", self._state.name, key, _describe(err))
        self._state.update_booking = None


def _smoke_request(key: str, runtime: str, endpoint: Endpoint, analysis: ModelAnalysis) -> steps.SmokeRequest:
    """The smoke check of a new version: the model's own (modelium.yaml `smoke:`) or the default."""
    own = analysis.overrides
    if own is not None and own.smoke_path:
        return steps.SmokeRequest(key, runtime, endpoint, own.smoke_path, own.smoke_body, own.smoke_status)
    return steps.SmokeRequest(key, runtime, endpoint)
