"""The requests this gateway answered lately, kept in memory for the dashboard's charts.

Every answered request is one entry (time, model, organization, status, latency) in a ring
bounded both by age (`keep_seconds`) and by count (`max_entries`, so that a burst cannot grow
it without bound). `series` turns one window of it into per-second buckets per model: requests
a second and the median latency of those answered with 200. Prometheus has the long history;
this is the last few minutes, with no scrape and no query language.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from api.auth import Principal

KEEP_SECONDS = 600


@dataclass(frozen=True, slots=True)
class Answered:
    at: float
    model: str
    organization: str
    status: int
    latency_ms: float


class RecentRequests:
    def __init__(self, keep_seconds: float = KEEP_SECONDS, max_entries: int = 200_000) -> None:
        self._keep = keep_seconds
        self._ring: deque[Answered] = deque(maxlen=max_entries)

    @property
    def keep_seconds(self) -> float:
        return self._keep

    def add(self, model: str, organization: str, status: int, seconds: float, *, at: float | None = None) -> None:
        self._ring.append(Answered(time.time() if at is None else at, model, organization, status, seconds * 1000))
        self._trim(time.time())

    def _trim(self, now: float) -> None:
        horizon = now - self._keep
        while self._ring and self._ring[0].at < horizon:
            self._ring.popleft()

    def series(
        self, principal: Principal, *, seconds: int, models: frozenset[str] = frozenset(), top: int = 12
    ) -> tuple[int, dict[str, dict[str, Any]]]:
        """The last `seconds` in one-second buckets, for the `top` models with the most requests
        in the window (or just `models`). A key without the admin scope sees its own
        organization's requests of the models it may use."""
        now = time.time()
        self._trim(now)
        end = int(now)
        start = end - seconds + 1
        per_model: dict[str, list[list[float]]] = {}
        counts: dict[str, list[int]] = {}
        errors: dict[str, int] = {}
        for entry in reversed(self._ring):
            if entry.at < start:
                break
            if models and entry.model not in models:
                continue
            if not principal.admin and entry.organization != principal.organization:
                continue
            if not principal.may_use(entry.model):
                continue
            slot = min(int(entry.at) - start, seconds - 1)
            if entry.model not in counts:
                counts[entry.model] = [0] * seconds
                per_model[entry.model] = [[] for _ in range(seconds)]
                errors[entry.model] = 0
            counts[entry.model][slot] += 1
            if entry.status == 200:
                per_model[entry.model][slot].append(entry.latency_ms)
            else:
                errors[entry.model] += 1
        ranked = sorted(counts, key=lambda m: (-sum(counts[m]), m))[:top]
        out: dict[str, dict[str, Any]] = {}
        for model in ranked:
            latencies = [ms for bucket in per_model[model] for ms in bucket]
            out[model] = {
                "requests": counts[model],
                "p50_ms": [round(statistics.median(b), 2) if b else None for b in per_model[model]],
                "total": sum(counts[model]),
                "errors": errors[model],
                "p50_ms_window": round(statistics.median(latencies), 2) if latencies else None,
            }
        return start, out
