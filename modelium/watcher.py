"""Turns a watched folder into model events: ready (files settled) and removed.

Each immediate subdirectory of a watched directory is one model. A directory is handed over only
once its files have stopped changing for `settle_seconds` and its fingerprint (every file's path,
size and modification time) reads the same twice in a row, so a half-copied model is never loaded.
Directories whose names start with '.' are ignored, which lets a copy tool write to `.name` and
rename when done.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirModifiedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from modelium.analyzer import PARTIAL_SUFFIXES
from modelium.names import sanitize_model_name
from modelium.types import ModelSource

log = logging.getLogger(__name__)

# Folders looked at and handed over at once.
HANDOVER_CONCURRENCY = 32
# Every this often the watched directories are listed again, for events the kernel dropped.
RESCAN_SECONDS = 10.0

OnReady = Callable[[ModelSource], Awaitable[None]]
OnRemoved = Callable[[str], Awaitable[None]]


def _scan(directory: Path) -> tuple[str, int, bool, float]:
    """One walk: a digest of every file's relative path, size and mtime; the number of files;
    whether any of them is a copy tool's partial file; and the newest mtime (epoch seconds)."""
    entries = []
    partial = False
    newest = 0.0
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted(files):
            path = Path(root, name)
            try:
                st = path.stat()
            except FileNotFoundError:
                continue  # removed while we looked; the next look sees the new state
            partial = partial or name.endswith(PARTIAL_SUFFIXES)
            newest = max(newest, st.st_mtime)
            entries.append(f"{path.relative_to(directory)}\0{st.st_size}\0{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()[:32], len(entries), partial, newest


def fingerprint(directory: Path) -> tuple[str, int]:
    """A digest of every file's relative path, size and mtime; and the number of files."""
    digest, files, _, _ = _scan(directory)
    return digest, files


# What changes a model folder. Opening and reading files is left out of the inotify mask: every
# analysis and load reads the folder, and at thousands of models those events overflowed the
# kernel's queue (and each read made the folder be looked at again).
_CHANGES = (
    FileCreatedEvent,
    DirCreatedEvent,
    FileModifiedEvent,
    DirModifiedEvent,
    FileDeletedEvent,
    DirDeletedEvent,
    FileMovedEvent,
    DirMovedEvent,
    FileClosedEvent,
)


@dataclass
class _Entry:
    name: str
    path: Path
    last_event: float
    pending: bool = True
    seen_fingerprint: str | None = None
    emitted_fingerprint: str | None = None


class _Handler(FileSystemEventHandler):
    def __init__(self, root: Path, mark: Callable[[Path, str], None]) -> None:
        self._root = root
        self._mark = mark

    def on_any_event(self, event: FileSystemEvent) -> None:
        for raw in (event.src_path, getattr(event, "dest_path", "")):
            if not raw:
                continue
            path = Path(os.fsdecode(raw))
            try:
                rel = path.relative_to(self._root)
            except ValueError:
                continue
            if rel.parts:
                self._mark(self._root, rel.parts[0])


class ModelFolderWatcher:
    def __init__(
        self,
        directories: Sequence[Path],
        on_ready: OnReady,
        on_removed: OnRemoved,
        settle_seconds: float = 3.0,
        polling: bool = False,
        poll_interval: float = 1.0,
        rescan_seconds: float = RESCAN_SECONDS,
    ) -> None:
        self._dirs = [Path(d).resolve() for d in directories]
        self._on_ready = on_ready
        self._on_removed = on_removed
        self._settle = settle_seconds
        self._polling = polling
        self._poll_interval = poll_interval
        self._rescan_seconds = rescan_seconds
        self._entries: dict[str, _Entry] = {}
        # The entries still to be looked at (a subset of _entries).
        self._pending: dict[str, _Entry] = {}
        self._dirty: set[tuple[Path, str]] = set()
        self._lock = threading.Lock()
        self._scanned = asyncio.Event()
        self._warned: set[Path] = set()
        # Each watched directory's modification time when _rescan last listed it.
        self._listed_mtime: dict[Path, int] = {}
        # Set (from the observer's thread) when a folder is marked: an idle watcher sleeps until
        # then, or until its next rescan, instead of ticking.
        self._woken: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def directories(self) -> list[Path]:
        return list(self._dirs)

    def present_models(self) -> dict[str, Path]:
        """Models whose directories exist, as of the last scan."""
        return {name: entry.path for name, entry in self._entries.items()}

    async def wait_scanned(self) -> None:
        """Returns once every directory present at start-up has been looked at."""
        await self._scanned.wait()

    def _rank(self, item: tuple[Path, str]) -> tuple[int, str]:
        root, child = item
        return (self._dirs.index(root) if root in self._dirs else len(self._dirs), child)

    def _mark(self, root: Path, entry: str) -> None:
        with self._lock:
            first = not self._dirty
            self._dirty.add((root, entry))
        if first and self._loop is not None and self._woken is not None:
            self._loop.call_soon_threadsafe(self._woken.set)

    def _observer(self, polling: bool) -> BaseObserver:
        observer: BaseObserver = PollingObserver(timeout=self._poll_interval) if polling else Observer()
        for root in self._dirs:
            observer.schedule(_Handler(root, self._mark), str(root), recursive=True, event_filter=list(_CHANGES))
        return observer

    def _start_observer(self) -> BaseObserver:
        """Events (inotify) where the kernel allows, else polling: thousands of model folders
        can exceed the inotify limits, and a watcher that sees nothing would be worse."""
        observer: BaseObserver | None = None
        try:
            observer = self._observer(self._polling)
            observer.start()
        except OSError as exc:
            if self._polling or exc.errno not in (errno.ENOSPC, errno.EMFILE, errno.ENFILE):
                raise
            limit = "fs.inotify.max_user_watches" if exc.errno == errno.ENOSPC else "fs.inotify.max_user_instances"
            log.warning(
                "cannot watch %s with inotify (%s): the kernel's limit %s is reached. Polling every %gs "
                "instead; raise it (sysctl -w %s=524288) or set orchestration.model_discovery.polling",
                ", ".join(map(str, self._dirs)),
                exc.strerror or exc,
                limit,
                self._poll_interval,
                limit,
            )
            if observer is not None:
                with contextlib.suppress(Exception):
                    observer.stop()
            self._polling = True
            observer = self._observer(True)
            observer.start()
        return observer

    @property
    def polling(self) -> bool:
        return self._polling

    async def run(self, stop: asyncio.Event) -> None:
        for root in self._dirs:
            root.mkdir(parents=True, exist_ok=True)
        observer = self._start_observer()
        log.info(
            "watching %s for models (%s, settle %.1fs)",
            ", ".join(map(str, self._dirs)),
            "polling" if self._polling else "events",
            self._settle,
        )
        self._loop = asyncio.get_running_loop()
        woken = self._woken = asyncio.Event()

        async def wake_on_stop() -> None:
            await stop.wait()
            woken.set()

        stopper = asyncio.create_task(wake_on_stop(), name="watcher-stop")
        try:
            for root in self._dirs:
                for child in root.iterdir():
                    self._mark(root, child.name)
            tick = min(max(self._settle / 4, 0.05), 0.25)
            rescanned = time.monotonic()
            while not stop.is_set():
                if time.monotonic() - rescanned >= self._rescan_seconds:
                    rescanned = time.monotonic()
                    if self._roots_changed():
                        known = {entry.path for entry in self._entries.values()}
                        await asyncio.to_thread(self._rescan, known)
                await self._tick()
                self._scanned.set()
                # Cleared before looking: a folder marked from here on wakes the wait below.
                woken.clear()
                with self._lock:
                    idle = not self._dirty and not self._pending
                # Ticking only while a folder is settling; idle, until a change or the rescan.
                timeout = max(self._rescan_seconds - (time.monotonic() - rescanned), 0.0) if idle else tick
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(woken.wait(), timeout=timeout)
        finally:
            stopper.cancel()
            observer.stop()
            await asyncio.to_thread(observer.join, 5)

    def _roots_changed(self) -> bool:
        """Whether a watched directory's modification time differs from its last listing's."""
        for root in self._dirs:
            try:
                if self._listed_mtime.get(root) != root.stat().st_mtime_ns:
                    return True
            except OSError:
                continue
        return False

    def _rescan(self, known: set[Path]) -> None:
        """List the watched directories again: events can be lost (the kernel's inotify queue
        overflows when thousands of folders arrive at once), and a folder nobody saw arrive, or
        leave, must not stay unseen. A directory whose modification time is the same as at its
        last listing had no folder added, removed or renamed: it is not listed again (at 10,000
        folders a listing costs about 20 ms, every 10 s)."""
        by_root: dict[Path, set[str]] | None = None
        for root in self._dirs:
            try:
                mtime = root.stat().st_mtime_ns
                if self._listed_mtime.get(root) == mtime:
                    continue
                names = os.listdir(root)
            except OSError:
                continue
            self._listed_mtime[root] = mtime
            if by_root is None:
                by_root = {}
                for path in known:
                    by_root.setdefault(path.parent, set()).add(path.name)
            seen = by_root.get(root, set())
            for name in set(names) - seen:
                if not name.startswith(".") and root / name not in self._warned:
                    self._mark(root, name)
            for name in seen - set(names):
                self._mark(root, name)

    async def _tick(self) -> None:
        now = time.monotonic()
        with self._lock:
            dirty, self._dirty = self._dirty, set()
        # In a fixed order, so that which of two folders gets a shared name never depends on timing.
        for root, child in sorted(dirty, key=self._rank):
            name = sanitize_model_name(child)
            path = root / child
            entry = self._entries.get(name)
            if entry is not None and entry.path != path:
                if entry.path.exists():
                    # Two folders map to one name (the same folder name in two watched
                    # directories): the first watched directory wins, on every start.
                    winner, loser = sorted((entry.path, path), key=lambda p: self._rank((p.parent, p.name)))
                    if loser not in self._warned:
                        self._warned.add(loser)
                        log.error(
                            "%s is not served: %s already serves as model %r (the first watched directory "
                            "wins); rename one of them",
                            loser,
                            winner,
                            name,
                        )
                    if winner == entry.path:
                        continue
                entry = None
            if entry is None:
                entry = self._entries[name] = _Entry(name=name, path=path, last_event=now)
            entry.last_event = now
            entry.pending = True
            self._pending[name] = entry
        # Only entries with something to look at: an idle tick over 10,000 folders costs nothing.
        pending = [entry for entry in self._pending.values() if entry.pending]
        self._pending = {entry.name: entry for entry in pending}
        if len(pending) <= 1:
            for entry in pending:
                await self._consider(entry, now)
            return
        # Thousands of folders at start-up: look at them and hand them over side by side (each
        # is a directory walk and a Temporal call), not one after the other.
        gate = asyncio.Semaphore(HANDOVER_CONCURRENCY)

        async def consider(entry: _Entry) -> None:
            async with gate:
                await self._consider(entry, now)

        await asyncio.gather(*(consider(entry) for entry in pending))
        self._pending = {name: entry for name, entry in self._pending.items() if entry.pending}

    async def _consider(self, entry: _Entry, now: float) -> None:
        path = entry.path
        if not path.exists():
            entry.pending = False
            self._entries.pop(entry.name, None)
            if entry.emitted_fingerprint is not None:
                log.info("model directory %s removed", path)
                await self._safe(self._on_removed(entry.name), entry, "removal")
            return
        if path.name.startswith(".") or not path.is_dir():
            if not path.name.startswith(".") and path not in self._warned:
                self._warned.add(path)
                log.warning("ignoring %s: each model must be a directory", path)
            entry.pending = False
            self._entries.pop(entry.name, None)
            return
        if now - entry.last_event < self._settle:
            entry.seen_fingerprint = None
            return
        fp, files, partial, newest = await asyncio.to_thread(_scan, path)
        # Files untouched for the settle period already (a folder found at start-up) need no
        # second look; otherwise look once more, and hand over only if nothing changed.
        quiet = entry.seen_fingerprint is None and time.time() - newest >= self._settle
        if fp != entry.seen_fingerprint and not quiet:
            entry.seen_fingerprint = fp
            return
        if files == 0 or fp == entry.emitted_fingerprint:
            entry.pending = False
            return
        if partial:
            # A copy tool is still writing; its final rename marks the directory again.
            entry.pending = False
            return
        log.info("model directory %s settled (%d files); handing over as %r", path, files, entry.name)
        if await self._safe(self._on_ready(ModelSource(entry.name, str(path), fp)), entry, "start"):
            entry.emitted_fingerprint = fp
            entry.pending = False

    async def _safe(self, call: Awaitable[None], entry: _Entry, what: str) -> bool:
        try:
            await call
            return True
        except Exception:
            # Temporal may be unreachable for a moment: keep the entry and try on the next tick.
            log.exception("could not hand over %s of %s; will try again", what, entry.name)
            entry.seen_fingerprint = None
            if what == "removal":
                with self._lock:
                    self._dirty.add((entry.path.parent, entry.path.name))
                self._entries.setdefault(entry.name, entry)
            return False
