"""The Triton adapter against a real `tritonserver` (the one shipped in the nvidia-pytriton wheel,
which scripts/setup.sh takes out into .venv/triton; CPU only, python backend): a dropped Triton entry and a
transformers model through the python backend, loaded and unloaded in explicit model-control
mode through tritonclient, and served through the gateway's `/predict` (KServe v2)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from temporalio.testing import WorkflowEnvironment

from modelium.config import Triton
from modelium.names import workflow_id
from modelium.runtimes.process import pid_alive
from modelium.runtimes.triton import TritonRuntimeAdapter, find_binary
from modelium.types import Booking, LoadRequest, ModelFormat, Task
from tests.helpers import copy_model, make_settings, metric_value, running_modelium, unique, wait_for, wait_phase

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(find_binary("auto") is None, reason="no tritonserver: scripts/setup.sh extracts one"),
]

ADD_ONE_CONFIG = """name: "add_one"
backend: "python"
max_batch_size: 0
input [ { name: "INPUT0", data_type: TYPE_FP32, dims: [ 4 ] } ]
output [ { name: "OUTPUT0", data_type: TYPE_FP32, dims: [ 4 ] } ]
instance_group [ { kind: KIND_CPU, count: 1 } ]
"""
ADD_ONE_MODEL = """import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", (x + 1).astype(np.float32))]))
        return out
