"""Drop a model into the watched folder; observe it load, answer, count, idle out and vanish.

Real components throughout: the Temporal dev server, the control worker, the node agent, the
embedded runtime process serving a locally generated GPT-2, the gateway over HTTP and /metrics.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import httpx
import pytest
from temporalio.client import WorkflowExecutionStatus
from temporalio.testing import WorkflowEnvironment

from modelium.names import workflow_id
from modelium.runtimes.process import pid_alive
from tests.helpers import (
    copy_model,
    make_settings,
    metric_value,
    running_modelium,
    unique,
    wait_for,
)
from workflows.lifecycle import ModelLifecycleWorkflow

pytestmark = pytest.mark.slow


async def test_drop_serve_count_idle_unload_remove(
    temporal_env: WorkflowEnvironment, demo_models: dict[str, Path], tmp_path: Path
) -> None:
    idle = 4.0
    settings = make_settings(tmp_path, orchestration={"policies": {"evict_after_idle_seconds": idle}})
    name = unique("e2e-gpt2")
    client = temporal_env.client
    async with running_modelium(settings, client) as running:
        gw = f"http://127.0.0.1:{running.gateway_port}"
        metrics_url = f"http://127.0.0.1:{running.metrics_port}/metrics"
        async with httpx.AsyncClient(base_url=gw, timeout=30) as http:
            assert (await http.get("/health")).json()["status"] == "ok"
            assert (await http.get("/ready")).status_code == 200

            copy_model(demo_models["text-generation"], tmp_path / "incoming" / name)

            async def phase() -> str | None:
                response = await http.get(f"/models/{name}")
                return response.json()["phase"] if response.status_code == 200 else None

            await wait_for(lambda: _is(phase(), "loaded"), timeout=120, what="model loaded")
            info = (await http.get(f"/models/{name}")).json()
            assert info["runtime"] == "embedded" and info["device"] == "cpu"
            assert info["task"] == "text-generation"
            assert "GPT2LMHeadModel" in info["analysis"]
            assert info["decision_reason"] and info["load_seconds"] > 0
            pid = info["endpoint"]["pid"]
            assert pid_alive(pid)

            answer = await http.post(
                f"/predict/{name}",
                json={"prompt": "Hello world", "max_tokens": 5, "temperature": 0},
            )
            assert answer.status_code == 200, answer.text
            body = answer.json()
            assert body["model"] == name and body["runtime"] == "embedded"
            assert isinstance(body["output"], str)
            assert body["usage"]["completion_tokens"] >= 1
            assert body["usage"]["completion_tokens"] <= 5

            metrics = (await http.get(metrics_url)).text
            assert metric_value(metrics, "modelium_requests_total", model=name, runtime="embedded", status="200") == 1.0
            assert metric_value(metrics, "modelium_models_loaded", runtime="embedded", node=settings.node.id) == 1.0
            assert (
                metric_value(metrics, "modelium_model_load_duration_seconds_count", model=name, runtime="embedded")
                == 1.0
            )

            # The request reaches the workflow as a usage signal.
            handle = client.get_workflow_handle_for(ModelLifecycleWorkflow.run, workflow_id(name))

            async def counted() -> bool:
                state = await handle.query(ModelLifecycleWorkflow.state)
                return state.request_count == 1

            await wait_for(counted, timeout=15, what="usage signal counted")

            # Unknown models are a 404 that lists the known ones.
            missing = await http.post("/predict/no-such-model", json={"prompt": "x"})
            assert missing.status_code == 404
            assert name in missing.json()["error"]["known_models"]

            # Idle for `idle` seconds: unloaded, process gone, counted by reason.
            await wait_for(lambda: _is(phase(), "unloaded"), timeout=60, what="idle unload")
            info = (await http.get(f"/models/{name}")).json()
            assert "idle" in info["unload_reason"]
            assert not pid_alive(pid)
            assert running.node is not None and running.node.adapters["embedded"].running() == []
            metrics = (await http.get(metrics_url)).text
            assert metric_value(metrics, "modelium_unloads_total", reason="idle") == 1.0
            assert metric_value(metrics, "modelium_models_loaded", runtime="embedded", node=settings.node.id) == 0.0

            # A request for the unloaded model waits while it loads again, then is served.
            cold = await http.post(f"/predict/{name}", json={"prompt": "Hi", "max_tokens": 2})
            assert cold.status_code == 200, cold.text
            info = (await http.get(f"/models/{name}")).json()
            assert info["phase"] == "loaded" and info["load_count"] == 2
            metrics = (await http.get(metrics_url)).text
            assert metric_value(metrics, "modelium_cold_start_wait_seconds_count", model=name) == 1.0

            # The runtime dies: the next request gets a 503 and the workflow reloads it.
            before = (await http.get(f"/models/{name}")).json()
            pid = before["endpoint"]["pid"]
            os.kill(pid, signal.SIGKILL)
            await wait_for(lambda: not pid_alive(pid), timeout=10, what="runtime killed")
            dead = await http.post(f"/predict/{name}", json={"prompt": "Hi", "max_tokens": 2})
            assert dead.status_code == 503 and "Retry-After" in dead.headers

            async def reloaded() -> bool:
                info = (await http.get(f"/models/{name}")).json()
                return info["phase"] == "loaded" and info["endpoint"]["pid"] != pid

            await wait_for(reloaded, timeout=120, what="reload after the runtime died")
            again = await http.post(f"/predict/{name}", json={"prompt": "Hi", "max_tokens": 2})
            assert again.status_code == 200, again.text
            info = (await http.get(f"/models/{name}")).json()
            assert info["load_count"] == before["load_count"] + 1

            # Deleting the directory unloads the model and ends its workflow.
            pid = (await http.get(f"/models/{name}")).json()["endpoint"]["pid"]
            shutil.rmtree(tmp_path / "incoming" / name)
            result = await handle.result()
            assert result.phase == "removed"
            assert (await handle.describe()).status == WorkflowExecutionStatus.COMPLETED
            assert not pid_alive(pid)

            async def gone() -> bool:
                return (await http.get(f"/models/{name}")).status_code == 404

            # Within endpoint_cache_seconds (0.5 s here) the gateway may still answer from cache.
            await wait_for(gone, timeout=5, what="removed model to be a 404")


async def _is(value_coro: object, expected: str) -> bool:
    return (await value_coro) == expected  # type: ignore[misc]


async def test_classification_model_answers_through_predict(
    temporal_env: WorkflowEnvironment, demo_models: dict[str, Path], tmp_path: Path
) -> None:
    settings = make_settings(tmp_path)
    name = unique("e2e-bert")
    async with running_modelium(settings, temporal_env.client) as running:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{running.gateway_port}", timeout=30) as http:
            copy_model(demo_models["text-classification"], tmp_path / "incoming" / name)

            async def loaded() -> bool:
                response = await http.get(f"/models/{name}")
                return response.status_code == 200 and response.json()["phase"] == "loaded"

            await wait_for(loaded, timeout=120, what="classifier loaded")
            answer = await http.post(f"/predict/{name}", json={"inputs": ["good movie", "bad movie"]})
            assert answer.status_code == 200, answer.text
            body = answer.json()
            assert body["task"] == "text-classification"
            assert len(body["output"]) == 2
            for scores in body["output"]:
                assert {s["label"] for s in scores} == {"negative", "positive"}
                assert abs(sum(s["score"] for s in scores) - 1.0) < 1e-4
            # A field the model does not know is named in a 422.
            bad = await http.post(f"/predict/{name}", json={"inputs": "x", "temprature": 1})
            assert bad.status_code == 422
            assert bad.json()["error"]["param"] == "temprature"
