"""The summary a model workflow keeps in its memo reads back as the same ModelState through the
fast path the listing uses as through Temporal's data converter; the gateway's index of those
summaries reads the fleet once, then only what changed."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.client import WorkflowHandle
from temporalio.converter import DataConverter
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from api.registry import FleetIndex
from modelium.names import workflow_id
from modelium.types import Booking, Decision, Endpoint, Eviction, ModelState
from tests.helpers import wait_for
from workers.temporal_server import temporal_binary
from workflows.contracts import SEARCH_ATTRIBUTES, STATE_MEMO, UPDATED_KEY, WORKFLOW_TYPE, state_from_json


async def test_fast_summary_decoding_matches_the_data_converter() -> None:
    state = ModelState(
        name="m",
        path="/models/m",
        fingerprint="f",
        phase="loaded",
        runtime="embedded",
        node="n1",
        device="cpu",
        endpoint=Endpoint("http://127.0.0.1:9", "openai", "embedded", "n1", 42),
        decision=Decision(
            "embedded",
            "n1",
            "cpu",
            "fits",
            memory_bytes=5,
            evict=[Eviction("old", "n1", "cpu", 3, 0.5, "idle 60s", 7)],
            no_room=None,
        ),
        booking=Booking("m", "n1", "cpu", 5, []),
        requests_by_organization={"acme": 3},
        pinned=True,
        rest_reason=None,
        demanded_at=12.5,
        peak_memory_bytes=9,
    )
    [payload] = await DataConverter.default.encode([state])
    assert payload.metadata["encoding"] == b"json/plain"
    [slow] = await DataConverter.default.decode([payload], [ModelState])
    fast = state_from_json(json.loads(payload.data))
    assert fast == slow == state


def test_fields_written_by_a_newer_version_are_skipped() -> None:
    data = {
        "name": "m",
        "path": "",
        "phase": "unloaded",
        "colour": "red",
        "booking": {"model": "m", "node": "n", "device": "cpu", "bytes": 1, "shard": 2},
    }
    state = state_from_json(data)
    assert state.name == "m" and state.booking == Booking("m", "n", "cpu", 1)


@workflow.defn(name=WORKFLOW_TYPE, sandboxed=False)  # the test module imports the gateway
class SummaryWriter:
    """Writes a summary the way ModelLifecycle does (memo and its time), on start and on each
    `phase` signal, and ends once `removed`; `again` continues it as new. It stands in for ModelLifecycle so that the
    test controls exactly which summaries change: under test is the gateway's index."""

    def __init__(self) -> None:
        self._phase: str | None = None
        self._again = False

    @workflow.run
    async def run(self, name: str, phase: str) -> None:
        self._write(name, phase)
        while True:
            await workflow.wait_condition(lambda: self._again or self._phase is not None)
            if self._again:
                workflow.continue_as_new(args=[name, "unloaded"])
            assert self._phase is not None
            self._write(name, self._phase)
            if self._phase == "removed":
                return  # as ModelLifecycle ends once removed
            self._phase = None

    def _write(self, name: str, phase: str) -> None:
        state = ModelState(name=name, path=f"/models/{name}", phase=phase, updated_at=workflow.now().timestamp())
        workflow.upsert_memo({STATE_MEMO: state})
        workflow.upsert_search_attributes([UPDATED_KEY.value_set(workflow.now())])

    @workflow.signal
    def phase(self, phase: str) -> None:
        self._phase = phase

    @workflow.signal
    def again(self) -> None:
        self._again = True


async def test_fleet_index_reads_everything_once_then_only_changes() -> None:
    """Real Temporal (its own dev server, so that the counts are this test's alone) and its
    visibility store; FleetIndex as the gateway runs it, with an overlap of 1 s (60 s in the
    gateway) so that the fleet is older than the overlap after a short wait."""
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=temporal_binary(), search_attributes=SEARCH_ATTRIBUTES, ui=False
    )
    try:
        client = env.client
        names = [f"m{i:02d}" for i in range(12)]

        async def start(name: str) -> WorkflowHandle[Any, Any]:
            return await client.start_workflow(
                SummaryWriter.run, args=[name, "unloaded"], id=workflow_id(name), task_queue="summaries"
            )

        async def listed_by(fleet: FleetIndex) -> dict[str, str]:
            return {s.name: s.phase for s in await fleet.states()}

        async def in_store(expected: dict[str, str]) -> None:
            async def probe() -> bool:
                return await listed_by(FleetIndex(client)) == expected  # a full read each time

            await wait_for(probe, what=f"the store to list {expected}")

        async with Worker(client, task_queue="summaries", workflows=[SummaryWriter]):
            handles = {n: await start(n) for n in names[:11]}
            await in_store({n: "unloaded" for n in names[:11]})
            # The first 11 summaries become older than the overlap; the 12th is the latest.
            await asyncio.sleep(1.2)
            handles["m11"] = await start("m11")
            await in_store({n: "unloaded" for n in names})

            fleet = FleetIndex(client, overlap=timedelta(seconds=1))
            assert await listed_by(fleet) == {n: "unloaded" for n in names}
            assert fleet.last_read == 12, "the first listing reads every summary"
            assert await listed_by(fleet) == {n: "unloaded" for n in names}
            assert fleet.last_read == 1, f"listing an unchanged fleet read {fleet.last_read} runs, not the latest"
            # Once the latest write is older than the overlap, a listing that starts then reads
            # everything written before: the one after it reads nothing.
            await asyncio.sleep(1.1)
            assert await listed_by(fleet) == {n: "unloaded" for n in names}
            assert await listed_by(fleet) == {n: "unloaded" for n in names}
            assert fleet.last_read == 0, f"listing a fleet at rest read {fleet.last_read} runs"

            # One summary changes, one model is removed (its workflow ends), one is added, and
            # one continues as new.
            await handles["m03"].signal(SummaryWriter.phase, "loaded")
            await handles["m05"].signal(SummaryWriter.phase, "removed")
            handles["m12"] = await start("m12")
            await handles["m07"].signal(SummaryWriter.again)
            expected = {n: "unloaded" for n in names if n != "m05"} | {"m03": "loaded", "m12": "unloaded"}
            await in_store(expected)
            assert await listed_by(fleet) == expected
            # The latest of before (m11), the changed, the removed, the added, the new run of m07.
            assert fleet.last_read <= 5, f"listing the changes read {fleet.last_read} runs"

            # A workflow terminated by hand writes no summary: the next full read drops it.
            await handles["m09"].terminate("by hand")
            del expected["m09"]
            await in_store(expected)
            for name, handle in handles.items():
                if name not in ("m05", "m09"):
                    await client.get_workflow_handle(handle.id).terminate("test over")
    finally:
        await env.shutdown()
