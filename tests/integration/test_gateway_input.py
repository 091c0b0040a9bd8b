"""No client input yields a 5xx, and every error is one envelope that names the problem.

Against real runtimes (a text generator and a classifier served by the embedded runtime) through
the gateway: over-long inputs, out-of-range numbers, malformed JSON, wrong routes, odd names, HEAD,
a stream the client hangs up on, and the labels of refused requests in the metrics."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from temporalio.testing import WorkflowEnvironment

from modelium.config import Settings
from tests.helpers import copy_model, make_settings, metric_value, modelium_http, unique, wait_for, wait_phase

pytestmark = pytest.mark.slow


@contextlib.asynccontextmanager
async def gateway(
    settings: Settings, temporal_env: WorkflowEnvironment, demo_models: dict[str, Path], tmp_path: Path
) -> AsyncIterator[tuple[httpx.AsyncClient, str, str, str, int]]:
    gen, cls, broken = unique("gen"), unique("cls"), unique("broken")
    async with modelium_http(settings, temporal_env.client, timeout=60) as (running, http):
        incoming = settings.watch_directories[0]
        copy_model(demo_models["text-generation"], incoming / gen)
        copy_model(demo_models["text-classification"], incoming / cls)
        (incoming / broken).mkdir()
        (incoming / broken / "config.json").write_text("{not json")
        await asyncio.gather(
            wait_phase(http, gen, "loaded"), wait_phase(http, cls, "loaded"), wait_phase(http, broken, "failed")
        )
        assert running.metrics_port is not None
        yield http, gen, cls, broken, running.metrics_port


def envelope(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    assert {"message", "type", "param", "code"} <= set(error), error
    return error


async def test_bad_inputs_get_4xx_naming_the_problem(
    temporal_env: WorkflowEnvironment, demo_models: dict[str, Path], tmp_path: Path
) -> None:
    settings = make_settings(tmp_path)
    async with gateway(settings, temporal_env, demo_models, tmp_path) as (http, gen, cls, broken, metrics_port):
        # Inputs longer than the classifier takes are cut to its limit, and the answer says so.
        long = await http.post(f"/predict/{cls}", json={"inputs": "word " * 3000})
        assert long.status_code == 200, long.text
        assert long.json()["truncated"] is True and "truncated" in long.json()["warning"]
        short = await http.post(f"/predict/{cls}", json={"inputs": "word"})
        assert short.status_code == 200 and short.json()["truncated"] is None

        # A prompt past the generator's context: OpenAI's 400 context_length_exceeded.
        over = await http.post("/v1/completions", json={"model": gen, "prompt": "word " * 3000, "max_tokens": 2})
        assert over.status_code == 400 and envelope(over)["code"] == "context_length_exceeded", over.text
        over = await http.post(f"/predict/{gen}", json={"prompt": "word " * 3000, "max_tokens": 2})
        assert over.status_code == 400 and envelope(over)["code"] == "context_length_exceeded", over.text

        # Out-of-range and mistyped numbers: 4xx naming the field, on both APIs.
        for body, field in [
            ({"seed": 2**70}, "seed"),
            ({"max_tokens": "5"}, "max_tokens"),
            ({"temperature": 9}, "temperature"),
            ({"n": 3}, "n"),
        ]:
            answer = await http.post("/v1/completions", json={"model": gen, "prompt": "Hi", **body})
            assert answer.status_code == 400 and envelope(answer)["param"] == field, (body, answer.text)
            if field != "n":
                answer = await http.post(f"/predict/{gen}", json={"prompt": "Hi", **body})
                assert answer.status_code == 422 and envelope(answer)["param"] == field, (body, answer.text)

        # Malformed JSON: where it breaks, as a person counts.
        bad = await http.post(
            f"/predict/{gen}", content=b'{"prompt": "Hi",}', headers={"content-type": "application/json"}
        )
        assert bad.status_code == 400 and "invalid JSON at line 1, column 17" in envelope(bad)["message"], bad.text

        # An OpenAI route on a model it does not serve: 400 naming the task and the right route.
        wrong = await http.post("/v1/completions", json={"model": cls, "prompt": "Hi"})
        error = envelope(wrong)
        assert wrong.status_code == 400 and "text-classification" in error["message"]
        assert f"/predict/{cls}" in error["message"]

        # A name with a trailing newline is not a name.
        odd = await http.post(f"/predict/{gen}%0A", json={"prompt": "Hi"})
        assert odd.status_code == 400 and envelope(odd)["param"] == "model"

        # HEAD works wherever GET does.
        for path in ("/health", "/models", f"/models/{gen}", "/v1/models"):
            head = await http.head(path)
            assert head.status_code == 200 and head.content == b"", path

        # A failed model answers 503 with one line and an error id, no traceback, no path; the
        # metric names the model.
        failed = await http.post(f"/predict/{broken}", json={"inputs": "x"})
        message = envelope(failed)["message"]
        assert failed.status_code == 503 and "error id err_" in message, message
        assert str(tmp_path) not in message and "\n" not in message and "Traceback" not in message
        text = (await http.get(f"http://127.0.0.1:{metrics_port}/metrics")).text
        assert metric_value(text, "modelium_requests_total", model=broken, status="503") == 1.0
        assert metric_value(text, "modelium_requests_total", model="_unknown", status="503") is None

        # The CPU's "used" memory is what its runtimes hold (two tiny models: well over 100 MiB).
        async def cpu_used() -> float | None:
            text = (await http.get(f"http://127.0.0.1:{metrics_port}/metrics")).text
            value = metric_value(text, "modelium_gpu_memory_bytes", gpu="cpu", kind="used")
            return value if value and value > 100 * 2**20 else None

        await wait_for(cpu_used, timeout=30, what="modelium_gpu_memory_bytes{gpu=cpu,kind=used}")


async def test_a_stream_the_client_hangs_up_on_counts_as_499(
    temporal_env: WorkflowEnvironment, demo_models: dict[str, Path], tmp_path: Path
) -> None:
    settings = make_settings(tmp_path)
    async with gateway(settings, temporal_env, demo_models, tmp_path) as (http, gen, _, _, metrics_port):
        body = {"model": gen, "prompt": "Hi", "max_tokens": 100, "stream": True}
        async with http.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            async for _ in response.aiter_bytes():
                break  # the client reads one chunk and goes away

        async def counted() -> float | None:
            text = (await http.get(f"http://127.0.0.1:{metrics_port}/metrics")).text
            return metric_value(text, "modelium_requests_total", model=gen, status="499")

        assert await wait_for(counted, timeout=30, what="the hung-up stream counted as 499") == 1.0
        text = (await http.get(f"http://127.0.0.1:{metrics_port}/metrics")).text
        assert metric_value(text, "modelium_requests_total", model=gen, status="200") is None
        # The model's own usage counts answers that completed only.
        info = (await http.get(f"/models/{gen}")).json()
        assert info["request_count"] == 0, json.dumps(info)

        # Not streamed: a client that gives up while the model loads for it is a 499 too.
        assert (await http.post(f"/models/{gen}/unload", json={})).status_code == 200
        with contextlib.suppress(httpx.TimeoutException):
            await http.post(f"/predict/{gen}", json={"prompt": "Hi", "max_tokens": 2}, timeout=0.5)

        async def gave_up() -> float | None:
            text = (await http.get(f"http://127.0.0.1:{metrics_port}/metrics")).text
            return metric_value(text, "modelium_requests_total", model=gen, status="499")

        assert await wait_for(lambda: _is(gave_up(), 2.0), timeout=60, what="the abandoned wait counted as 499")
        text = (await http.get(f"http://127.0.0.1:{metrics_port}/metrics")).text
        assert metric_value(text, "modelium_requests_total", model=gen, status="200") is None


async def _is(value: Any, expected: float) -> bool:
    return bool(await value == expected)
