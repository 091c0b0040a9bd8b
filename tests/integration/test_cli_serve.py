"""`modelium serve` as a user runs it: one command, its own embedded Temporal, Ctrl-C stops all,
and a restart keeps every workflow (SQLite under the state directory)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from modelium.runtimes.process import free_port, pid_alive
from tests.conftest import copy_model
from tests.test_deploy import dashboard_metrics, exported_metrics

pytestmark = pytest.mark.slow


def _start(tmp_path: Path, config: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "cli", "--config", str(config), "serve"],
        cwd=tmp_path,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _wait(predicate, timeout: float, what: str, proc: subprocess.Popen[bytes], log: Path):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"modelium serve exited early:\n{log.read_text()[-3000:]}"
        try:
            result = predicate()
        except httpx.TransportError:
            result = None
        if result:
            return result
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}; log:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGINT)
    return proc.wait(timeout=60)


def _children_of_state(state_dir: Path) -> list[str]:
    """Processes still running that belong to this test's Modelium (by their state dir)."""
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if str(state_dir) in line]


def test_serve_one_command_ctrl_c_and_restart(tmp_path: Path, demo_models: dict[str, Path]) -> None:
    gw, tp, ui, mp = (free_port() for _ in range(4))
    state = tmp_path / "state"
    config = tmp_path / "modelium.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "state_dir": str(state),
                "temporal": {"port": tp, "ui_port": ui},
                "gateway": {"port": gw},
                "metrics": {"port": mp},
                "orchestration": {
                    "model_discovery": {"watch_directories": [str(tmp_path / "incoming")], "settle_seconds": 0.5}
                },
            }
        )
    )
    log = tmp_path / "serve.log"
    base = f"http://127.0.0.1:{gw}"
    proc = _start(tmp_path, config, log)
    try:
        _wait(lambda: httpx.get(f"{base}/ready").status_code == 200, 90, "ready", proc, log)
        assert httpx.get(f"http://127.0.0.1:{ui}/").status_code == 200  # Temporal Web UI
        copy_model(demo_models["text-generation"], tmp_path / "incoming" / "tiny")
        body = {"prompt": "Hello", "max_tokens": 4}
        answer = _wait(
            lambda: (r := httpx.post(f"{base}/predict/tiny", json=body, timeout=30)).status_code == 200 and r.json(),
            120,
            "first answer",
            proc,
            log,
        )
        assert answer["runtime"] == "embedded"
        # Every metric the Grafana dashboard (deploy/grafana/modelium.json) asks for is exported.
        exported = exported_metrics(httpx.get(f"http://127.0.0.1:{mp}/metrics").text)
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
                f"127.0.0.1:{tp}",
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
        code = _stop(proc)
    assert code == 0, log.read_text()[-3000:]
    assert not pid_alive(pid)
    assert _children_of_state(tmp_path) == []

    # Restart on the same state directory: the workflow is still there and serves again.
    proc = _start(tmp_path, config, log)
    try:
        _wait(lambda: httpx.get(f"{base}/ready").status_code == 200, 90, "ready again", proc, log)
        info = _wait(
            lambda: (r := httpx.get(f"{base}/models/tiny")).status_code == 200 and r.json(),
            30,
            "model known after restart",
            proc,
            log,
        )
        assert info["request_count"] >= 1  # remembered across the restart
        _wait(
            lambda: httpx.post(f"{base}/predict/tiny", json=body, timeout=30).status_code == 200,
            120,
            "answer after restart",
            proc,
            log,
        )
        assert httpx.get(f"{base}/models/tiny").json()["load_count"] == 2
    finally:
        code = _stop(proc)
    assert code == 0
    assert _children_of_state(tmp_path) == []
