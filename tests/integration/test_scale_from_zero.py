"""Requests for a model that is not loaded wait for it and are served; they share one load.
Past the waiting limit a 429 says when to come back; past the timeout a 503 does."""

from __future__ import annotations

import asyncio
from pathlib import Path

import openai
import pytest
from temporalio.testing import WorkflowEnvironment

from tests.helpers import make_settings, metric_value, serving_model, unique, wait_phase

pytestmark = pytest.mark.slow


async def test_concurrent_requests_share_one_load_and_all_succeed(
    temporal_env: WorkflowEnvironment, demo_models: dict[str, Path], tmp_path: Path
) -> None:
    name = unique("cold")
    settings = make_settings(tmp_path)
    async with serving_model(settings, temporal_env.client, demo_models["text-generation"], name) as (running, http):
        down = await http.post(f"/models/{name}/unload")
        assert down.status_code == 200 and down.json()["phase"] == "unloaded", down.text

        base_url = f"http://127.0.0.1:{running.gateway_port}/v1"
        async with openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0) as client:
            requests = [
                client.chat.completions.create(
                    model=name, messages=[{"role": "user", "content": f"hi {i}"}], max_tokens=3
                )
                for i in range(8)
            ]
            answers = await asyncio.gather(*requests)
        assert all(a.choices[0].message.role == "assistant" for a in answers)

        info = (await http.get(f"/models/{name}")).json()
        assert info["phase"] == "loaded"
        assert info["load_count"] == 2, "the 8 waiting requests must share one load"
        metrics = (await http.get(f"http://127.0.0.1:{running.metrics_port}/metrics")).text
        assert metric_value(metrics, "modelium_cold_start_wait_seconds_count", model=name) == 8.0
        assert metric_value(metrics, "modelium_requests_waiting", model=name) == 0.0
        waited = metric_value(metrics, "modelium_cold_start_wait_seconds_sum", model=name)
        assert waited is not None and waited / 8 >= info["load_seconds"] * 0.5


async def test_waiting_is_bounded_by_count_and_time(
    temporal_env: WorkflowEnvironment, demo_models: dict[str, Path], tmp_path: Path
) -> None:
    name = unique("bounded")
    settings = make_settings(
        tmp_path, gateway={"port": 0, "max_waiting_requests": 2, "cold_start_timeout_seconds": 0.5}
    )
    async with serving_model(settings, temporal_env.client, demo_models["text-generation"], name) as (_, http):
        assert (await http.post(f"/models/{name}/unload")).json()["phase"] == "unloaded"

        body = {"prompt": "Hi", "max_tokens": 2}
        answers = await asyncio.gather(*(http.post(f"/predict/{name}", json=body) for _ in range(6)))
        statuses = sorted(a.status_code for a in answers)
        # Two wait (and, the load taking longer than 0.5 s, time out); four are turned away.
        assert statuses == [429, 429, 429, 429, 503, 503], [a.text for a in answers]
        for answer in answers:
            assert int(answer.headers["Retry-After"]) >= 1
            message = answer.json()["error"]["message"]
            key = "max_waiting_requests" if answer.status_code == 429 else "cold_start_timeout_seconds"
            assert key in message, message
        # The load goes on without anyone waiting, and then requests are served.
        await wait_phase(http, name, "loaded")
        assert (await http.post(f"/predict/{name}", json=body)).status_code == 200
