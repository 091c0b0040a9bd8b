"""The topology that deploy/compose and the Helm chart run, proven on one machine.

Every Modelium process of the compose file is started the way that file starts it: its command
and its environment, read from `docker compose config` (not retyped here). Only what names the
containers' world is mapped to this machine's: Temporal's host, ports, the /models and state
folders, and the node id. Against one Temporal there run two control workers, two node agents
with different ids, two gateways and one watcher. Both gateways serve a dropped model; then one
control worker and one gateway are SIGKILLed while a client keeps sending requests through the
other gateway: every request succeeds, and the model's workflow carries on (it unloads and
loads again on request, run by the surviving control worker)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from temporalio.testing import WorkflowEnvironment

from modelium.runtimes.process import free_port
from scripts.render_chart import objects
from tests.helpers import compose, copy_model, end_workflows_of, poll_while_running, stop_processes, unique

pytestmark = pytest.mark.slow

# Settings this test adds to the compose environment, each for a reason of the test's own:
TEST_ONLY = {
    # its own control queue on the session's shared Temporal
    "MODELIUM_TEMPORAL__CONTROL_TASK_QUEUE": unique("control"),
    # a quick handover of the dropped folder, and a CPU budget for two tiny models
    "MODELIUM_ORCHESTRATION__MODEL_DISCOVERY__SETTLE_SECONDS": "0.5",
    "MODELIUM_NODE__CPU_MEMORY_BUDGET_BYTES": str(4 * 2**30),
    "MODELIUM_RUNTIMES__EMBEDDED__CPU_THREADS": "1",
}


class Topology:
    def __init__(self, tmp: Path, temporal: str) -> None:
        self.tmp = tmp
        self.temporal = temporal
        self.services = compose("nvidia")["services"]
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.ports: dict[str, dict[str, int]] = {}

    def environment(self, service: str, name: str) -> dict[str, str]:
        """The service's compose environment, with the containers' names mapped to this machine."""
        ports = self.ports[name] = {"metrics": free_port(), "gateway": free_port()}
        mapped = {
            "temporal:7233": self.temporal,
            "/var/lib/modelium": str(self.tmp / name / "state"),
            "[/models]": f"[{self.tmp / 'models'}]",
            "0.0.0.0": "127.0.0.1",
            # The node container's name, by which gateways reach its runtimes: another name of
            # this machine than the one it listens on, so the endpoint shows which one it gave.
            "modelium-node": "localhost",
        }
        env: dict[str, str] = {}
        for key, value in self.services[service]["environment"].items():
            # Runtimes listen on every interface, as in the container (requests still go to loopback).
            value = value if key == "MODELIUM_NODE__RUNTIME_HOST" else mapped.get(value, value)
            if key == "MODELIUM_METRICS__PORT":
                value = str(ports["metrics"])
            elif key == "MODELIUM_GATEWAY__PORT":
                value = str(ports["gateway"])
            elif key == "MODELIUM_NODE__ID":
                value = name
            env[key] = value
        return {**env, **TEST_ONLY}

    def start(self, service: str, name: str) -> subprocess.Popen[bytes]:
        command = self.services[service]["command"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MODELIUM_")}
        (self.tmp / name).mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli", *command],
            cwd=self.tmp / name,
            stdout=(self.tmp / f"{name}.log").open("ab"),
            stderr=subprocess.STDOUT,
            env={**env, **self.environment(service, name), "PYTHONUNBUFFERED": "1"},
        )
        self.procs[name] = proc
        return proc

    def url(self, name: str, port: str = "gateway") -> str:
        return f"http://127.0.0.1:{self.ports[name][port]}"

    def wait(self, predicate, timeout: float, what: str):  # type: ignore[no-untyped-def]
        return poll_while_running(predicate, timeout, what, self._running, self._logs)

    def _running(self) -> None:
        """Every process is up, but those the test killed on purpose."""
        for name, proc in self.procs.items():
            if proc.poll() is not None and proc.returncode != -signal.SIGKILL:
                raise AssertionError(f"{name} exited:\n{(self.tmp / f'{name}.log').read_text()[-3000:]}")

    def _logs(self) -> str:
        return "\n".join(f"--- {n}\n{(self.tmp / f'{n}.log').read_text()[-1500:]}" for n in self.procs)

    def stop_all(self) -> None:
        stop_processes(self.procs.values())


@pytest.fixture
def topology(tmp_path: Path, temporal_env: WorkflowEnvironment) -> Iterator[Topology]:
    t = Topology(tmp_path, temporal_env.client.service_client.config.target_host)
    try:
        yield t
    finally:
        t.stop_all()
        asyncio.run(end_workflows_of(temporal_env.client, TEST_ONLY["MODELIUM_TEMPORAL__CONTROL_TASK_QUEUE"]))


def test_the_chart_runs_what_compose_runs() -> None:
    """The chart's containers take the same commands as compose's services."""
    services = compose("nvidia")["services"]
    chart = {o["metadata"]["name"]: o for o in objects({}) if o["kind"] in ("Deployment", "DaemonSet")}
    for role in ("control", "node", "gateway", "watcher"):
        (container,) = chart[f"modelium-{role}"]["spec"]["template"]["spec"]["containers"]
        assert container["args"] == services[f"modelium-{role}"]["command"], role


def test_two_of_each_survive_a_killed_control_worker_and_gateway(
    topology: Topology, demo_models: dict[str, Path]
) -> None:
    t = topology
    for name in ("control-1", "control-2"):
        t.start("modelium-control", name)
    for name in (unique("node-a"), unique("node-b")):
        t.start("modelium-node", name)
    for name in ("gateway-1", "gateway-2"):
        t.start("modelium-gateway", name)
    t.start("modelium-watcher", "watcher")
    for name in t.procs:
        t.wait(lambda n=name: httpx.get(f"{t.url(n, 'metrics')}/ready").status_code == 200, 90, f"{name} ready")

    model = unique("tiny")
    copy_model(demo_models["text-generation"], t.tmp / "models" / model)
    body = {"prompt": "Hello", "max_tokens": 2}
    for gateway in ("gateway-1", "gateway-2"):
        t.wait(
            lambda g=gateway: httpx.post(f"{t.url(g)}/predict/{model}", json=body, timeout=60).status_code == 200,
            180,
            f"{model} served through {gateway}",
        )

    statuses: list[int] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(base_url=t.url("gateway-2"), timeout=60) as http:
            while not stop.is_set():
                statuses.append(http.post(f"/predict/{model}", json=body).status_code)

    sender = threading.Thread(target=client)
    sender.start()
    try:
        t.wait(lambda: len(statuses) >= 10, 60, "traffic through gateway-2")
        t.procs["control-1"].send_signal(signal.SIGKILL)
        t.procs["gateway-1"].send_signal(signal.SIGKILL)
        killed_at = len(statuses)
        t.wait(lambda: len(statuses) >= killed_at + 50, 120, "50 more requests after the kills")
        # The workflow carries on, run by the surviving control worker: it unloads, and the
        # requests still coming load it again (they are held meanwhile, not refused).
        unloaded = httpx.post(f"{t.url('gateway-2')}/models/{model}/unload", json={}, timeout=60)
        assert unloaded.status_code == 200, unloaded.text
        after = len(statuses)
        t.wait(lambda: len(statuses) >= after + 20, 120, "requests served after the unload")
    finally:
        stop.set()
        sender.join(timeout=120)
    assert t.procs["control-1"].poll() == -signal.SIGKILL and t.procs["gateway-1"].poll() == -signal.SIGKILL
    assert statuses and set(statuses) == {200}, f"{len(statuses)} requests: {sorted(set(statuses))}"
    print(f"{len(statuses)} requests through gateway-2, all 200; {len(statuses) - killed_at} after the kills")
    info = httpx.get(f"{t.url('gateway-2')}/models/{model}").json()
    assert info["phase"] == "loaded" and info["load_count"] >= 2, info
    # The endpoint names the node's advertised host, not the address its runtimes listen on.
    assert info["endpoint"]["url"].startswith("http://localhost:"), info["endpoint"]
    assert unloaded.json()["unload_reason"].startswith("unload requested through the API"), unloaded.text
