"""`modelium serve` as a user runs it: one command, its own embedded Temporal, Ctrl-C stops all,
and a restart keeps every workflow (SQLite under the state directory)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from modelium.runtimes.process import pid_alive
from tests.helpers import (
    copy_model,
    dashboard_metrics,
    exported_metrics,
    interrupt,
    processes_of_state,
    serve_config,
    start_serve,
    wait_while_running,
)

pytestmark = pytest.mark.slow


def test_serve_one_command_ctrl_c_and_restart(tmp_path: Path, demo_models: dict[str, Path]) -> None:
    served = serve_config(tmp_path, ui=True)
    config, base = served.path, served.gateway
    log = tmp_path / "serve.log"
    proc = start_serve(tmp_path, config, log)
    try:
        wait_while_running(lambda: httpx.get(f"{base}/ready").status_code == 200, 90, "ready", proc, log)
        assert httpx.get(f"http://127.0.0.1:{served.ui_port}/").status_code == 200  # Temporal Web UI
        copy_model(demo_models["text-generation"], tmp_path / "incoming" / "tiny")
        body = {"prompt": "Hello", "max_tokens": 4}
        answer = wait_while_running(
            lambda: (r := httpx.post(f"{base}/predict/tiny", json=body, timeout=30)).status_code == 200 and r.json(),
            120,
            "first answer",
            proc,
            log,
        )
        assert answer["runtime"] == "embedded"
        # Every metric the Grafana dashboard (deploy/grafana/modelium.json) asks for is exported.
        exported = exported_metrics(httpx.get(f"{served.metrics}/metrics").text)
        assert dashboard_metrics() - exported == set(), sorted(exported)
        pid = httpx.get(f"{base}/models/tiny").json()["endpoint"]["pid"]
        assert pid_alive(pid)
        # Search attributes are kept current: the Temporal CLI finds the loaded model.
        temporal = Path(sys.executable).parent / "temporal"
        listed = subprocess.run(
            [
                str(temporal),
                "workflow",
                "list",
                "--address",
                served.temporal,
                "--query",
                'ModeliumPhase="loaded"',
                "-o",
                "json",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert "modelium-model-tiny" in listed.stdout, listed.stderr
    finally:
        code = interrupt(proc)
    assert code == 0, log.read_text()[-3000:]
    assert not pid_alive(pid)
    assert processes_of_state(tmp_path) == []

    # Restart on the same state directory: the workflow is still there and serves again.
    proc = start_serve(tmp_path, config, log)
    try:
        wait_while_running(lambda: httpx.get(f"{base}/ready").status_code == 200, 90, "ready again", proc, log)
        info = wait_while_running(
            lambda: (r := httpx.get(f"{base}/models/tiny")).status_code == 200 and r.json(),
            30,
            "model known after restart",
            proc,
            log,
        )
        assert info["request_count"] >= 1  # remembered across the restart
        wait_while_running(
            lambda: httpx.post(f"{base}/predict/tiny", json=body, timeout=30).status_code == 200,
            120,
            "answer after restart",
            proc,
            log,
        )
        assert httpx.get(f"{base}/models/tiny").json()["load_count"] == 2
    finally:
        code = interrupt(proc)
    assert code == 0
    assert processes_of_state(tmp_path) == []
