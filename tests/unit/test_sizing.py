"""The control worker is sized from the number of models it serves."""

from __future__ import annotations

from workers.control import MAX_AUTO_CACHE, sized_for


def test_worker_sizes_follow_the_number_of_models() -> None:
    small, thousand, fleet = sized_for(5), sized_for(1000), sized_for(10_000)
    assert small.max_cached_workflows == 1000  # the SDK's default is enough
    # Every model's workflow fits the cache, with room to grow, up to a bound on memory.
    assert thousand.max_cached_workflows >= 1200
    assert fleet.max_cached_workflows == MAX_AUTO_CACHE
    assert sized_for(10_000, max_cached=20_000).max_cached_workflows == 20_000
    assert fleet.max_concurrent_workflow_tasks > small.max_concurrent_workflow_tasks
    assert fleet.max_concurrent_activities > small.max_concurrent_activities
    assert all(s.sticky_queue_schedule_to_start_timeout.total_seconds() == 2 for s in (small, thousand, fleet))
