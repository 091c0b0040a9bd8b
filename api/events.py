"""What changes in the fleet, as a stream of events (`GET /events`, server-sent events).

Fed from what the workflows publish, never by asking each one: while anyone listens, one List
call a second of the model summaries written since the last one (the fleet index `GET /models`
keeps too), and one List call every two seconds of the node workflows' inventories; plus the
requests this gateway serves, sampled under load. Each gateway numbers its events and keeps the
last `ring_size` of them, so a client that reconnects with `Last-Event-ID` gets what it missed
(or a `gap` event saying what it cannot get back).

Kinds: `phase` (a model's phase changed: from, to, the reason, seconds in the previous phase),
`load_progress` (a model on its way up: phase, seconds so far against its last measured load
time, an estimated fraction; while it loads, what the load waits on and the runtime's own last
output line, read from the load activity's heartbeat), `booking` and `release` (memory booked
or given back, per node and device), `eviction` (a model unloaded to make room, and why),
`update` (a new version's step, its switch, or its failure with the reason), `node` (a node
announced its devices, or was declared lost), `request` (model, organization, status, latency;
at most `request_rate` a second, with the number left out since the last one), and `gap`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from api.auth import Principal
from modelium.types import ModelState, NodeInventory, Phase

log = logging.getLogger(__name__)

KINDS = ("phase", "load_progress", "booking", "release", "eviction", "update", "node", "request", "gap")
# Phases in which a model is on its way to serving: their events carry load progress.
_COMING_UP = (Phase.DECIDING, Phase.RESERVING, Phase.LOADING, Phase.RESTARTING, Phase.EVICTING, Phase.WAKING)
KEEPALIVE_SECONDS = 15.0
# The fleet is still followed this long after the last listener left, so that a client that
# reconnects (EventSource retries within seconds) misses nothing.
LINGER_SECONDS = 60.0
# Loads whose heartbeats are read each second (one describe call each).
MAX_REPORTS = 20


@dataclass(frozen=True)
class Event:
    id: int
    kind: str
    at: float
    model: str | None
    data: dict[str, Any]
    # The organization a request event belongs to (only its keys and admins see it).
    organization: str | None = None

    def encode(self) -> bytes:
        body = {"id": self.id, "kind": self.kind, "at": round(self.at, 3), "model": self.model, **self.data}
        if self.organization is not None:
            body["organization"] = self.organization
        return f"id: {self.id}\nevent: {self.kind}\ndata: {json.dumps(body, separators=(',', ':'))}\n\n".encode()

    def visible_to(self, principal: Principal) -> bool:
        if self.kind == "request" and not principal.admin and self.organization != principal.organization:
            return False
        return self.model is None or principal.may_use(self.model)


@dataclass
class Filter:
    models: frozenset[str] = frozenset()
    kinds: frozenset[str] = frozenset()

    def matches(self, event: Event) -> bool:
        if self.kinds and event.kind not in self.kinds and event.kind != "gap":
            return False
        return not self.models or event.model is None or event.model in self.models


@dataclass(eq=False)  # each one is itself, and a member of a set
class _Subscriber:
    queue: asyncio.Queue[Event | None] = field(default_factory=lambda: asyncio.Queue(maxsize=1000))


class EventHub:
    """The ring, the subscribers, and the watcher that turns listings into events."""

    def __init__(
        self,
        models: Callable[[], Awaitable[list[ModelState]]],
        nodes: Callable[[], Awaitable[list[NodeInventory]]],
        load_report: Callable[[str], Awaitable[tuple[str | None, str | None] | None]] | None = None,
        *,
        ring_size: int = 2000,
        interval: float = 1.0,
        node_interval: float = 2.0,
        request_rate: float = 20.0,
    ) -> None:
        self._models = models
        self._nodes = nodes
        self._load_report = load_report
        self._ring: deque[Event] = deque(maxlen=ring_size)
        self._next_id = 1
        self._subscribers: set[_Subscriber] = set()
        self._interval = interval
        self._node_interval = node_interval
        self._watcher: asyncio.Task[None] | None = None
        self._left_at = 0.0
        # The last event before the fleet went unwatched (nobody listened): a client resuming from
        # before it cannot get what changed meanwhile, and hears so.
        self._blind_after: int | None = None
        self._known: dict[str, ModelState] | None = None
        self._announced: dict[str, tuple[float, str | None]] = {}
        # Request sampling: a token bucket of `request_rate` a second, and what it left out.
        self._rate = request_rate
        self._tokens = request_rate
        self._refilled = time.monotonic()
        self._skipped = 0

    # -- publishing ------------------------------------------------------------------------------
    def publish(self, kind: str, model: str | None, data: dict[str, Any], organization: str | None = None) -> Event:
        event = Event(self._next_id, kind, time.time(), model, data, organization)
        self._next_id += 1
        self._ring.append(event)
        for sub in list(self._subscribers):
            try:
                sub.queue.put_nowait(event)
            except asyncio.QueueFull:
                # Too slow to keep up: dropped, and told so; it may reconnect with Last-Event-ID.
                self._subscribers.discard(sub)
                with contextlib.suppress(asyncio.QueueFull):
                    sub.queue.get_nowait()
                    sub.queue.put_nowait(None)
        return event

    def request(self, model: str, organization: str, status: int, seconds: float) -> None:
        """One request this gateway answered: published unless more than `request_rate` a second."""
        now = time.monotonic()
        self._tokens = min(self._rate, self._tokens + (now - self._refilled) * self._rate)
        self._refilled = now
        if self._tokens < 1:
            self._skipped += 1
            return
        self._tokens -= 1
        data = {"status": status, "latency_ms": round(seconds * 1000, 2), "skipped_before": self._skipped}
        self._skipped = 0
        self.publish("request", model, data, organization)

    # -- subscribing -----------------------------------------------------------------------------
    async def stream(self, principal: Principal, wanted: Filter, last_id: int | None) -> AsyncIterator[bytes]:
        """The events `principal` may see and `wanted` asks for: first those after `last_id`
        still in the ring, then live ones; a comment every KEEPALIVE_SECONDS keeps proxies open."""
        sub = _Subscriber()
        self._subscribers.add(sub)
        self._ensure_watching()
        try:
            yield b": connected\n\n"
            if last_id is not None:
                oldest = self._ring[0].id if self._ring else self._next_id
                if last_id + 1 < oldest:
                    missed = {
                        "missed_from": last_id + 1,
                        "resumed_at": oldest,
                        "reason": "older than this gateway keeps",
                    }
                    yield Event(0, "gap", time.time(), None, missed).encode()
                elif self._blind_after is not None and last_id <= self._blind_after:
                    blind = {
                        "after": self._blind_after,
                        "reason": "nobody listened for a while; read GET /models again",
                    }
                    yield Event(0, "gap", time.time(), None, blind).encode()
                for kept in list(self._ring):
                    if kept.id > last_id and kept.visible_to(principal) and wanted.matches(kept):
                        yield kept.encode()
                # Live events from here on, without those the backlog already sent.
                floor = self._ring[-1].id if self._ring else 0
            else:
                floor = 0
            while True:
                try:
                    event = await asyncio.wait_for(sub.queue.get(), KEEPALIVE_SECONDS)
                except TimeoutError:
                    yield b": keepalive\n\n"
                    continue
                if event is None:
                    lag = {"reason": "this client fell too far behind; reconnect with Last-Event-ID"}
                    yield Event(0, "gap", time.time(), None, lag).encode()
                    return
                if event.id > floor and event.visible_to(principal) and wanted.matches(event):
                    yield event.encode()
        finally:
            self._subscribers.discard(sub)
            self._left_at = time.monotonic()

    # -- watching the fleet ----------------------------------------------------------------------
    def _ensure_watching(self) -> None:
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.create_task(self._watch(), name="events-watch")

    async def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher

    async def _watch(self) -> None:
        """Runs while anyone listens (and LINGER_SECONDS after); a failed listing is tried again."""
        nodes_due = 0.0
        while self._subscribers or time.monotonic() - self._left_at < LINGER_SECONDS:
            try:
                states = await self._models()
                self.models_changed(states, await self._load_reports(states))
                if time.monotonic() >= nodes_due:
                    nodes_due = time.monotonic() + self._node_interval
                    self.nodes_announced(await self._nodes())
            except Exception as exc:  # Temporal down, say: the stream stays open, quiet
                log.info("events: listing failed: %s", exc)
            await asyncio.sleep(self._interval)
        # Nobody listens: the next listener starts from a fresh baseline.
        self._known = None
        self._blind_after = self._next_id - 1

    async def _load_reports(self, states: list[ModelState]) -> dict[str, tuple[str | None, str | None]]:
        """What the loads under way last reported (at most MAX_REPORTS of them, one describe
        call each): the runtime's own progress lines."""
        if self._load_report is None:
            return {}
        loading = [s.name for s in states if s.phase == Phase.LOADING][:MAX_REPORTS]
        answers = await asyncio.gather(*(self._load_report(name) for name in loading), return_exceptions=True)
        return {name: answer for name, answer in zip(loading, answers, strict=True) if isinstance(answer, tuple)}

    def models_changed(
        self, states: list[ModelState], reports: dict[str, tuple[str | None, str | None]] | None = None
    ) -> None:
        """Events for what differs from the last listing (the first one is the baseline);
        `reports`: what running loads last said (`load_report`)."""
        now = time.time()
        current = {s.name: s for s in states}
        known, self._known = self._known, current
        if known is None:
            return
        for name, state in current.items():
            before = known.get(name)
            if before is None or before.phase != state.phase:
                self._phase(state, before, now)
            if before is not None and (before.update_state, before.switched_at) != (
                state.update_state,
                state.switched_at,
            ):
                self._update(state, before)
            self._bookings(state, before)
            if state.phase in _COMING_UP:
                elapsed = max(0.0, now - (state.updated_at or now))
                expected = state.load_seconds
                progress: dict[str, Any] = {"phase": state.phase, "elapsed_seconds": round(elapsed, 1)}
                if expected:
                    progress["expected_seconds"] = round(expected, 1)
                    progress["fraction"] = round(min(elapsed / expected, 0.99), 3)
                waiting_on, line = (reports or {}).get(name, (None, None))
                if waiting_on:
                    progress["status"] = waiting_on
                if line:
                    progress["runtime_line"] = line
                self.publish("load_progress", name, progress)
        for name, before in known.items():
            if name not in current:
                gone = ModelState(name=name, path=before.path, phase=Phase.REMOVED)
                self._phase(gone, before, now)
                self._bookings(gone, before)

    def _phase(self, state: ModelState, before: ModelState | None, now: float) -> None:
        reason = state.last_error if state.phase == Phase.FAILED else state.rest_reason or state.unload_reason
        data: dict[str, Any] = {"phase": state.phase, "previous": before.phase if before else None, "reason": reason}
        if before is not None and before.updated_at is not None:
            data["seconds_in_previous"] = round(max(0.0, (state.updated_at or now) - before.updated_at), 2)
        if state.phase == Phase.LOADED and state.load_seconds is not None:
            data["load_seconds"] = round(state.load_seconds, 2)
        self.publish("phase", state.name, data)
        evicted = state.unload_reason or ""
        if state.phase == Phase.EVICTING or (
            state.phase == Phase.UNLOADED
            and evicted.startswith("evicted")
            and (before is None or before.unload_reason != evicted)
        ):
            if before is None or before.phase != Phase.EVICTING:
                self.publish("eviction", state.name, {"reason": state.unload_reason or "evicted to make room"})

    def _update(self, state: ModelState, before: ModelState) -> None:
        """A new version's progress: under way (its step), switched to, or failed (the previous
        version serves on), with the serving version."""
        if state.update_state is not None:
            step = state.update_state
        elif state.switched_at != before.switched_at:
            step = "switched"
        else:
            step = "done"  # a failure cleared (the serving files back), or a recreate's end
        data: dict[str, Any] = {"state": step, "fingerprint": state.fingerprint, "version": state.version}
        if step == "update_failed":
            data["error"] = state.update_error
        self.publish("update", state.name, data)

    def _bookings(self, state: ModelState, before: ModelState | None) -> None:
        old = before.booking if before else None
        new = state.booking
        if old == new:
            return
        if old is not None and (new is None or (old.node, old.all_devices) != (new.node, new.all_devices)):
            self.publish("release", state.name, {"node": old.node, "devices": old.all_devices, "bytes": old.bytes})
        if new is not None:
            self.publish("booking", state.name, {"node": new.node, "devices": new.all_devices, "bytes": new.bytes})

    def nodes_announced(self, inventories: list[NodeInventory]) -> None:
        for inv in inventories:
            seen = (inv.announced_at, inv.lost)
            if self._announced.get(inv.node) == seen:
                continue
            self._announced[inv.node] = seen
            devices = [
                {
                    "device": d.device,
                    "name": d.name,
                    "total_bytes": d.total_bytes,
                    "booked_bytes": d.booked_bytes,
                    "used_bytes": d.used_bytes,
                }
                for d in inv.devices
            ]
            data = {"node": inv.node, "devices": devices, "runtimes": inv.runtimes, "lost": inv.lost}
            self.publish("node", None, data)
