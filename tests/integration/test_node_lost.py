"""A machine is lost: its node agent and every runtime on it SIGKILLed.

The topology is the multi-machine one, every part its own process against one Temporal: a control
worker, two node agents (`worker node --node-id ...`), a gateway and a watcher. Four models load
on node a; node a is then killed outright. Expected: node a is declared lost after
`node.lost_after_seconds` of silence, its models are placed on node b and serve there, no workflow waits on node a's
task queue, requests meanwhile are held (not failed), and when node a comes back its ledger drops
the bookings of the models now served elsewhere and it starts none of them."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml
from temporalio.api.enums.v1 import EventType
from temporalio.testing import WorkflowEnvironment

from modelium.names import node_workflow_id, workflow_id
from modelium.runtimes.process import free_port, pid_alive
from modelium.types import NodeInventory
from tests.helpers import copy_model, end_workflows_of, runtime_pids, stop_processes, unique, wait_while_running
from workflows.nodes import NodeRegistryWorkflow

pytestmark = pytest.mark.slow

ANNOUNCE = 1.0  # seconds
LOST_AFTER = 3.0  # seconds of silence


class Parts:
    """The processes of the topology, each `python -m cli ...` with one config."""

    def __init__(self, tmp_path: Path, temporal: str) -> None:
        self.tmp = tmp_path
        self.gateway_port = free_port()
        self.queue = unique("control")
        self.config = tmp_path / "modelium.yaml"
        self.config.write_text(
            yaml.safe_dump(
                {
                    "state_dir": str(tmp_path / "state"),
                    "temporal": {"address": temporal, "control_task_queue": self.queue},
                    "gateway": {"port": self.gateway_port, "cold_start_timeout_seconds": 180},
                    "metrics": {"enabled": False},
                    "node": {
                        "cpu_memory_budget_bytes": 4 * 2**30,
                        "announce_seconds": ANNOUNCE,
                        "lost_after_seconds": LOST_AFTER,
                        "process_check_seconds": 0.5,
                    },
                    "orchestration": {
                        "model_discovery": {"watch_directories": [str(tmp_path / "incoming")], "settle_seconds": 0.5}
                    },
                    "runtimes": {"embedded": {"cpu_threads": 1, "warm_pool": 0}},  # as in make_settings
                }
            )
        )
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = (self.tmp / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli", "--config", str(self.config), *args],
            cwd=self.tmp,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> Path:
        return self.tmp / f"{name}.log"

    def stop_all(self) -> None:
        stop_processes(self.procs.values())


@pytest.fixture
def parts(tmp_path: Path, temporal_env: WorkflowEnvironment) -> Iterator[Parts]:
    p = Parts(tmp_path, temporal_env.client.service_client.config.target_host)
    try:
        yield p
    finally:
        p.stop_all()
        asyncio.run(end_workflows_of(temporal_env.client, p.queue))


async def _history_and_pending(temporal_env: WorkflowEnvironment, name: str) -> tuple[list[str], list[str]]:
    """The signals a model's workflow received, and the task queues of its pending activities."""
    handle = temporal_env.client.get_workflow_handle(workflow_id(name))
    signals = [
        e.workflow_execution_signaled_event_attributes.signal_name
        async for e in handle.fetch_history_events()
        if e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED
    ]
    described = await handle.describe()
    return signals, [a.activity_type.name for a in described.raw_description.pending_activities]


async def _inventory(temporal_env: WorkflowEnvironment, node: str) -> NodeInventory:
    handle = temporal_env.client.get_workflow_handle(node_workflow_id(node))
    return await handle.query(NodeRegistryWorkflow.inventory)


def test_lost_node_models_are_placed_again_and_requests_held(
    parts: Parts, demo_models: dict[str, Path], temporal_env: WorkflowEnvironment
) -> None:
    node_a, node_b = unique("node-a"), unique("node-b")
    gateway = parts.start("gateway", "gateway")
    parts.start("control", "worker", "control")
    agent_a = parts.start("node-a", "worker", "node", "--node-id", node_a)
    parts.start("watch", "watch")
    base = f"http://127.0.0.1:{parts.gateway_port}"
    wait_while_running(
        lambda: httpx.get(f"{base}/ready").status_code == 200, 60, "gateway ready", gateway, parts.log("gateway")
    )
    names = [unique(f"m{i}") for i in range(4)]
    for name in names:
        copy_model(demo_models["text-generation"], parts.tmp / "incoming" / name)

    def infos() -> list[dict[str, object]]:
        return [httpx.get(f"{base}/models/{n}").json() for n in names]

    on_a = wait_while_running(
        lambda: (i := infos()) and all(x.get("phase") == "loaded" for x in i) and i,
        180,
        "four models loaded on node a",
        gateway,
        parts.log("gateway"),
    )
    assert {x["node"] for x in on_a} == {node_a}
    runtimes_a = [int(x["endpoint"]["pid"]) for x in on_a]  # type: ignore[index]
    parts.start("node-b", "worker", "node", "--node-id", node_b)

    # The machine is gone: its agent and every runtime on it, at once.
    agent_a.send_signal(signal.SIGKILL)
    for pid in runtimes_a:
        os.kill(pid, signal.SIGKILL)
    agent_a.wait(timeout=10)
    lost_at = time.monotonic()

    # Requests sent now are held while the models move, then answered.
    body = {"prompt": "Hi", "max_tokens": 2}
    with ThreadPoolExecutor(len(names)) as pool:
        held = list(pool.map(lambda n: httpx.post(f"{base}/predict/{n}", json=body, timeout=200), names))
    assert [r.status_code for r in held] == [200] * 4, [r.text for r in held]
    assert {r.json()["node"] for r in held} == {node_b}

    moved = wait_while_running(
        lambda: (i := infos()) and all(x.get("phase") == "loaded" and x.get("node") == node_b for x in i) and i,
        120,
        "four models loaded on node b",
        gateway,
        parts.log("gateway"),
    )
    replaced_in = time.monotonic() - lost_at
    print(f"\n4 models re-placed from a lost node in {replaced_in:.1f}s (lost after {LOST_AFTER:g}s of silence)")
    for info in moved:
        assert info["booked_bytes"] and info["load_count"] == 2
    assert all(runtime_pids(n) for n in names)
    for name in names:
        signals, pending = asyncio.run(_history_and_pending(temporal_env, name))
        assert "node_lost" in signals and pending == [], (signals, pending)
    # The control plane's view of node a: lost, its bookings written off.
    seen = asyncio.run(_inventory(temporal_env, node_a))
    assert seen.lost and "no announcement" in seen.lost and all(d.booked_bytes == 0 for d in seen.devices)

    # Node a comes back: it drops the bookings of the models now on node b and starts none of them.
    bookings = parts.tmp / "state" / "nodes" / node_a / "bookings.json"
    assert len(json.loads(bookings.read_text())["bookings"]) == 4
    agent_a = parts.start("node-a-again", "worker", "node", "--node-id", node_a)
    wait_while_running(
        lambda: json.loads(bookings.read_text())["bookings"] == {},
        60,
        "node a's ledger emptied",
        agent_a,
        parts.log("node-a-again"),
    )
    for name in names:
        assert len(runtime_pids(name)) == 1, f"{name} must run once, on node b"
        info = httpx.get(f"{base}/models/{name}").json()
        assert info["node"] == node_b and info["phase"] == "loaded"
    assert not any(pid_alive(p) for p in runtimes_a)
