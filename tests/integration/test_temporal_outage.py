"""Temporal dies while models serve.

In process: the gateway keeps routing a loaded model to its last known endpoint, refuses at once
(503 + Retry-After, not after the client's retries) what needs Temporal, and `/ready` recovers by
itself once Temporal is back. As a user runs it: `modelium serve` starts its embedded Temporal
again on the same database when it is killed, and a `serve` killed outright (SIGKILL) can be
started again in the same folder: it adopts the Temporal and the runtimes the first one left, and
Ctrl-C then leaves nothing running."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from modelium.runtimes.process import free_port, pid_alive
from tests.helpers import (
    copy_model,
    interrupt,
    make_settings,
    metric_value,
    processes_of_state,
    runtime_pids,
    serve_config,
    serving_model,
    start_serve,
    unique,
    wait_for,
    wait_phase,
    wait_while_running,
)
from workers.temporal_server import EmbeddedTemporal

pytestmark = pytest.mark.slow


async def test_gateway_serves_loaded_models_and_fails_fast_while_temporal_is_down(
    demo_models: dict[str, Path], tmp_path: Path
) -> None:
    temporal = EmbeddedTemporal(tmp_path / "temporal", free_port(), free_port(), ui=False)
    client = await temporal.start()
    settings = make_settings(tmp_path)
    loaded, resting = unique("up"), unique("resting")
    try:
        async with serving_model(settings, client, demo_models["text-generation"], loaded) as (running, http):
            copy_model(demo_models["text-generation"], settings.watch_directories[0] / resting)
            await wait_phase(http, resting, "loaded")
            assert (await http.post(f"/models/{resting}/unload", json={})).status_code == 200
            body = {"prompt": "Hi", "max_tokens": 2}
            assert (await http.post(f"/predict/{loaded}", json=body)).status_code == 200
            # The metrics port answers the probes of a container (workers have no gateway), and
            # the gauges say Temporal is up and how many models are in each phase.
            probes = httpx.AsyncClient(base_url=f"http://127.0.0.1:{running.metrics_port}", timeout=10)
            assert (await probes.get("/health")).status_code == 200
            assert (await probes.get("/ready")).status_code == 200

            async def gauges(**expected: float) -> str | None:
                text = (await probes.get("/metrics")).text
                found = {k: metric_value(text, "modelium_models", phase=k) for k in expected if k != "up"}
                found["up"] = metric_value(text, "modelium_temporal_up")
                return text if found == expected else None

            await wait_for(lambda: gauges(up=1, loaded=1, unloaded=1), timeout=40, what="the phase gauges")

            assert temporal.pid is not None
            os.killpg(temporal.pid, signal.SIGKILL)
            ready = await wait_for(
                lambda: _status(http.get("/ready"), 503), timeout=10, what="/ready to say Temporal is down"
            )
            assert "Temporal not reachable" in ready.json()["detail"]
            down = await wait_for(lambda: _status(probes.get("/ready"), 503), timeout=10, what="metrics /ready 503")
            assert "Temporal not reachable" in down.json()["detail"]
            assert metric_value((await probes.get("/metrics")).text, "modelium_temporal_up") == 0
            # The loaded model answers from its last known endpoint, every time.
            for _ in range(10):
                answer = await http.post(f"/predict/{loaded}", json=body)
                assert answer.status_code == 200, answer.text
            # A model that must be loaded needs Temporal: refused at once, with Retry-After.
            started = time.monotonic()
            refused = await http.post(f"/predict/{resting}", json=body)
            elapsed = time.monotonic() - started
            assert refused.status_code == 503 and "Retry-After" in refused.headers, refused.text
            assert refused.json()["error"]["type"] == "control_plane_unavailable"
            assert elapsed < 1.0, f"a request that needs Temporal waited {elapsed:.1f}s for its 503"
            started = time.monotonic()
            assert (await http.get("/models")).status_code == 503
            assert time.monotonic() - started < 1.0

            # Temporal back on the same database: ready again without any restart of the gateway.
            await temporal.start()
            await wait_for(lambda: _status(http.get("/ready"), 200), timeout=30, what="/ready again")
            await wait_for(lambda: _status(probes.get("/ready"), 200), timeout=30, what="metrics /ready again")
            assert metric_value((await probes.get("/metrics")).text, "modelium_temporal_up") == 1
            await probes.aclose()
            answer = await wait_for(
                lambda: _status(http.post(f"/predict/{resting}", json=body), 200),
                timeout=120,
                what=f"{resting} loaded again once Temporal is back",
            )
            assert answer.json()["model"] == resting
    finally:
        temporal.stop()


async def _status(request: object, status: int) -> httpx.Response | None:
    response: httpx.Response = await request  # type: ignore[misc]
    return response if response.status_code == status else None


def _config(tmp_path: Path) -> tuple[Path, str, Path]:
    served = serve_config(tmp_path)
    return served.path, served.gateway, served.state


def _temporal_pid(state: Path) -> int:
    return int(json.loads((state / "temporal" / "records" / "temporal-server.json").read_text())["pid"])


def test_serve_restarts_its_temporal_and_survives_its_own_sigkill(tmp_path: Path, demo_models: dict[str, Path]) -> None:
    config, base, state = _config(tmp_path)
    log = tmp_path / "serve.log"
    body = {"prompt": "Hello", "max_tokens": 4}
    proc = start_serve(tmp_path, config, log)
    try:
        wait_while_running(lambda: httpx.get(f"{base}/ready").status_code == 200, 90, "ready", proc, log)
        copy_model(demo_models["text-generation"], tmp_path / "incoming" / "tiny")
        wait_while_running(
            lambda: httpx.post(f"{base}/predict/tiny", json=body, timeout=30).status_code == 200,
            120,
            "first answer",
            proc,
            log,
        )
        runtime = httpx.get(f"{base}/models/tiny").json()["endpoint"]["pid"]

        # A second `serve` on the same folder while this one runs is refused, and touches nothing.
        before = _temporal_pid(state)
        second = subprocess.run(
            [sys.executable, "-m", "cli", "--config", str(config), "serve"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 1 and "another `modelium serve`" in second.stderr, second.stderr
        assert _temporal_pid(state) == before and pid_alive(before)
        assert httpx.get(f"{base}/ready").status_code == 200

        # Temporal killed: serving goes on, and `serve` starts it again on the same database.
        first = _temporal_pid(state)
        os.kill(first, signal.SIGKILL)
        for _ in range(5):
            assert httpx.post(f"{base}/predict/tiny", json=body, timeout=30).status_code == 200
        wait_while_running(
            lambda: _temporal_pid(state) != first and httpx.get(f"{base}/ready").status_code == 200,
            30,
            "Temporal restarted and ready",
            proc,
            log,
        )
        assert not pid_alive(first), "the killed Temporal must be reaped, not left a zombie"
        assert "starting it again" in log.read_text()
        wait_while_running(
            lambda: (r := httpx.get(f"{base}/models/tiny")).status_code == 200 and r.json()["request_count"] >= 6,
            30,
            "the requests served during the outage counted",
            proc,
            log,
        )

        # `serve` itself killed outright: Temporal and the runtime live on ...
        second = _temporal_pid(state)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert pid_alive(second) and pid_alive(runtime)
    except BaseException:
        interrupt(proc)
        raise

    # ... and `serve` started again in the same folder adopts them instead of refusing to start.
    proc = start_serve(tmp_path, config, log)
    try:
        wait_while_running(lambda: httpx.get(f"{base}/ready").status_code == 200, 90, "ready after SIGKILL", proc, log)
        wait_while_running(
            lambda: httpx.post(f"{base}/predict/tiny", json=body, timeout=30).status_code == 200,
            120,
            "answer after SIGKILL",
            proc,
            log,
        )
        assert _temporal_pid(state) == second, "the running Temporal is adopted, not replaced"
        info = httpx.get(f"{base}/models/tiny").json()
        assert info["endpoint"]["pid"] == runtime and info["load_count"] == 1
        assert runtime_pids("tiny", under=tmp_path) == [runtime], "exactly one runtime serves the model"
    finally:
        code = interrupt(proc)
    assert code == 0, log.read_text()[-3000:]
    assert not pid_alive(second) and not pid_alive(runtime)
    assert processes_of_state(tmp_path) == []
