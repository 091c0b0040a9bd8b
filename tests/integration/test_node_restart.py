"""A node agent killed with SIGKILL mid-life, then started again: bookings and loaded models are
intact. The node agent runs as its own process (`modelium worker node`, as on a GPU machine); the
control worker, gateway and watcher run in this test against the same Temporal dev server.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from temporalio.testing import WorkflowEnvironment

from modelium.config import Settings
from modelium.names import node_workflow_id, workflow_id
from modelium.runtimes.process import pid_alive
from tests.helpers import copy_model, make_settings, running_modelium, runtime_pids, unique, wait_for, wait_phase
from workflows.lifecycle import ModelLifecycleWorkflow
from workflows.nodes import NodeRegistryWorkflow

pytestmark = pytest.mark.slow


def _node_config(path: Path, settings: Settings, client_target: str) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "state_dir": str(settings.state_dir),
                "node": {
                    "id": settings.node.id,
                    "cpu_memory_budget_bytes": 4 * 2**30,
                    "announce_seconds": 0.5,
                    "process_check_seconds": 0.5,
                },
                "temporal": {"address": client_target, "control_task_queue": settings.temporal.control_task_queue},
                "metrics": {"enabled": False},
                "runtimes": {"embedded": {"cpu_threads": 1, "warm_pool": 0}},  # as in make_settings
            }
        )
    )
    return path


def _stop(agent: subprocess.Popen[bytes]) -> None:
    """Stop a node agent the way its service manager would (SIGTERM); SIGKILL if it hangs."""
    if agent.poll() is None:
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(timeout=60)
        except subprocess.TimeoutExpired:
            agent.kill()


def _node_agent(config: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "cli", "--config", str(config), "worker", "node"],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


async def test_node_agent_sigkill_and_restart_keeps_bookings_and_models(
    temporal_env: WorkflowEnvironment, demo_models: dict[str, Path], tmp_path: Path
) -> None:
    client = temporal_env.client
    settings = make_settings(
        tmp_path, node={"id": unique("killed"), "cpu_memory_budget_bytes": 4 * 2**30, "announce_seconds": 0.5}
    )
    node = settings.node.id
    config = _node_config(tmp_path / "node.yaml", settings, client.service_client.config.target_host)
    log = tmp_path / "node-agent.log"
    ledger_file = settings.state_dir / "nodes" / node / "bookings.json"
    name = unique("survivor")
    agent = _node_agent(config, log)
    try:
        async with running_modelium(settings, client, node=False) as running:
            base = f"http://127.0.0.1:{running.gateway_port}"
            async with httpx.AsyncClient(base_url=base, timeout=120) as http:
                copy_model(demo_models["text-generation"], settings.watch_directories[0] / name)
                info = await wait_phase(http, name, "loaded", timeout=180)
                assert info["node"] == node
                handle = client.get_workflow_handle(workflow_id(name))
                before = await handle.query(ModelLifecycleWorkflow.state)
                assert before.endpoint is not None and before.endpoint.pid is not None
                pid = before.endpoint.pid
                bookings = json.loads(ledger_file.read_text())["bookings"]
                assert set(bookings) == {name}
                body = {"model": name, "prompt": "Hi", "max_tokens": 2}
                assert (await http.post("/v1/completions", json=body)).status_code == 200

                agent.send_signal(signal.SIGKILL)
                agent.wait(timeout=30)
                # The runtime is in its own process group: it lives on and keeps answering.
                assert pid_alive(pid)
                assert (await http.post("/v1/completions", json=body)).status_code == 200
                assert json.loads(ledger_file.read_text())["bookings"] == bookings

                agent = _node_agent(config, log)
                node_wf = client.get_workflow_handle(node_workflow_id(node))

                async def announced_again() -> bool:
                    inventory = await node_wf.query(NodeRegistryWorkflow.inventory)
                    return inventory.announced_at > before.loaded_at + 1 and agent.poll() is None

                await wait_for(announced_again, timeout=60, what="the restarted node agent's announcement")
                await wait_for(lambda: "adopted" in log.read_text(), timeout=30, what="adoption in the agent's log")
                after = await handle.query(ModelLifecycleWorkflow.state)
                # Not reloaded: the same process serves it, and the booking is the same.
                assert (after.phase, after.load_count, after.endpoint) == ("loaded", before.load_count, before.endpoint)
                assert json.loads(ledger_file.read_text())["bookings"] == bookings
                assert (await http.post("/v1/completions", json=body)).status_code == 200
                inventory = await node_wf.query(NodeRegistryWorkflow.inventory)
                assert inventory.devices[0].booked_bytes == bookings[name]["bytes"]

                # The new agent owns the adopted process: unloading stops it and frees the booking.
                response = await http.post(f"/models/{name}/unload", json={"wait": True})
                assert response.status_code == 200, response.text
                await wait_for(lambda: not pid_alive(pid), timeout=30, what=f"pid {pid} to stop")
                assert json.loads(ledger_file.read_text())["bookings"] == {}
                # And a request brings the model back through the restarted agent.
                assert (await http.post("/v1/completions", json=body)).status_code == 200
                assert (await handle.query(ModelLifecycleWorkflow.state)).load_count == before.load_count + 1
    finally:
        _stop(agent)
    assert agent.returncode in (0, -signal.SIGTERM), log.read_text()[-3000:]


async def test_node_agent_sigkill_while_loading_leaves_no_orphan(
    temporal_env: WorkflowEnvironment, demo_models: dict[str, Path], tmp_path: Path
) -> None:
    client = temporal_env.client
    settings = make_settings(tmp_path, node={"id": unique("midload"), "announce_seconds": 0.5})
    config = _node_config(tmp_path / "node.yaml", settings, client.service_client.config.target_host)
    log = tmp_path / "node-agent.log"
    records = settings.state_dir / "nodes" / settings.node.id / "runtimes" / "embedded"
    name = unique("midload")
    agent = _node_agent(config, log)
    try:
        async with running_modelium(settings, client, node=False) as running:
            base = f"http://127.0.0.1:{running.gateway_port}"
            async with httpx.AsyncClient(base_url=base, timeout=120) as http:
                copy_model(demo_models["text-generation"], settings.watch_directories[0] / name)
                # The runtime process is started (and recorded) but not yet healthy.
                await wait_for(lambda: (records / f"{name}.json").is_file(), timeout=120, what="the runtime spawned")
                assert (await http.get(f"/models/{name}")).json()["phase"] == "loading"
                agent.send_signal(signal.SIGKILL)
                agent.wait(timeout=30)
                [orphan_to_be] = runtime_pids(name)

                agent = _node_agent(config, log)
                info = await wait_phase(http, name, "loaded", timeout=120)
                # Exactly one process serves the model: the one adopted or a fresh one, never both.
                assert runtime_pids(name) == [info["endpoint"]["pid"]], (runtime_pids(name), info)
                if info["endpoint"]["pid"] != orphan_to_be:
                    assert not pid_alive(orphan_to_be)
                body = {"model": name, "prompt": "Hi", "max_tokens": 2}
                assert (await http.post("/v1/completions", json=body)).status_code == 200
    finally:
        _stop(agent)
        left = runtime_pids(name)
        for pid in left:  # a failure above must not leave the runtime behind for later tests
            os.killpg(pid, signal.SIGKILL)
    # The agent's clean stop takes its runtimes with it.
    assert left == [], log.read_text()[-3000:]