"""


def triton_entry(path: Path) -> Path:
    """A Triton repository entry as a user would drop it: config.pbtxt and a version folder."""
    (path / "1").mkdir(parents=True)
    (path / "config.pbtxt").write_text(ADD_ONE_CONFIG)
    (path / "1" / "model.py").write_text(ADD_ONE_MODEL)
    return path


async def test_triton_adapter_loads_serves_and_unloads(tmp_path: Path) -> None:
    adapter = TritonRuntimeAdapter("n", tmp_path / "state", tmp_path / "logs", Triton(enabled=True))
    entry = triton_entry(tmp_path / "dropped" / "add-one")
    original = (entry / "1" / "model.py").read_text()
    request = LoadRequest(
        "adder", str(entry), "triton", Task.CUSTOM, Booking("adder", "n", "cpu", 2**30), ModelFormat.TRITON
    )
    started = time.monotonic()
    endpoint = await adapter.start(request, progress=lambda *_: None)
    loaded_in = time.monotonic() - started
    try:
        assert endpoint.protocol == "kserve-v2" and endpoint.pid is not None
        body = {"inputs": [{"name": "INPUT0", "shape": [4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
        async with httpx.AsyncClient(base_url=endpoint.url, timeout=60) as http:
            answer = (await http.post("/v2/models/adder/infer", json=body)).json()
            assert answer["outputs"][0]["data"] == [2.0, 3.0, 4.0, 5.0]
            # The user's files are untouched; the repository holds the entry under the model's name.
            assert (entry / "1" / "model.py").read_text() == original
            assert 'name: "adder"' in (tmp_path / "state" / "repository" / "adder" / "config.pbtxt").read_text()
            await adapter.check_health("adder")
            started = time.monotonic()
            assert await adapter.stop("adder")
            unloaded_in = time.monotonic() - started
            assert (await http.get("/v2/models/adder/ready")).status_code != 200
            assert not (tmp_path / "state" / "repository" / "adder").exists()
    finally:
        await adapter.stop_all()
    assert not pid_alive(endpoint.pid)
    print(f"\ntriton (python backend entry): load {loaded_in:.2f}s incl. server start, unload {unloaded_in:.2f}s")


async def test_triton_through_modelium(
    temporal_env: WorkflowEnvironment, demo_models: dict[str, Path], tmp_path: Path
) -> None:
    classifier, adder = unique("cls"), unique("adder")
    settings = make_settings(tmp_path, triton={"enabled": True}, models={classifier: {"runtime": "triton"}})
    async with running_modelium(settings, temporal_env.client) as running:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{running.gateway_port}", timeout=180) as http:
            incoming = settings.watch_directories[0]
            copy_model(demo_models["text-classification"], incoming / classifier)
            triton_entry(tmp_path / "staging" / adder).rename(incoming / adder)
            for name in (classifier, adder):
                info = await wait_phase(http, name, "loaded", timeout=240)
                assert info["runtime"] == "triton", info
            # A transformers model through the python backend: text in, the pipeline's answer out.
            answer = await http.post(f"/predict/{classifier}", json={"inputs": ["good", "bad"]})
            assert answer.status_code == 200, answer.text
            output = answer.json()["output"]
            assert len(output) == 2 and {"label", "score"} <= set(
                output[0][0] if isinstance(output[0], list) else output[0]
            )
            # A dropped Triton entry: named tensors in, named tensors out.
            answer = await http.post(f"/predict/{adder}", json={"inputs": {"INPUT0": [1.5, 2, 3, 4]}})
            assert answer.status_code == 200, answer.text
            assert answer.json()["output"] == {"OUTPUT0": [2.5, 3.0, 4.0, 5.0]}
            bad = await http.post(f"/predict/{adder}", json={"inputs": {"INPUT0": [1, 2]}})
            assert bad.status_code >= 400 and "INPUT0" in bad.text
            for name in (classifier, adder):
                response = await http.post(f"/models/{name}/unload", json={"wait": True})
                assert response.status_code == 200 and response.json()["phase"] == "unloaded"
            assert running.node is not None
            server_pid = running.node.adapters["triton"]._server.pid  # type: ignore[attr-defined]
            assert server_pid is not None and pid_alive(server_pid)
    # `serve` stopping stops the tritonserver it started (and the python backend's stubs with it).
    assert not pid_alive(server_pid)


async def test_a_restarted_node_agent_adopts_the_triton_server(tmp_path: Path) -> None:
    config = Triton(enabled=True)
    first = TritonRuntimeAdapter("n", tmp_path / "state", tmp_path / "logs", config)
    entry = triton_entry(tmp_path / "dropped" / "add-one")
    request = LoadRequest(
        "adder", str(entry), "triton", Task.CUSTOM, Booking("adder", "n", "cpu", 2**30), ModelFormat.TRITON
    )
    endpoint = await first.start(request, progress=lambda *_: None)
    # The node agent is killed: `first` is dropped without stopping anything. The next one adopts.
    second = TritonRuntimeAdapter("n", tmp_path / "state", tmp_path / "logs", config)
    try:
        assert await second.adopt() == ["adder"]
        await second.check_health("adder")
        again = await second.start(request, progress=lambda *_: None)
        assert again.url == endpoint.url and again.pid == endpoint.pid, "not started a second time"
    finally:
        await second.stop_all()
    assert endpoint.pid is not None and not pid_alive(endpoint.pid)
    # Nothing recorded is left for a third agent to adopt.
    assert await TritonRuntimeAdapter("n", tmp_path / "state", tmp_path / "logs", config).adopt() == []


class Adders:
    """Two clients asking the adder one after another until stopped: what each answer added."""

    def __init__(self, http: httpx.AsyncClient, name: str) -> None:
        self.http, self.name = http, name
        self.answers: list[tuple[float, int, str]] = []
        self.stopping = False

    async def _ask(self) -> None:
        body = {"inputs": {"INPUT0": [1.5, 2, 3, 4]}}
        while not self.stopping:
            response = await self.http.post(f"/predict/{self.name}", json=body)
            ok = response.status_code == 200
            added = str(response.json()["output"]["OUTPUT0"][0] - 1.5) if ok else response.text
            self.answers.append((asyncio.get_running_loop().time(), response.status_code, added))

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Adders]:
        tasks = [asyncio.create_task(self._ask()) for _ in range(2)]
        try:
            yield self
        finally:
            self.stopping = True
            await asyncio.gather(*tasks)

    def failures(self) -> list[tuple[float, int, str]]:
        return [a for a in self.answers if a[1] != 200]


async def test_a_triton_model_is_updated_beside_the_serving_one(
    temporal_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    """Blue/green on Triton: the new version is a second model in the same server (its instance
    key as its name), checked with one inference from its metadata's shapes, switched to, and
    the old one unloaded after its drain; a version that fails to load, or loads and fails its
    inference, leaves the serving one answering."""
    name = unique("adder")
    settings = make_settings(tmp_path, triton={"enabled": True}, orchestration={"updates": {"drain_seconds": 20}})
    async with running_modelium(settings, temporal_env.client) as running:
        assert running.node is not None
        triton = running.node.adapters["triton"]
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{running.gateway_port}", timeout=120) as http:
            served = settings.watch_directories[0] / name
            triton_entry(tmp_path / "staging" / name).rename(served)
            await wait_phase(http, name, "loaded", timeout=240)
            adders = Adders(http, name)
            async with adders.running():
                await wait_for(lambda: len(adders.answers) >= 5, 60, what="clients under way")
                replace_model(served, ADD_ONE_MODEL.replace("(x + 1)", "(x + 2)"))
                after = await wait_for(
                    lambda: _settled(http, name, switched=True), 120, what="the switch to the new version"
                )
                switched_at = asyncio.get_running_loop().time()
                await wait_for(lambda: len([a for a in adders.answers if a[0] > switched_at]) >= 10, 60)
            assert adders.failures() == [], adders.failures()[:5]
            added = [a[2] for a in adders.answers]
            assert "1.0" in added and "2.0" in added, sorted(set(added))
            assert {a[2] for a in adders.answers if a[0] > switched_at} == {"2.0"}
            assert after["phase"] == "loaded" and after["runtime"] == "triton" and after["update_count"] == 1
            # The gateway was told of the switch by the workflow (its route_changed update, one
            # answered), not left to find it on its next read.
            assert True in await route_notices(temporal_env, name)
            # The old version went once drained: only the new one is in the server and booked.
            await wait_for(lambda: triton.running() == [f"{name}@u1"], 60, what="the old version unloaded")
            bookings = [b.model for b in running.node.ledger.bookings() if b.model.startswith(name)]
            assert bookings == [f"{name}@u1"], bookings
            journal = running.node.ledger.journal()
            assert all(e["booked"]["cpu"] <= running.node.ledger.capacities["cpu"] for e in journal)
            ops = [(e["op"], e["model"]) for e in journal if e["model"].startswith(name) and e["op"] != "resize"]
            assert ops.index(("reserve", f"{name}@u1")) < ops.index(("release", name)), ops

            # One that loads but whose inference fails: its smoke check stops it.
            failing = ADD_ONE_MODEL.replace(
                'out.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", (x + 1).astype(np.float32))]))',
                'out.append(pb_utils.InferenceResponse(error=pb_utils.TritonError("version 3 is broken")))',
            )
            assert failing != ADD_ONE_MODEL
            # One whose config Triton refuses: its load fails.
            bad_config = ADD_ONE_CONFIG.replace("TYPE_FP32", "TYPE_NOT_A_TYPE")
            for kind, words, change in (
                ("inference fails", "version 3 is broken", lambda: replace_model(served, failing)),
                ("config refused", "config.pbtxt", lambda: replace_config(served, bad_config)),
            ):
                adders = Adders(http, name)
                async with adders.running():
                    change()
                    state = await wait_for(
                        lambda words=words: _update_failed(http, name, words), 120, what=f"update_failed: {kind}"
                    )
                    await wait_for(lambda adders=adders: len(adders.answers) >= 10, 60)
                assert adders.failures() == [], adders.failures()[:5]
                assert {a[2] for a in adders.answers} == {"2.0"}, kind
                assert state["phase"] == "loaded" and state["fingerprint"] == after["fingerprint"], kind
                assert triton.running() == [f"{name}@u1"], kind
            metrics = (await http.get(f"http://127.0.0.1:{running.metrics_port}/metrics")).text
            assert metric_value(metrics, "modelium_model_updates_total", model=name, result="switched") == 1.0
            assert metric_value(metrics, "modelium_model_updates_total", model=name, result="failed") == 2.0


async def route_notices(env: WorkflowEnvironment, name: str) -> list[bool]:
    """Each `route_changed` update the model's workflow accepted: whether it was answered."""
    history = await env.client.get_workflow_handle(workflow_id(name)).fetch_history()
    accepted, completed = {}, set()
    for event in history.events:
        if event.HasField("workflow_execution_update_accepted_event_attributes"):
            attrs = event.workflow_execution_update_accepted_event_attributes
            if attrs.accepted_request.input.name == "route_changed":
                accepted[attrs.accepted_request.meta.update_id] = True
        elif event.HasField("workflow_execution_update_completed_event_attributes"):
            completed.add(event.workflow_execution_update_completed_event_attributes.meta.update_id)
    return [update in completed for update in accepted]


def replace_model(entry: Path, text: str) -> None:
    """A new model.py for version 1 of a Triton entry, renamed into place."""
    tmp = entry / "1" / ".model.py.new"
    tmp.write_text(text)
    os.replace(tmp, entry / "1" / "model.py")


def replace_config(entry: Path, text: str) -> None:
    tmp = entry / ".config.pbtxt.new"
    tmp.write_text(text)
    os.replace(tmp, entry / "config.pbtxt")


async def _settled(http: httpx.AsyncClient, name: str, *, switched: bool) -> dict[str, Any] | None:
    state = (await http.get(f"/models/{name}")).json()
    return state if state["update_state"] is None and bool(state["switched_at"]) == switched else None


async def _update_failed(http: httpx.AsyncClient, name: str, words: str) -> dict[str, Any] | None:
    state = (await http.get(f"/models/{name}")).json()
    return state if state["update_state"] == "update_failed" and words in (state["update_error"] or "") else None
