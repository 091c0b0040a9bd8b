"""Records the workflow histories that tests/workflows/test_replay.py replays.

Run it whenever `workflows/` changes in a way that takes a new path (a new `workflow.patched`
branch, a new signal, update or activity), and commit the new files with the change:

    .venv/bin/python -m tests.workflows.histories.record

Each scenario runs the real workers and embedded runtime against a fresh Temporal dev server and
writes one history per workflow it drives. Histories recorded by earlier versions are kept (they
prove that workflows started by those versions still replay); a scenario overwrites only its own
files. The node has room for one demo model, so that placement has to choose.

- lifecycle-v2: preloaded into free room, used, idle-unloaded (a per-model idle timeout set
  through a load signal), loaded again by a request's update with a demand id, unloaded by an
  update, removed.
- failed-then-retried-v2: a broken directory fails without retries; fixed and retried, it loads.
- evicted / evictor: a second model does not fit and rests ("not preloaded"); a request for it
  evicts the idle first one.
- waited / holder: the holder is pinned, so a request for the waiter waits for capacity; the
  holder's unload releases its booking and wakes the waiter, which loads.
- restarted: the runtime process is killed; the node agent reports it, and the workflow restarts
  it after its backoff.
- node: the node's registry workflow through all of the above (announcements, bookings).
- updated: on a node with room for two, new files while loaded: the new version loaded beside,
  checked, switched to, the old one drained and stopped; then a broken new version (truncated
  weights) that leaves the serving one and shows update_failed; the serving files put back.
- rolled-back: numbered versions 1/ and 2/ (2 serves); 3/ added and switched to; rolled back to
  2 by the `rollback` update; the folder's files signalled again (held off); 4/ added.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from temporalio.client import Client, WorkflowHandle
from temporalio.testing import WorkflowEnvironment

from activities.control import RegistryNodes
from cli.demo import write_demo_model
from modelium.analyzer import analyze_directory
from modelium.names import node_workflow_id, workflow_id
from modelium.runtimes.process import free_port
from modelium.types import ModelSource, ModelState, Phase
from modelium.watcher import fingerprint
from tests.helpers import ROOT, make_settings, running_modelium, wait_for
from tests.standins.gpus import GpusFreedWhileAsleep
from workers.temporal_server import temporal_binary
from workers.watch import WorkflowBridge
from workflows.contracts import (
    SEARCH_ATTRIBUTES,
    EnsureLoadedRequest,
    EnsureUnloadedRequest,
    LoadCommand,
    RemoveCommand,
    RetryRequest,
    RollbackRequest,
    UsageReport,
    listed_inventory,
    running_nodes_query,
)
from workflows.lifecycle import ModelLifecycleWorkflow

HERE = Path(__file__).parent


async def _state(handle: WorkflowHandle) -> ModelState:
    return await handle.query(ModelLifecycleWorkflow.state)  # type: ignore[no-any-return]


async def _until(handle: WorkflowHandle, phase: str, timeout: float, what: str, *, rested: bool = False) -> None:
    """Poll the workflow until it is in `phase` (and resting with a reason, with `rested`)."""
    state = None

    async def reached() -> bool:
        nonlocal state
        state = await _state(handle)
        return state.phase == phase and (not rested or state.rest_reason is not None)

    try:
        await wait_for(reached, timeout, what=what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; its state: {state}") from None


class Recorder:
    def __init__(self, client: Client, bridge: WorkflowBridge, models: Path, node: str) -> None:
        self.client, self.bridge, self.models, self.node = client, bridge, models, node

    async def node_free(self) -> None:
        """Until the node has announced that nothing is booked, and placement's cached view of
        the nodes (`RegistryNodes.FRESH_SECONDS`) is newer than that: a scenario's preload needs the
        room the last one gave back."""

        async def announced_free() -> float | None:
            async for execution in self.client.list_workflows(running_nodes_query()):
                inventory = await listed_inventory(execution)
                if inventory is not None and inventory.node == self.node:
                    if all(d.booked_bytes == 0 for d in inventory.devices):
                        return inventory.announced_at
            return None

        announced = await wait_for(announced_free, 60, what=f"node {self.node} announcing no bookings")
        fresh = announced + RegistryNodes.FRESH_SECONDS + 0.5
        await wait_for(lambda: time.time() > fresh, 10, what="placement's view to refresh")

    async def discover(self, name: str, directory: Path) -> WorkflowHandle:
        await self.bridge.model_ready(ModelSource(name, str(directory), fingerprint(directory)[0]))
        return self.client.get_workflow_handle(workflow_id(name))

    async def remove_and_save(self, *pairs: tuple[WorkflowHandle, str]) -> None:
        for handle, _ in pairs:
            await handle.signal(ModelLifecycleWorkflow.remove, RemoveCommand())
        for handle, file in pairs:
            await handle.result()
            (HERE / f"{file}.json").write_text((await handle.fetch_history()).to_json())
            print(f"recorded {file}.json")


async def lifecycle(r: Recorder, good: Path) -> None:
    h = await r.discover("lifecycle", good)
    await _until(h, Phase.LOADED, 120, "preloaded")
    await h.signal(ModelLifecycleWorkflow.record_usage, UsageReport(5))
    await h.signal(ModelLifecycleWorkflow.load, LoadCommand("shorter idle timeout", idle_seconds=2))
    await _until(h, Phase.UNLOADED, 60, "idle unload")
    request = EnsureLoadedRequest("a request is waiting", wait_seconds=120, demand_id="gateway-1")
    state = await h.execute_update(ModelLifecycleWorkflow.ensure_loaded, request)
    assert state.phase == Phase.LOADED, state
    state = await h.execute_update(ModelLifecycleWorkflow.ensure_unloaded, EnsureUnloadedRequest("by the API"))
    assert state.phase == Phase.UNLOADED, state
    await r.remove_and_save((h, "lifecycle-v2"))


async def failed_then_retried(r: Recorder, good: Path) -> None:
    broken = r.models / "broken"
    shutil.copytree(good, broken)
    (broken / "config.json").unlink()
    h = await r.discover("broken", broken)
    await _until(h, Phase.FAILED, 60, "failed")
    shutil.copy2(good / "config.json", broken / "config.json")
    await h.signal(ModelLifecycleWorkflow.retry, RetryRequest())
    await _until(h, Phase.LOADED, 120, "loaded after retry")
    await r.remove_and_save((h, "failed-then-retried-v2"))


async def eviction(r: Recorder, good: Path) -> None:
    first = await r.discover("occupant", good)
    await _until(first, Phase.LOADED, 120, "occupant preloaded")
    second = await r.discover("newcomer", good)
    await _until(second, Phase.UNLOADED, 60, "newcomer resting, not preloaded", rested=True)
    request = EnsureLoadedRequest("a request is waiting", wait_seconds=120, demand_id="gateway-2")
    state = await second.execute_update(ModelLifecycleWorkflow.ensure_loaded, request)
    assert state.phase == Phase.LOADED, state
    await _until(first, Phase.UNLOADED, 60, "occupant evicted")
    await r.remove_and_save((first, "evicted"), (second, "evictor"))


async def waiting(r: Recorder, good: Path) -> None:
    holder = await r.discover("holder", good)
    await _until(holder, Phase.LOADED, 120, "holder preloaded")
    await holder.signal(ModelLifecycleWorkflow.load, LoadCommand("pinned", pin=True))
    waiter = await r.discover("waiter", good)
    await _until(waiter, Phase.UNLOADED, 60, "waiter resting", rested=True)
    request = EnsureLoadedRequest("a request is waiting", wait_seconds=300, demand_id="gateway-3")
    asked = asyncio.create_task(waiter.execute_update(ModelLifecycleWorkflow.ensure_loaded, request))
    await _until(waiter, Phase.WAITING_FOR_CAPACITY, 60, "waiter waiting for the pinned holder")
    await holder.execute_update(ModelLifecycleWorkflow.ensure_unloaded, EnsureUnloadedRequest("make room"))
    state = await asyncio.wait_for(asked, 120)
    assert state.phase == Phase.LOADED, state
    await r.remove_and_save((holder, "holder"), (waiter, "waited"))


async def restart(r: Recorder, good: Path) -> None:
    h = await r.discover("restarted", good)
    await _until(h, Phase.LOADED, 120, "loaded")
    before = await _state(h)
    assert before.endpoint is not None and before.endpoint.pid is not None
    os.kill(before.endpoint.pid, signal.SIGKILL)

    async def serving_again() -> bool:
        state = await _state(h)
        pid = state.endpoint.pid if state.endpoint else None
        return state.phase == Phase.LOADED and pid not in (None, before.endpoint.pid)  # type: ignore[union-attr]

    await wait_for(serving_again, 120, what="restarted after the crash")
    await r.remove_and_save((h, "restarted"))


async def updated(r: Recorder, good: Path) -> None:
    served = r.models / "updated"
    shutil.copytree(good, served)
    h = await r.discover("updated", served)
    await _until(h, Phase.LOADED, 120, "loaded")
    v2 = write_demo_model(r.models / "v2", seed=1, layers=3)
    for path in v2.iterdir():
        shutil.copy2(path, served / path.name)
    await r.discover("updated", served)  # the watcher's signal: new files

    async def switched() -> bool:
        state = await _state(h)
        return state.switched_at is not None and state.update_state is None

    await wait_for(switched, 120, what="switched to the new version")
    kept = r.models / "kept"
    shutil.copytree(served, kept)
    weights = served / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    await r.discover("updated", served)

    async def failed() -> bool:
        return (await _state(h)).update_state == "update_failed"

    await wait_for(failed, 120, what="update_failed")
    shutil.copy2(kept / "model.safetensors", weights)
    await r.discover("updated", served)  # the serving files back: update_failed cleared

    async def cleared() -> bool:
        return (await _state(h)).update_state is None

    await wait_for(cleared, 60, what="update_failed cleared")
    await r.remove_and_save((h, "updated"))


async def rolled_back(r: Recorder, good: Path) -> None:
    folder = r.models / "rolled-back"
    shutil.copytree(good, folder / "1")
    shutil.copytree(write_demo_model(r.models / "r-v2", seed=1, layers=3), folder / "2")
    h = await r.discover("rolled-back", folder)
    await _until(h, Phase.LOADED, 120, "loaded")

    async def serving(version: str, updates: int) -> bool:
        state = await _state(h)
        return state.version == version and state.update_count == updates and state.update_state is None

    shutil.copytree(write_demo_model(r.models / "r-v3", seed=2), folder / "3")
    await r.discover("rolled-back", folder)
    await wait_for(lambda: serving("3", 1), 120, what="version 3 serving")
    state = await h.execute_update(ModelLifecycleWorkflow.rollback, RollbackRequest("recorded"))
    assert state.version == "2", state
    await r.discover("rolled-back", folder)  # the files rolled back from: held off
    shutil.copytree(good, folder / "4")
    await r.discover("rolled-back", folder)
    await wait_for(lambda: serving("4", 3), 120, what="version 4 serving")
    await r.remove_and_save((h, "rolled-back"))


async def parked(r: Recorder, good: Path) -> None:
    """vLLM (its stand-in) parks when idle, a request wakes it, it parks again, then an unload."""
    h = await r.discover("parked", good)
    await _until(h, Phase.PARKED, 120, "parked when idle")
    request = EnsureLoadedRequest("a request is waiting", wait_seconds=120, demand_id="gateway-1")
    state = await h.execute_update(ModelLifecycleWorkflow.ensure_loaded, request)
    assert state.phase == Phase.LOADED, state
    await _until(h, Phase.PARKED, 60, "parked again")
    state = await h.execute_update(ModelLifecycleWorkflow.ensure_unloaded, EnsureUnloadedRequest("by the API"))
    assert state.phase == Phase.UNLOADED, state
    await r.remove_and_save((h, "parked"))


async def fell_back(r: Recorder, good: Path) -> None:
    """No room beside it: a new numbered version is recreated, fails to load, and the version
    before it serves again (update_failed)."""
    folder = r.models / "fell-back"
    shutil.copytree(good, folder / "1")
    h = await r.discover("fell-back", folder)
    await _until(h, Phase.LOADED, 120, "version 1 loaded")
    broken = folder / "2"
    shutil.copytree(good, broken)
    config = json.loads((broken / "config.json").read_text())
    config["n_embd"] *= 2  # analyzed fine, refused by the load (the weights' shapes differ)
    (broken / "config.json").write_text(json.dumps(config))
    await r.discover("fell-back", folder)

    async def fell() -> bool:
        state = await _state(h)
        return state.phase == Phase.LOADED and state.update_state == "update_failed" and state.load_count == 2

    await wait_for(fell, 120, what="version 1 serving again")
    assert (await _state(h)).version == "1"
    await r.remove_and_save((h, "fell-back"))


SCENARIOS = (lifecycle, failed_then_retried, eviction, waiting, restart, fell_back)


async def main(only: list[str]) -> None:
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=temporal_binary(), search_attributes=SEARCH_ATTRIBUTES, ui=False
    )
    tmp = Path(tempfile.mkdtemp())
    try:
        good = write_demo_model(tmp / "good")
        booking = analyze_directory(good, "probe").memory_estimates["embedded"]
        settings = make_settings(
            tmp,
            node={
                "cpu_memory_budget_bytes": booking + booking // 2,
                "process_check_seconds": 0.5,
                "announce_seconds": 0.5,
            },
            orchestration={
                "policies": {"evict_after_idle_seconds": 3600, "restart_backoff_seconds": 1},
                "eviction": {"min_resident_seconds": 0, "min_idle_seconds": 0},
            },
        )
        async with running_modelium(settings, env.client, gateway=False, watch=False):
            r = Recorder(env.client, WorkflowBridge(env.client, settings), tmp, settings.node.id)
            for scenario in SCENARIOS:
                if not only or scenario.__name__ in only:
                    await r.node_free()
                    await scenario(r, good)
            if not only or "node" in only:
                # The node's registry workflow runs on; its history so far replays as well.
                node = env.client.get_workflow_handle(node_workflow_id(settings.node.id))
                (HERE / "node.json").write_text((await node.fetch_history()).to_json())
                print("recorded node.json")
        if not only or {"updated", "rolled_back"} & set(only):
            # A node with room for two versions side by side.
            roomy = make_settings(tmp / "roomy", node={"cpu_memory_budget_bytes": 4 * booking})
            async with running_modelium(roomy, env.client, gateway=False, watch=False):
                r = Recorder(env.client, WorkflowBridge(env.client, roomy), tmp, roomy.node.id)
                if not only or "updated" in only:
                    await updated(r, good)
                if not only or "rolled_back" in only:
                    await rolled_back(r, good)
        if not only or "parked" in only:
            # A node with a GPU (the NVML seam) and vLLM (its stand-in), idle models parked.
            record = tmp / "standin.jsonl"
            os.environ["MODELIUM_STANDIN_RECORD"] = str(record)
            first = free_port()
            gpu_node = make_settings(
                tmp / "gpu",
                vllm={
                    "enabled": True,
                    "command": [
                        sys.executable,
                        str(ROOT / "tests" / "standins" / "vllm_serve.py"),
                        "serve",
                        "{model_dir}",
                    ],
                    "port_range": [first, first + 10],
                },
                orchestration={"policies": {"evict_after_idle_seconds": 2}},
            )
            async with running_modelium(
                gpu_node, env.client, gateway=False, watch=False, gpu=GpusFreedWhileAsleep(record)
            ):
                r = Recorder(env.client, WorkflowBridge(env.client, gpu_node), tmp, gpu_node.node.id)
                await parked(r, good)
    finally:
        await env.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    # Scenario names (lifecycle, failed_then_retried, eviction, waiting, restart, node, updated,
    # rolled_back, parked, fell_back) record just those.
    asyncio.run(main(sys.argv[1:]))
