"""The summary a model workflow keeps in its memo reads back as the same ModelState through the
fast path the listing uses as through Temporal's data converter."""

from __future__ import annotations

import json

from temporalio.converter import DataConverter

from modelium.types import Booking, Decision, Endpoint, Eviction, ModelState
from workflows.contracts import state_from_json


async def test_fast_summary_decoding_matches_the_data_converter() -> None:
    state = ModelState(
        name="m", path="/models/m", fingerprint="f", phase="loaded", runtime="embedded", node="n1", device="cpu",
        endpoint=Endpoint("http://127.0.0.1:9", "openai", "embedded", "n1", 42),
        decision=Decision("embedded", "n1", "cpu", "fits", memory_bytes=5,
                          evict=[Eviction("old", "n1", "cpu", 3, 0.5, "idle 60s", 7)], no_room=None),
        booking=Booking("m", "n1", "cpu", 5, []), requests_by_organization={"acme": 3}, pinned=True,
        rest_reason=None, demanded_at=12.5, peak_memory_bytes=9,
    )  # fmt: skip
    [payload] = await DataConverter.default.encode([state])
    assert payload.metadata["encoding"] == b"json/plain"
    [slow] = await DataConverter.default.decode([payload], [ModelState])
    fast = state_from_json(json.loads(payload.data))
    assert fast == slow == state


def test_fields_written_by_a_newer_version_are_skipped() -> None:
    data = {"name": "m", "path": "", "phase": "unloaded", "colour": "red",
            "booking": {"model": "m", "node": "n", "device": "cpu", "bytes": 1, "shard": 2}}  # fmt: skip
    state = state_from_json(data)
    assert state.name == "m" and state.booking == Booking("m", "n", "cpu", 1)
