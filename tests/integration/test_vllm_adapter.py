"""The vLLM adapter's whole contract, against a stand-in: vLLM needs a GPU, and this machine has
none. `tests/standins/vllm_serve.py` stands in for `vllm serve`: it takes the command line the
adapter builds (recording it) and serves the model over the same OpenAI protocol with Modelium's
embedded server. The NVML seam stands in for the GPUs' memory readings.

Checked: arguments and CUDA_VISIBLE_DEVICES from a booking (tensor parallel, memory share, port
range, extra args), the health wait (`/health` and `/v1/models`), streaming through the gateway,
stop of the process group, and the wait for NVML to give the memory back.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from temporalio.testing import WorkflowEnvironment

from modelium.analyzer import analyze_directory
from modelium.config import Vllm
from modelium.gpu import GpuInfo
from modelium.names import workflow_id
from modelium.runtimes.base import RuntimeStartError
from modelium.runtimes.process import free_port, pid_alive
from modelium.runtimes.vllm import VllmRuntimeAdapter
from modelium.types import Booking, LoadRequest
from tests.helpers import (
    ROOT,
    copy_model,
    make_settings,
    metric_value,
    running_modelium,
    unique,
    wait_for,
    wait_phase,
)
from tests.standins.gpus import GpusFreedWhileAsleep

pytestmark = pytest.mark.slow

GIB = 2**30
H100 = 80 * GIB
STANDIN = str(ROOT / "tests" / "standins" / "vllm_serve.py")


class GpusHoldingWhileAlive:
    """The NVML seam for two H100s on which a process holds 6 GiB for as long as it runs."""

    def __init__(self) -> None:
        self.reads_while_held = 0

    def gpus(self) -> list[GpuInfo]:
        return [GpuInfo(i, f"GPU-{i}", "NVIDIA H100 80GB HBM3", H100, 0) for i in range(2)]

    def process_memory(self, pids: set[int]) -> dict[int, int]:
        held = {0: 6 * GIB} if any(pid_alive(p) for p in pids) else {}
        self.reads_while_held += bool(held)
        return held


def _config(tmp_path: Path, **extra: Any) -> Vllm:
    first = free_port()
    return Vllm(
        enabled=True,
        command=[sys.executable, STANDIN, "serve", "{model_dir}"],
        extra_args=["--max-model-len", "256"],
        port_range=(first, first + 20),
        **extra,
    )


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def test_vllm_contract_from_booking_to_stop(
    demo_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    record = tmp_path / "standin.jsonl"
    monkeypatch.setenv("MODELIUM_STANDIN_RECORD", str(record))
    config = _config(tmp_path)
    gpu = GpusHoldingWhileAlive()
    adapter = VllmRuntimeAdapter(
        "n",
        tmp_path / "logs",
        config,
        {"cpu": 8 * GIB, "cuda:0": H100, "cuda:1": H100},
        gpu,
        state_dir=tmp_path / "runtimes",
    )
    model = str(demo_models["text-generation"])
    booking = Booking("big", "n", "cuda:0", 20 * GIB, ["cuda:0", "cuda:1"])
    progress: list[tuple[str, str | None]] = []

    def report(message: str, line: str | None = None) -> None:
        progress.append((message, line))

    endpoint = await adapter.start(LoadRequest("big", model, "vllm", "text-generation", booking), report)
    try:
        [seen] = _records(record)
        port = int(endpoint.url.rsplit(":", 1)[1])
        assert seen["argv"] == [
            "serve",
            model,
            "--served-model-name",
            "big",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--tensor-parallel-size",
            "2",
            "--gpu-memory-utilization",
            "0.25",
            "--enable-sleep-mode",
            "--max-model-len",
            "256",
        ]
        assert seen["cuda_visible_devices"] == "0,1"
        assert config.port_range[0] <= port <= config.port_range[1]
        assert progress, "the adapter reported progress while the server loaded"
        # Healthy means /v1/models lists the model: the OpenAI API answers for it.
        async with httpx.AsyncClient(base_url=endpoint.url, timeout=60) as http:
            answer = await http.post("/v1/completions", json={"model": "big", "prompt": "Hi", "max_tokens": 2})
            assert answer.status_code == 200 and answer.json()["model"] == "big"
        # Idempotent: a retried load returns the running server.
        again = await adapter.start(LoadRequest("big", model, "vllm", "text-generation", booking), report)
        assert again == endpoint and len(_records(record)) == 1
        # A second model takes the next port of the range.
        single = Booking("small", "n", "cuda:1", 8 * GIB)
        other = await adapter.start(LoadRequest("small", model, "vllm", "text-generation", single), report)
        assert other.url != endpoint.url
        assert _records(record)[1]["argv"][-6:-3] == ["1", "--gpu-memory-utilization", "0.1"]
        await adapter.stop("small")
        # Parked (vLLM's sleep mode, level 1) it serves nothing; woken, it answers again.
        await adapter.park("big")
        assert [r.get("event") for r in _records(record)][-1:] == ["sleep"]
        async with httpx.AsyncClient(base_url=endpoint.url, timeout=60) as http:
            assert (await http.get("/is_sleeping")).json() == {"is_sleeping": True}
            body = {"model": "big", "prompt": "Hi", "max_tokens": 2}
            assert (await http.post("/v1/completions", json=body)).status_code == 503
            await adapter.wake("big")
            assert (await http.get("/is_sleeping")).json() == {"is_sleeping": False}
            assert (await http.post("/v1/completions", json=body)).status_code == 200
        assert [r.get("event") for r in _records(record)][-2:] == ["sleep", "wake_up"]
    finally:
        assert await adapter.stop("big")
    assert endpoint.pid is not None and not pid_alive(endpoint.pid)
    assert gpu.process_memory({endpoint.pid}) == {}
    assert adapter.running() == [] and not list((tmp_path / "runtimes").glob("*.json"))


def test_vllm_refuses_bookings_it_cannot_run(tmp_path: Path) -> None:
    adapter = VllmRuntimeAdapter("n", tmp_path, _config(tmp_path), {"cpu": 8 * GIB, "cuda:0": H100})
    request = LoadRequest("m", "/m", "vllm", "text-generation", Booking("m", "n", "cpu", GIB))
    with pytest.raises(RuntimeStartError, match="vLLM runs on GPUs; m was booked on cpu"):
        adapter.argv(request, 8000)
    tiny = LoadRequest("m", "/m", "vllm", "text-generation", Booking("m", "n", "cuda:0", 50 * 2**20))
    with pytest.raises(RuntimeStartError, match="50 MiB is under 0.1% of a 80 GiB GPU"):
        adapter.argv(tiny, 8000)
    # vllm.park: unload starts servers that cannot sleep (no dev-mode routes either).
    plain = VllmRuntimeAdapter("n", tmp_path, _config(tmp_path, park="unload"), {"cuda:0": H100})
    fits = LoadRequest("m", "/m", "vllm", "text-generation", Booking("m", "n", "cuda:0", 8 * GIB))
    assert "--enable-sleep-mode" not in plain.argv(fits, 8000)
    assert plain.env(fits) == {"CUDA_VISIBLE_DEVICES": "0"}
    assert adapter.env(fits)["VLLM_SERVER_DEV_MODE"] == "1"
    with pytest.raises(ValueError, match="--port are set by Modelium"):
        Vllm(extra_args=["--port=9000"])


async def test_vllm_through_modelium_streams_and_unloads(
    temporal_env: WorkflowEnvironment, demo_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    record = tmp_path / "standin.jsonl"
    monkeypatch.setenv("MODELIUM_STANDIN_RECORD", str(record))
    config = _config(tmp_path).model_dump()
    settings = make_settings(tmp_path, vllm=config)
    name = unique("llm")
    async with running_modelium(settings, temporal_env.client, gpu=GpusHoldingWhileAlive()) as running:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{running.gateway_port}", timeout=120) as http:
            copy_model(demo_models["text-generation"], settings.watch_directories[0] / name)
            info = await wait_phase(http, name, "loaded", timeout=180)
            # A decoder LLM on a node with GPUs and vLLM enabled: vLLM on a GPU.
            assert (info["runtime"], info["device"]) == ("vllm", "cuda:0"), info
            # Its load may take vLLM's own load_timeout_seconds (900 s), not the embedded runtime's.
            handle = temporal_env.client.get_workflow_handle(workflow_id(name))
            loads = [
                e.activity_task_scheduled_event_attributes
                async for e in handle.fetch_history_events()
                if e.activity_task_scheduled_event_attributes.activity_type.name == "load_model"
            ]
            assert loads[0].start_to_close_timeout.ToSeconds() == settings.vllm.load_timeout_seconds + 60 == 960
            [seen] = _records(record)
            assert seen["cuda_visible_devices"] == "0"
            body = {"model": name, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8, "stream": True}
            events = []
            async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("text/event-stream")
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
            assert events[-1] == "[DONE]" and len(events) >= 3
            assert json.loads(events[0])["model"] == name
            pid = seen["pid"]
            response = await http.post(f"/models/{name}/unload", json={"wait": True})
            assert response.status_code == 200, response.text
            await wait_for(lambda: not pid_alive(pid), timeout=30, what="the vLLM stand-in to stop")


async def wait_parked(http: httpx.AsyncClient, name: str, timeout: float) -> dict[str, Any]:
    """The model once parked: in phase `parked` from the step that begins it (no request is
    routed to it from then on), with its weights' host booking once the runtime is asleep."""

    async def asleep() -> dict[str, Any] | None:
        response = await http.get(f"/models/{name}")
        state = response.json() if response.status_code == 200 else {}
        return state if state.get("phase") == "parked" and state.get("parked_bytes") else None

    return await wait_for(asleep, timeout=timeout, what=f"{name} parked")


