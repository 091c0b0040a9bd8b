"""Events the hub derives from two listings of the fleet (what `GET /events` sends), for the
transitions that are hard to time in a live test: a new version's steps, switch and failure."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from api.events import EventHub
from modelium.types import ModelState, NodeInventory, Phase


async def _none() -> list[Any]:
    return []


def hub() -> EventHub:
    async def nodes() -> list[NodeInventory]:
        return []

    return EventHub(_none, nodes)


def kinds(h: EventHub) -> list[tuple[str, dict[str, Any]]]:
    return [(e.kind, e.data) for e in h._ring]


def test_update_steps_switch_failure_and_its_end() -> None:
    h = hub()
    loaded = ModelState(name="m", path="/m", fingerprint="a", phase=Phase.LOADED, updated_at=1.0)
    h.models_changed([loaded])  # the baseline: no events
    steps = [
        replace(loaded, update_state="analyzing"),
        replace(loaded, update_state="loading_beside"),
        replace(loaded, update_state="draining", fingerprint="b", switched_at=5.0),
        replace(loaded, update_state=None, fingerprint="b", switched_at=5.0),
        replace(
            loaded,
            update_state="update_failed",
            update_error="analyze failed: truncated",
            fingerprint="b",
            switched_at=5.0,
        ),
        replace(loaded, update_state=None, fingerprint="b", switched_at=5.0),
    ]
    for state in steps:
        h.models_changed([state])
    events = kinds(h)
    assert [k for k, _ in events] == ["update"] * 6  # the phase stayed loaded: no phase event
    assert [d["state"] for _, d in events] == [
        "analyzing",
        "loading_beside",
        "draining",
        "done",
        "update_failed",
        "done",
    ]
    assert events[4][1]["error"] == "analyze failed: truncated" and events[2][1]["fingerprint"] == "b"
    # Unchanged: nothing more.
    h.models_changed([steps[-1]])
    assert len(kinds(h)) == 6


def test_a_switch_seen_in_one_listing_is_one_switched_event() -> None:
    h = hub()
    loaded = ModelState(name="m", path="/m", fingerprint="a", phase=Phase.LOADED, updated_at=1.0)
    h.models_changed([loaded])
    h.models_changed([replace(loaded, fingerprint="b", switched_at=9.0)])
    assert [(k, d["state"]) for k, d in kinds(h)] == [("update", "switched")]
