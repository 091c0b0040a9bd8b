"""The embedded runtime's warm pool: runtime processes started ahead of demand, imports done
(torch, transformers, the model classes: about 2 s of the 2.2 s a tiny model's cold load took
here), each waiting to be handed the next model to load (`embedded_server/spare.py`).

- `runtimes.embedded.warm_pool` spares are kept (default 1; 0 turns the pool off). A load takes a
  ready one, or waits for one still importing (it is always ahead of a process started now), and
  a replacement is started at once.
- The pool's memory counts against the node's CPU budget: one booking in the ledger under
  `POOL_BOOKING`, the spares' measured resident memory (an estimate until the first is measured).
  When the budget has no room for it, no spare is started and loads start cold; it is tried again
  at the next load.
- Spares are reaped like any runtime process: each is recorded at spawn (records under
  `SPARE_PREFIX`), and a node agent started after a killed one stops what it finds there before
  starting its own. Stopping the pool stops them and releases the booking.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from modelium.gpu import process_tree, resident_bytes
from modelium.ledger import InsufficientCapacity, Ledger
from modelium.runtimes.base import RuntimeStartError
from modelium.runtimes.process import ManagedProcess, free_port, loopback_for
from modelium.runtimes.records import RuntimeRecords
from modelium.types import Endpoint, EndpointProtocol

log = logging.getLogger(__name__)

# Runtime records of spares are kept under these names; never a model's (names have no "~").
SPARE_PREFIX = "~spare-"
# The ledger's booking for the pool (a model key can never be this).
POOL_BOOKING = "~warm-pool"
# Booked per spare until one has been measured (a spare held 255-360 MB resident here).
DEFAULT_SPARE_BYTES = 400 * 2**20
# How often a starting spare is asked whether it is ready.
READY_POLL_SECONDS = 0.05


@dataclass
class Spare:
    key: str
    proc: ManagedProcess
    port: int
    ready: asyncio.Future[bool] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    started: float = field(default_factory=time.monotonic)


class WarmPool:
    def __init__(
        self,
        size: int,
        argv: Callable[[int], list[str]],
        env: Callable[[], Mapping[str, str]],
        log_path: Path,
        host: str,
        records: RuntimeRecords | None,
        ready_timeout: float,
    ) -> None:
        self.size = size
        self._argv = argv
        self._env = env
        self._log_path = log_path
        self._host = host
        self._records = records
        self._ready_timeout = ready_timeout
        self._spares: list[Spare] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._seq = itertools.count(1)
        self._ledger: Ledger | None = None
        self._on_booking: Callable[[], None] = lambda: None
        self._per_spare = DEFAULT_SPARE_BYTES
        self._booked = False
        # Spares are started from `start` on (an adapter used without a node agent has none).
        self._started = False
        self._closed = False
        self.cold_reason: str | None = None

    def book_in(self, ledger: Ledger, on_change: Callable[[], None]) -> None:
        """Count the pool against `ledger`'s CPU budget; `on_change` after each change."""
        self._ledger, self._on_booking = ledger, on_change

    # -- what the adapter asks ---------------------------------------------------------------
    def pids(self) -> list[int]:
        """The spares' processes, ready or still importing."""
        return [s.proc.pid for s in self._spares if s.proc.pid is not None and s.proc.alive()]

    def ready(self) -> list[int]:
        """The spares ready to take a model now."""
        ready = [s.proc.pid for s in self._spares if s.ready.done() and s.ready.result() and s.proc.alive()]
        return [pid for pid in ready if pid is not None]

    def start(self) -> None:
        self._started = True
        self.fill()

    def fill(self) -> None:
        """Start spares until `size` are ready or on their way (when the budget has room)."""
        if self._closed or not self._started or self.size <= 0:
            return
        for gone in [s for s in self._spares if s.ready.done() and not s.proc.alive()]:
            tail = gone.proc.log_tail()
            log.warning("warm spare pid %s exited; last lines of %s:\n%s", gone.proc.pid, self._log_path, tail)
            self._spares.remove(gone)
            if self._records is not None:
                self._records.remove(gone.key)
        missing = self.size - len(self._spares)
        if missing <= 0 or not self._book():
            return
        for _ in range(missing):
            self._spawn()

    async def take(self) -> Spare | None:
        """A spare for the next load: a ready one, else one still importing (waited for), else
        None (no pool, no room for one, or its spares failed). The caller calls `fill` once the
        load is done: a replacement importing meanwhile would take CPU from the load."""
        for spare in sorted(self._spares, key=lambda s: (not s.ready.done(), s.started)):
            self._spares.remove(spare)
            if await asyncio.shield(spare.ready) and spare.proc.alive():
                return spare
            await asyncio.to_thread(spare.proc.stop)
        return None

    def handed_over(self, spare: Spare) -> None:
        """`spare` serves a model now: its record moves to the model's (the adapter saves it)."""
        if self._records is not None:
            self._records.remove(spare.key)

    async def close(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        spares, self._spares = self._spares, []
        await asyncio.gather(*(asyncio.to_thread(s.proc.stop) for s in spares))
        for spare in spares:
            if self._records is not None:
                self._records.remove(spare.key)
        if self._ledger is not None and self._booked:
            self._ledger.release(POOL_BOOKING)
            self._booked = False
            self._on_booking()

    # -- inside ------------------------------------------------------------------------------
    def _book(self) -> bool:
        """Book the pool's memory (once; re-sized as spares are measured). False: no room."""
        if self._ledger is None or self._booked:
            return True
        nbytes = self.size * self._per_spare
        try:
            self._ledger.reserve(POOL_BOOKING, "cpu", nbytes)
        except InsufficientCapacity as exc:
            reason = f"no room in the CPU budget for the warm pool ({exc}); loads start cold"
            if reason != self.cold_reason:
                log.warning("%s", reason)
            self.cold_reason = reason
            return False
        self._booked, self.cold_reason = True, None
        self._on_booking()
        return True

    def _spawn(self) -> None:
        port = free_port(self._host)
        key = f"{SPARE_PREFIX}{next(self._seq)}"
        proc = ManagedProcess(self._argv(port), self._log_path, env=self._env())
        try:
            proc.start()
        except OSError as exc:
            log.warning("could not start a warm spare (%s): %s", proc.argv[0], exc)
            return
        spare = Spare(key, proc, port)
        self._spares.append(spare)
        if self._records is not None:
            endpoint = Endpoint(f"http://{self._host}:{port}", EndpointProtocol.OPENAI, "embedded", "", proc.pid)
            self._records.save(key, proc, endpoint)
        task = asyncio.create_task(self._await_ready(spare), name=f"warm-spare {key}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _await_ready(self, spare: Spare) -> None:
        url = f"http://{loopback_for(self._host)}:{spare.port}/spare"
        ready = False
        try:
            await spare.proc.wait_healthy(url, self._ready_timeout, interval=READY_POLL_SECONDS)
            ready = True
        except RuntimeStartError as exc:
            log.warning("warm spare pid %s did not become ready: %s", spare.proc.pid, exc)
            await asyncio.to_thread(spare.proc.stop)
            if self._records is not None:
                self._records.remove(spare.key)
        else:
            self._measure(spare)
            log.info("warm spare pid %s ready in %.1fs", spare.proc.pid, time.monotonic() - spare.started)
        finally:
            if not spare.ready.done():
                spare.ready.set_result(ready)

    def _measure(self, spare: Spare) -> None:
        """Book what a ready spare really holds: its resident memory, for each spare."""
        assert spare.proc.pid is not None
        held = resident_bytes(process_tree(spare.proc.pid))
        if not held or self._ledger is None or not self._booked:
            return
        self._per_spare = held
        nbytes = self.size * held
        booking = self._ledger.get(POOL_BOOKING)
        if booking is not None and abs(booking.bytes - nbytes) > booking.bytes * 0.01:
            _, over = self._ledger.resize(POOL_BOOKING, nbytes)
            if over:
                log.warning("the warm pool holds %d MiB, which takes %s past its budget", nbytes >> 20, ", ".join(over))
            self._on_booking()