async def test_an_idle_vllm_model_is_parked_and_a_request_wakes_it(
    temporal_env: WorkflowEnvironment, demo_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    record = tmp_path / "standin.jsonl"
    monkeypatch.setenv("MODELIUM_STANDIN_RECORD", str(record))
    settings = make_settings(
        tmp_path,
        vllm=_config(tmp_path).model_dump(),
        orchestration={"policies": {"evict_after_idle_seconds": 1}},
    )
    name = unique("sleeper")
    ledger = settings.state_dir / "nodes" / settings.node.id / "bookings.json"
    gpu = GpusFreedWhileAsleep(record)
    async with running_modelium(settings, temporal_env.client, gpu=gpu) as running:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{running.gateway_port}", timeout=120) as http:
            copy_model(demo_models["text-generation"], settings.watch_directories[0] / name)
            parked = await wait_parked(http, name, timeout=180)
            [started] = [r for r in _records(record) if "argv" in r]
            pid = started["pid"]
            assert parked["runtime"] == "vllm" and pid_alive(pid)
            assert "parked" in parked["unload_reason"], parked
            # Its GPU booking shrank to what it still holds there (512 MiB and the 10% margin),
            # and its weights' host memory is booked in the CPU budget until it wakes.
            bookings = json.loads(ledger.read_text())["bookings"]
            assert bookings[name]["device"] == "cuda:0"
            assert bookings[name]["bytes"] == int(512 * 2**20 * 1.1) == parked["booked_bytes"]
            assert bookings[f"{name}~parked"]["device"] == "cpu"
            assert bookings[f"{name}~parked"]["bytes"] == parked["parked_bytes"] > 0
            assert parked["wake_bytes"] > bookings[name]["bytes"]

            async def counted_parked() -> bool:
                metrics = (await http.get(f"http://127.0.0.1:{running.metrics_port}/metrics")).text
                return metric_value(metrics, "modelium_models", phase="parked") == 1

            await wait_for(counted_parked, timeout=30, what="modelium_models{phase=parked} to read 1")

            async def listed_on_cpu() -> bool:
                nodes = (await http.get("/nodes")).json()["nodes"]
                held = [b for n in nodes for d in n["devices"] if d["device"] == "cpu" for b in d["bookings"]]
                return {"model": name, "bytes": parked["parked_bytes"], "phase": "parked weights"} in held

            await wait_for(listed_on_cpu, timeout=30, what="GET /nodes to list the parked weights on the CPU")

            # A request wakes it: the same process answers, not a new load.
            body = {"model": name, "prompt": "Hi", "max_tokens": 2}
            answer = await http.post("/v1/completions", json=body)
            assert answer.status_code == 200, answer.text
            events = [r.get("event") for r in _records(record) if "event" in r]
            assert events[:2] == ["sleep", "wake_up"], events
            assert [r["pid"] for r in _records(record) if "argv" in r] == [pid]
            info = (await http.get(f"/models/{name}")).json()
            assert info["load_count"] == 1 and info["endpoint"]["pid"] == pid, info

            # Idle again, it parks again; unloaded, its process and both bookings go.
            await wait_parked(http, name, timeout=60)
            response = await http.post(f"/models/{name}/unload", json={"wait": True})
            assert response.status_code == 200, response.text
            await wait_for(lambda: not pid_alive(pid), timeout=30, what="the vLLM stand-in to stop")
            assert json.loads(ledger.read_text())["bookings"] == {}


async def test_a_parked_models_host_memory_is_evicted_for_a_model_that_needs_it(
    temporal_env: WorkflowEnvironment, demo_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CPU budget has room for the embedded model, or for a parked model's weights beside
    less than that: demand for the embedded model evicts the parked one (its process stops, both
    its bookings go), as it would an idle loaded model."""
    record = tmp_path / "standin.jsonl"
    monkeypatch.setenv("MODELIUM_STANDIN_RECORD", str(record))
    sleeper, needy = unique("sleeper"), unique("needy")
    estimate = analyze_directory(demo_models["text-generation"], needy).memory_estimates["embedded"]
    weights = analyze_directory(demo_models["text-generation"], sleeper).weight_bytes
    assert weights is not None and weights < estimate
    settings = make_settings(
        tmp_path,
        vllm=_config(tmp_path).model_dump(),
        node={"cpu_memory_budget_bytes": estimate + weights // 2},
        orchestration={
            "policies": {"evict_after_idle_seconds": 1},
            "eviction": {"min_resident_seconds": 0, "min_idle_seconds": 0},
        },
        models={needy: {"runtime": "embedded", "devices": ["cpu"]}},
    )
    ledger = settings.state_dir / "nodes" / settings.node.id / "bookings.json"
    async with running_modelium(settings, temporal_env.client, gpu=GpusFreedWhileAsleep(record)) as running:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{running.gateway_port}", timeout=120) as http:
            copy_model(demo_models["text-generation"], settings.watch_directories[0] / sleeper)
            await wait_parked(http, sleeper, timeout=180)
            [pid] = [r["pid"] for r in _records(record) if "argv" in r]
            assert f"{sleeper}~parked" in json.loads(ledger.read_text())["bookings"]
            copy_model(demo_models["text-generation"], settings.watch_directories[0] / needy)
            # It does not fit beside the parked weights: it rests until asked for.
            await wait_phase(http, needy, "unloaded", timeout=120)
            answer = await http.post("/v1/completions", json={"model": needy, "prompt": "Hi", "max_tokens": 1})
            assert answer.status_code == 200, answer.text
            evicted = (await http.get(f"/models/{sleeper}")).json()
            assert evicted["phase"] == "unloaded" and f"room for {needy}" in evicted["unload_reason"], evicted
            assert not pid_alive(pid)
            bookings = json.loads(ledger.read_text())["bookings"]
            assert sleeper not in bookings and f"{sleeper}~parked" not in bookings and needy in bookings
