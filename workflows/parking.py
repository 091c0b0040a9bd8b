"""Parking: an idle model's runtime put to sleep instead of stopped (vLLM's sleep mode), and
woken when it is asked for again; the part of `ModelLifecycleWorkflow` for the `parked` and
`waking` phases. A mixin of the workflow class: it uses the workflow's state and steps, declared
below for the type checker."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, TypeVar

from temporalio import workflow
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from modelium.types import ModelAnalysis, ModelState, Phase, UnloadKind
    from workflows import steps
    from workflows.contracts import CapacityFreed
    from workflows.failures import NodeGone as _NodeLost
    from workflows.failures import describe as _describe

_T = TypeVar("_T")


class Parking:
    if TYPE_CHECKING:
        _state: ModelState
        _unload_reason: str | None
        _unload_kind: UnloadKind
        _held_demand: bool
        _bringups: int
        _analysis: ModelAnalysis | None

        async def _on_node(
            self, node: str, handle: workflow.ActivityHandle[_T], *, interruptible: bool = False
        ) -> _T: ...

        async def _take_down(
            self, final_phase: Phase, reason: str, kind: UnloadKind, *, unload: bool | None = None
        ) -> None: ...

        async def _notify_waiting(self, notice: CapacityFreed) -> None: ...

        def _set_phase(self, phase: Phase) -> None: ...

        def _upsert_summary(self, *, throttle: bool = False) -> None: ...

    async def _park(self, idle: float) -> bool:
        """Idle: put the runtime to sleep instead of stopping it (vLLM's sleep mode), its weights
        booked in the node's host memory. False when it could not be (no room in the CPU budget,
        the runtime refused): the caller unloads it then."""
        st = self._state
        if st.booking is None or st.node is None:
            return False
        analysis = self._analysis
        host = analysis.weight_bytes if analysis is not None and analysis.weight_bytes else st.booking.bytes
        self._set_phase(Phase.PARKED)  # no request is routed to it from here on
        try:
            parked = await self._on_node(
                st.node, steps.park_model(steps.ParkRequest(st.key, st.runtime or "", host), st.node)
            )
        except _NodeLost:
            return True  # the main loop places it again
        except ActivityError as err:
            st.last_error = f"could not park it ({_describe(err)}); unloaded instead"
            workflow.logger.info("model %s: %s", st.name, st.last_error)
            return False
        # A new booking object: the listed summary compares it with the one it last wrote.
        st.wake_bytes, st.parked_bytes = st.booking.bytes, parked.host_bytes
        st.booking = replace(st.booking, bytes=parked.gpu_bytes)
        st.unload_reason = f"idle for {idle:g}s: parked (asleep, weights in host memory); a request wakes it"
        workflow.logger.info("model %s parked: %s", st.name, st.unload_reason)
        self._upsert_summary()
        if st.wake_bytes > parked.gpu_bytes:
            # Room on the GPU for models waiting for it.
            await self._notify_waiting(CapacityFreed(st.node, st.name, st.wake_bytes - parked.gpu_bytes))
        return True

    async def _leave_park(self) -> None:
        """A parked model asked for (woken) or to go (unloaded, evicted)."""
        if self._unload_reason is not None:
            reason, self._unload_reason = self._unload_reason, None
            await self._take_down(Phase.UNLOADED, reason, self._unload_kind)
            return
        st = self._state
        assert st.booking is not None and st.node is not None
        self._set_phase(Phase.WAKING)
        booking = st.booking
        request = steps.WakeRequest(
            st.key, st.runtime or "", booking.device, st.wake_bytes or booking.bytes, booking.devices
        )
        try:
            woken = await self._on_node(st.node, steps.wake_model(request, st.node))
        except _NodeLost:
            return
        except ActivityError as err:
            reason = f"could not wake it ({_describe(err)}); loading it afresh"
            workflow.logger.info("model %s: %s", st.name, reason)
            await self._take_down(Phase.DISCOVERED, reason, UnloadKind.UNHEALTHY, unload=True)
            st.last_error = reason
            return
        st.booking, st.parked_bytes, st.wake_bytes = woken, None, None
        st.last_used_at = workflow.now().timestamp()
        st.unload_reason = st.demanded_at = None
        self._held_demand = False
        self._bringups += 1
        self._set_phase(Phase.LOADED)
