"""The gateway's recent-request ring behind `GET /stats/requests` and the dashboard's charts."""

from __future__ import annotations

import time

from api.auth import OPEN_ACCESS, Principal
from api.recent import RecentRequests


def test_per_second_requests_and_median_latency_of_the_answered() -> None:
    ring = RecentRequests()
    now = time.time()
    for ms in (10, 30, 20):
        ring.add("a", "acme", 200, ms / 1000, at=now)
    ring.add("a", "acme", 503, 0.5, at=now)  # counted as a request and an error, not in p50
    ring.add("a", "acme", 200, 0.040, at=now - 3)
    ring.add("b", "acme", 200, 0.001, at=now)
    start, series = ring.series(OPEN_ACCESS, seconds=10)
    assert start == int(now) - 9
    a = series["a"]
    assert len(a["requests"]) == 10 and a["requests"][-1] == 4 and a["requests"][-4] == 1
    assert a["p50_ms"][-1] == 20.0 and a["p50_ms"][-4] == 40.0 and a["p50_ms"][0] is None
    assert a["total"] == 5 and a["errors"] == 1 and a["p50_ms_window"] == 25.0
    # The busiest first, at most `top`; or just the models asked for.
    assert list(series) == ["a", "b"]
    assert list(ring.series(OPEN_ACCESS, seconds=10, top=1)[1]) == ["a"]
    assert list(ring.series(OPEN_ACCESS, seconds=10, models=frozenset({"b"}))[1]) == ["b"]


def test_window_age_and_size_bounds() -> None:
    ring = RecentRequests(keep_seconds=60, max_entries=3)
    now = time.time()
    ring.add("old", "acme", 200, 0.01, at=now - 120)
    assert ring.series(OPEN_ACCESS, seconds=60)[1] == {}  # older than kept: gone
    ring.add("a", "acme", 200, 0.01, at=now - 30)
    ring.add("a", "acme", 200, 0.01, at=now)
    assert ring.series(OPEN_ACCESS, seconds=60)[1]["a"]["total"] == 2
    assert ring.series(OPEN_ACCESS, seconds=10)[1]["a"]["total"] == 1  # only the window asked for
    for _ in range(5):
        ring.add("a", "acme", 200, 0.01, at=now)
    assert ring.series(OPEN_ACCESS, seconds=60)[1]["a"]["total"] == 3  # at most max_entries


def test_a_key_sees_its_own_organization_and_models() -> None:
    ring = RecentRequests()
    now = time.time()
    ring.add("mine-1", "beta", 200, 0.01, at=now)
    ring.add("mine-1", "acme", 200, 0.01, at=now)
    ring.add("other", "beta", 200, 0.01, at=now)
    team = Principal("team", "beta", admin=False, models=("mine-*",))
    assert {m: s["total"] for m, s in ring.series(team, seconds=10)[1].items()} == {"mine-1": 1}
    admin = Principal("ops", "acme", admin=True)
    assert {m: s["total"] for m, s in ring.series(admin, seconds=10)[1].items()} == {"mine-1": 2, "other": 1}
