"""The placement ledger of one node: how much memory each model has booked on each device.

Bookings are kept in a JSON file under the node's state directory, written atomically, so they
survive a restart of the node agent. A booking never takes a device past its capacity, and booking
the same model twice returns the first booking (a retried activity must not book twice).

Every change is also appended to a journal beside it (`<name>.journal.jsonl`, one JSON object per
line: time, operation, model, bytes, devices, and each device's booked total after the change),
so "what held this GPU at 14:02, and was it ever over-booked" has an answer. The journal is
rotated to `.1` past `JOURNAL_MAX_BYTES`.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from modelium.types import Booking


class InsufficientCapacity(RuntimeError):
    """The device has not enough unbooked memory for this booking."""


JOURNAL_MAX_BYTES = 16 * 2**20


class Ledger:
    def __init__(self, path: Path, node: str, capacities: dict[str, int]) -> None:
        self._path = path
        self.journal_path = path.with_name(path.stem + ".journal.jsonl")
        self._node = node
        self._capacities = dict(capacities)
        self._lock = threading.Lock()
        self._bookings: dict[str, Booking] = {}
        if path.is_file():
            raw = json.loads(path.read_text(encoding="utf-8"))
            self._bookings = {m: Booking(**b) for m, b in raw.get("bookings", {}).items()}

    @property
    def capacities(self) -> dict[str, int]:
        return dict(self._capacities)

    def booked(self, device: str) -> int:
        with self._lock:
            return self._booked_locked(device)

    def _booked_locked(self, device: str) -> int:
        return sum(b.bytes for b in self._bookings.values() if device in b.all_devices)

    def bookings(self) -> list[Booking]:
        with self._lock:
            return list(self._bookings.values())

    def get(self, model: str) -> Booking | None:
        with self._lock:
            return self._bookings.get(model)

    def reserve(self, model: str, device: str, nbytes: int, devices: list[str] | None = None) -> Booking:
        """Book `nbytes` on `device` (or on each of `devices`, tensor parallel), all or nothing."""
        wanted = list(devices) if devices else [device]
        with self._lock:
            existing = self._bookings.get(model)
            if existing is not None and existing.all_devices == wanted and existing.bytes == nbytes:
                return existing
            for dev in wanted:
                if dev not in self._capacities:
                    raise InsufficientCapacity(
                        f"node {self._node} has no device {dev!r} (devices: {', '.join(self._capacities)})"
                    )
                mine = existing.bytes if existing and dev in existing.all_devices else 0
                others = self._booked_locked(dev) - mine
                capacity = self._capacities[dev]
                if others + nbytes > capacity:
                    raise InsufficientCapacity(
                        f"{model} needs {nbytes / 2**20:.0f} MiB on {self._node}/{dev}, but only "
                        f"{(capacity - others) / 2**20:.0f} MiB of {capacity / 2**20:.0f} MiB is free"
                    )
            booking = Booking(
                model=model, node=self._node, device=wanted[0], bytes=nbytes, devices=wanted if len(wanted) > 1 else []
            )
            self._bookings[model] = booking
            self._save_locked()
            self._journal_locked("reserve", booking)
            return booking

    def resize(self, model: str, nbytes: int) -> tuple[Booking | None, list[str]]:
        """Set a booking to what its model really holds (its measured peak outgrew the booking).
        Unlike `reserve` this never refuses: the memory is taken already. Returns the booking
        and the devices now booked past their capacity (to be reported, never hidden)."""
        with self._lock:
            booking = self._bookings.get(model)
            if booking is None:
                return None, []
            booking.bytes = nbytes
            self._save_locked()
            self._journal_locked("resize", booking)
            over = [d for d in booking.all_devices if self._booked_locked(d) > self._capacities.get(d, 0)]
            return booking, over

    def release(self, model: str) -> Booking | None:
        with self._lock:
            booking = self._bookings.pop(model, None)
            if booking is not None:
                self._save_locked()
                self._journal_locked("release", booking)
            return booking

    def journal(self) -> list[dict[str, Any]]:
        """Every change recorded since the journal was last rotated, oldest first."""
        with self._lock:
            try:
                text = self.journal_path.read_text(encoding="utf-8")
            except FileNotFoundError:
                return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def _journal_locked(self, op: str, booking: Booking) -> None:
        entry = {
            "at": time.time(),
            "op": op,
            "model": booking.model,
            "bytes": booking.bytes,
            "devices": booking.all_devices,
            "booked": {dev: self._booked_locked(dev) for dev in self._capacities},
            "capacity": self._capacities,
        }
        try:
            if self.journal_path.stat().st_size > JOURNAL_MAX_BYTES:
                os.replace(self.journal_path, self.journal_path.with_name(self.journal_path.name + ".1"))
        except FileNotFoundError:
            pass
        with self.journal_path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry, separators=(",", ":")) + "\n")

    def _save_locked(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._path.with_suffix(".tmp")
        data = {"node": self._node, "bookings": {m: asdict(b) for m, b in self._bookings.items()}}
        tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
        os.replace(tmp, self._path)


def system_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
