"""`GET /events` read by a raw SSE client: a model's phases in order as it loads and unloads, its
booking and release, load progress, requests; resuming with Last-Event-ID; a gap when the ring no
longer holds what was asked for; API keys see only their models and their organization's
requests. Real parts: Temporal dev server, `serve`'s composition, embedded runtimes."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from temporalio.testing import WorkflowEnvironment

from modelium.keys import digest, new_key
from tests.helpers import copy_model, make_settings, modelium_http, unique, wait_for, wait_phase

pytestmark = pytest.mark.slow

ADMIN_KEY, SCOPED_KEY = new_key(), new_key()
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
SCOPED = {"Authorization": f"Bearer {SCOPED_KEY}"}


class Listener:
    """An SSE client: every event of one connection, parsed, in the order received."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.comments: list[str] = []

    async def read(self, http: httpx.AsyncClient, path: str, headers: dict[str, str]) -> None:
        async with http.stream("GET", path, headers=headers, timeout=None) as response:
            assert response.status_code == 200, await response.aread()
            assert response.headers["content-type"].startswith("text/event-stream")
            fields: dict[str, str] = {}
            async for line in response.aiter_lines():
                if line.startswith(":"):
                    self.comments.append(line[1:].strip())
                elif line == "":
                    if fields:
                        event = json.loads(fields["data"])
                        assert fields["event"] == event["kind"] and int(fields["id"]) == event["id"]
                        self.events.append(event)
                    fields = {}
                else:
                    key, _, value = line.partition(": ")
                    fields[key] = value

    def of(self, model: str | None = None, kind: str | None = None) -> list[dict[str, Any]]:
        return [
            e for e in self.events if (model is None or e["model"] == model) and (kind is None or e["kind"] == kind)
        ]

    def phases(self, model: str) -> list[str]:
        return [e["phase"] for e in self.of(model, "phase")]


@contextlib.asynccontextmanager
async def listening(http: httpx.AsyncClient, path: str, headers: dict[str, str]) -> AsyncIterator[Listener]:
    listener = Listener()
    task = asyncio.create_task(listener.read(http, path, headers))
    await wait_for(lambda: listener.comments or task.done(), timeout=30, what=f"{path} connected")
    try:
        yield listener
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]


async def test_events_in_order_resumable_and_scoped(
    temporal_env: WorkflowEnvironment, demo_models: dict[str, Path], tmp_path: Path
) -> None:
    keys = [
        {"name": "ops", "organization": "acme", "sha256": digest(ADMIN_KEY), "scopes": ["admin"]},
        {"name": "team", "organization": "beta", "sha256": digest(SCOPED_KEY), "models": ["mine-*"]},
    ]
    settings = make_settings(tmp_path, gateway={"port": 0, "api_keys": keys, "events_ring_size": 12})
    mine, theirs = unique("mine"), unique("theirs")
    incoming = settings.watch_directories[0]
    async with modelium_http(settings, temporal_env.client) as (running, http):
        # Bad filters are named.
        bad = await http.get("/events?kind=phase,nonsense", headers=ADMIN)
        assert bad.status_code == 400 and "nonsense" in bad.json()["error"]["message"]
        bad = await http.get("/events", headers={**ADMIN, "Last-Event-ID": "yesterday"})
        assert bad.status_code == 400 and "Last-Event-ID" in bad.json()["error"]["message"]
        assert (await http.get("/events")).status_code == 401
        # HEAD answers with the stream's headers and ends (the GET behind it would not).
        head = await http.head("/events", headers=ADMIN)
        assert head.status_code == 200 and head.headers["content-type"].startswith("text/event-stream")

        async with (
            listening(http, "/events", ADMIN) as admin,
            listening(http, "/events", SCOPED) as scoped,
            listening(http, f"/events?model={mine}&kind=phase", ADMIN) as filtered,
        ):
            copy_model(demo_models["text-generation"], incoming / mine)
            copy_model(demo_models["text-generation"], incoming / theirs)
            for name in (mine, theirs):
                await wait_phase(http, name, "loaded", headers=ADMIN)
            await wait_for(lambda: "loaded" in admin.phases(mine) and "loaded" in admin.phases(theirs), 30)
            # Phases in the order they happened, ending loaded, each with the one before it.
            for name in (mine, theirs):
                phases = admin.of(name, "phase")
                assert phases[-1]["phase"] == "loaded" and phases[-1]["load_seconds"] > 0, phases
                assert [p["previous"] for p in phases[1:]] == [p["phase"] for p in phases[:-1]]
                # Booked at the estimate, then (when the warmed model measured more) at what it holds.
                booking = admin.of(name, "booking")[-1]
                assert booking["node"] == settings.node.id and booking["devices"] == ["cpu"] and booking["bytes"] > 0
            ids = [e["id"] for e in admin.events]
            assert ids == sorted(ids) and len(set(ids)) == len(ids)
            assert admin.of(kind="node"), "no node announcement"

            body = {"model": mine, "prompt": "Hi", "max_tokens": 2}
            assert (await http.post("/v1/completions", json=body, headers=SCOPED)).status_code == 200
            body = {"model": theirs, "prompt": "Hi", "max_tokens": 2}
            assert (await http.post("/v1/completions", json=body, headers=ADMIN)).status_code == 200
            await wait_for(lambda: len(admin.of(kind="request")) >= 2 and scoped.of(kind="request"), 30)
            [request] = scoped.of(kind="request")
            assert request["model"] == mine and request["organization"] == "beta" and request["status"] == 200
            assert request["latency_ms"] > 0
            assert {r["organization"] for r in admin.of(kind="request")} == {"acme", "beta"}

            # The scoped key never hears of the model it may not use; the filter holds.
            assert scoped.of(mine, "phase") and not scoped.of(theirs)
            assert {e["model"] for e in filtered.events} == {mine} and {e["kind"] for e in filtered.events} == {"phase"}
            seen = admin.events[-1]["id"]

        # Gone: the model is unloaded meanwhile; resuming after the last event seen gets the rest.
        unloaded = await http.post(f"/models/{mine}/unload", json={"wait": True}, headers=ADMIN)
        assert unloaded.status_code == 200, unloaded.text
        await wait_for(lambda: _released(running.node, mine), 30, what="the booking released")
        async with listening(http, f"/events?model={mine}", {**ADMIN, "Last-Event-ID": str(seen)}) as resumed:
            await wait_for(lambda: "unloaded" in resumed.phases(mine), 30, what="the missed unload")
            assert all(e["id"] > seen for e in resumed.events)
            assert resumed.of(mine, "release")[0]["node"] == settings.node.id
            assert resumed.phases(mine)[-1] == "unloaded"

        # The ring keeps 12 events: resuming from the first one is told what is gone.
        async with listening(http, "/events?after=1", ADMIN) as late:
            await wait_for(lambda: late.of(kind="gap"), 30, what="a gap event")
            assert late.events[0]["kind"] == "gap" and late.events[0]["missed_from"] == 2


def _released(node: Any, model: str) -> bool:
    return node is not None and node.ledger.get(model) is None
