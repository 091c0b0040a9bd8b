"""The Ray Serve adapter against a real local Ray cluster on the CPU (started by the adapter, as
a node agent does): a tiny locally made classifier deployed as its own Serve application, served
through the gateway, updated to a new version deployed beside it, and deleted on unload; the
cluster stops with the node agent."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from temporalio.testing import WorkflowEnvironment

from modelium.config import RayServe
from modelium.runtimes.process import free_port, pid_alive, process_argv
from modelium.runtimes.ray_serve import RayServeRuntimeAdapter
from modelium.types import Booking, LoadRequest, Task
from tests.helpers import copy_model, make_settings, running_modelium, unique, wait_for, wait_phase

# Ray's daemons are looked for machine-wide: these tests must not run beside each other, and do
# not (scripts/test.sh runs a file's tests on one worker, and no other file starts Ray).
pytestmark = pytest.mark.slow


def ray_processes() -> list[str]:
    """Ray's daemons still running on this machine (there are none before these tests)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and pid_alive(int(entry.name)):
            argv = " ".join(process_argv(int(entry.name)) or [])
            if "raylet" in argv or "gcs_server" in argv or "ray start" in argv:
                found.append(f"{entry.name}: {argv[:120]}")
    return found


async def test_ray_serve_deploys_serves_and_deletes(demo_models: dict[str, Path], tmp_path: Path) -> None:
    config = RayServe(enabled=True, http_port=free_port(), num_cpus=2)
    adapter = RayServeRuntimeAdapter("n", tmp_path / "state", tmp_path / "logs", config)
    model = str(demo_models["text-classification"])
    request = LoadRequest(
        "sentiment", model, "ray_serve", Task.TEXT_CLASSIFICATION, Booking("sentiment", "n", "cpu", 1)
    )
    started = time.monotonic()
    endpoint = await adapter.start(request, progress=lambda *_: None)
    loaded_in = time.monotonic() - started
    head = endpoint.pid
    try:
        async with httpx.AsyncClient(timeout=60) as http:
            answer = await http.post(f"{endpoint.url}/predict", json={"inputs": ["good", "bad"]})
            assert answer.status_code == 200, answer.text
            output = answer.json()["output"]
            assert len(output) == 2 and {"label", "score"} <= set(output[0])
            await adapter.check_health("sentiment")
            # A second model is a second application on the same cluster.
            second = LoadRequest("other", model, "ray_serve", Task.TEXT_CLASSIFICATION, Booking("other", "n", "cpu", 1))
            other = await adapter.start(second, progress=lambda *_: None)
            assert other.url.endswith("/other") and other.pid == head
            started = time.monotonic()
            assert await adapter.stop("sentiment")
            unloaded_in = time.monotonic() - started
            assert (await http.post(f"{endpoint.url}/predict", json={"inputs": "x"})).status_code == 404
            assert (await http.post(f"{other.url}/predict", json={"inputs": "fine"})).status_code == 200
    finally:
        await adapter.stop_all()
    assert head is not None and not pid_alive(head)
    assert ray_processes() == []
    print(f"\nray serve: first load {loaded_in:.1f}s incl. starting Ray, unload {unloaded_in:.1f}s")


async def test_ray_serve_through_modelium(
    temporal_env: WorkflowEnvironment, demo_models: dict[str, Path], tmp_path: Path
) -> None:
    name = unique("ray-cls")
    settings = make_settings(
        tmp_path,
        ray_serve={"enabled": True, "http_port": free_port(), "num_cpus": 2},
        models={name: {"runtime": "ray_serve"}},
    )
    async with running_modelium(settings, temporal_env.client) as running:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{running.gateway_port}", timeout=180) as http:
            copy_model(demo_models["text-classification"], settings.watch_directories[0] / name)
            info = await wait_phase(http, name, "loaded", timeout=300)
            assert info["runtime"] == "ray_serve"
            answer = await http.post(f"/predict/{name}", json={"inputs": "what a day"})
            assert answer.status_code == 200, answer.text
            assert answer.json()["runtime"] == "ray_serve" and "label" in str(answer.json()["output"])

            # A new version (other label names) is deployed beside the serving one as an
            # application of its own, checked, switched to; the old application drains and goes.
            served = settings.watch_directories[0] / name
            config = json.loads((served / "config.json").read_text())
            config["id2label"] = {"0": "v2-negative", "1": "v2-positive"}
            config["label2id"] = {"v2-negative": 0, "v2-positive": 1}
            labels: list[tuple[int, str]] = []
            stopping = False

            async def ask() -> None:
                while not stopping:
                    response = await http.post(f"/predict/{name}", json={"inputs": "what a day"})
                    labels.append((response.status_code, str(response.json().get("output"))))

            asker = asyncio.create_task(ask())
            try:
                await wait_for(lambda: len(labels) >= 3, 60, what="requests under way")
                tmp = served / ".config.json.new"
                tmp.write_text(json.dumps(config))
                os.replace(tmp, served / "config.json")

                async def switched() -> dict[str, Any] | None:
                    state = (await http.get(f"/models/{name}")).json()
                    return state if state["switched_at"] and state["update_state"] is None else None

                after = await wait_for(switched, 300, what="the switch to the new version")
                seen = len(labels)
                await wait_for(lambda: len(labels) >= seen + 3, 60, what="requests after the switch")
            finally:
                stopping = True
                await asker
            assert [a for a in labels if a[0] != 200] == [], labels[:5]
            assert "'negative'" in labels[0][1] or "'positive'" in labels[0][1], labels[0]
            assert all("v2-" in text for _, text in labels[seen:]), labels[seen:]
            assert after["phase"] == "loaded" and after["update_count"] == 1
            assert running.node is not None
            ray = running.node.adapters["ray_serve"]
            await wait_for(lambda: ray.running() == [f"{name}@u1"], 60, what="the old application deleted")
            response = await http.post(f"/models/{name}/unload", json={"wait": True})
            assert response.status_code == 200 and response.json()["phase"] == "unloaded"
    # `serve` stopping takes the Ray cluster it started with it.
    assert ray_processes() == []
