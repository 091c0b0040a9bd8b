"""Whether the gateway can reach Temporal right now, known without waiting on a request.

While Temporal is down every call to it would wait out the client's retries (seconds) before it
fails. A probe checks Temporal's health every `up_interval` while it answers and every `interval`
after a failed probe or while it is down (to see it back soon); any call that finds it
unreachable marks it down at once, so a request does not wait for the next probe.
While it is down, requests that need it fail at once with 503 and Retry-After, and loaded models
keep being served from their last known endpoints (`api.registry`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable
from datetime import timedelta
from typing import TypeVar

from prometheus_client import Gauge
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from api.errors import ControlPlaneUnavailable, is_unreachable

log = logging.getLogger(__name__)
_T = TypeVar("_T")

# A probe that is only slow (a busy machine) is not proof that Temporal is gone: this many in a row
# are. A refused connection (UNAVAILABLE) is proof at once.
SLOW_PROBES_TO_DOWN = 3
PROBE_TIMEOUT = timedelta(seconds=5)


def _timed_out(exc: RPCError) -> bool:
    """The call ran out of its own time (the core SDK reports that as CANCELLED, "Timeout expired")."""
    return exc.status in (RPCStatusCode.DEADLINE_EXCEEDED, RPCStatusCode.CANCELLED)


class ControlPlane:
    def __init__(
        self, client: Client, interval: float = 1.0, up_interval: float = 5.0, gauge: Gauge | None = None
    ) -> None:
        self._client = client
        # modelium_temporal_up: 1 while Temporal answers (the client just connected), else 0.
        self._gauge = gauge
        if gauge is not None:
            gauge.set(1)
        self._interval = interval
        self._up_interval = up_interval
        self._down_since: float | None = None
        self.last_error = ""
        self._task: asyncio.Task[None] | None = None
        self._went_down = asyncio.Event()
        self._slow_probes = 0

    @property
    def available(self) -> bool:
        return self._down_since is None

    @property
    def unreachable_detail(self) -> str:
        """What /ready says while Temporal does not answer (the gateway's and the metrics port's)."""
        return f"Temporal not reachable: {self.last_error}"

    @property
    def retry_after(self) -> float:
        return max(1.0, self._interval * 2)

    def require(self, what: str) -> None:
        """Fail at once, rather than after the client's retries, while Temporal is unreachable."""
        if self._down_since is not None:
            raise ControlPlaneUnavailable(
                f"cannot {what}: Temporal is unreachable ({self.last_error}); retry shortly",
                retry_after=self.retry_after,
            )

    async def guard(self, call: Awaitable[_T], what: str) -> _T:
        """Await `call`, but give up at once if Temporal is found down meanwhile: the client would
        otherwise retry until its timeout, and the request wait that long for a 503."""
        if not self.available and asyncio.iscoroutine(call):
            call.close()  # never started: nothing to wait for
        self.require(what)
        task = asyncio.ensure_future(call)
        down = asyncio.create_task(self._went_down.wait())
        try:
            await asyncio.wait([task, down], return_when=asyncio.FIRST_COMPLETED)
        finally:
            down.cancel()
        if not task.done():
            task.cancel()
            self.require(what)
        return task.result()

    def mark_down(self, error: str) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            self._went_down.set()
            if self._gauge is not None:
                self._gauge.set(0)
            log.warning("Temporal is unreachable (%s); loaded models are served from their last known endpoints", error)
        self.last_error = error

    def mark_up(self) -> None:
        if self._down_since is not None:
            log.warning("Temporal is reachable again after %.1fs", time.monotonic() - self._down_since)
            self._down_since = None
            self._went_down.clear()
            if self._gauge is not None:
                self._gauge.set(1)
            self.last_error = ""

    async def check(self) -> bool:
        """Ask Temporal now; the answer also updates `available`. Returns whether it answered."""
        try:
            try:
                await self._client.service_client.check_health(timeout=PROBE_TIMEOUT)
            except RPCError as exc:
                if is_unreachable(exc) or _timed_out(exc):
                    raise
                # Failed on its own, neither refused nor out of time: the first call after a
                # server dies fails on its dropped connection ("transport error"); asked again,
                # a dead server refuses. Judged by the error, not by how long the call took: on
                # a busy machine the event loop alone can make it take over a second.
                await self._client.service_client.check_health(timeout=PROBE_TIMEOUT)
        except Exception as exc:
            if is_unreachable(exc):
                self.mark_down(str(exc) or type(exc).__name__)
            else:
                self._slow_probes += 1
                if self._slow_probes >= SLOW_PROBES_TO_DOWN:
                    self.mark_down(f"{self._slow_probes} health checks in a row failed: {exc}")
            return False
        self._slow_probes = 0
        self.mark_up()
        return True

    def start(self) -> None:
        self._task = asyncio.create_task(self._probe_forever(), name="control-plane-probe")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _probe_forever(self) -> None:
        while True:
            answered = await self.check()
            await asyncio.sleep(self._up_interval if answered else self._interval)
