"""Run `modelium serve` as a user would, for benchmarks: a subprocess with its own config, the
embedded Temporal and free ports; stopped with Ctrl-C (SIGINT) as a user would stop it."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from modelium.runtimes.process import free_port


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    url: str
    metrics_url: str
    incoming: Path
    startup_seconds: float


@contextlib.contextmanager
def modelium_serve(workdir: Path, tag: str, **config: Any) -> Iterator[Served]:
    gw, tp, ui, mp = (free_port() for _ in range(4))
    incoming = workdir / f"incoming-{tag}"
    incoming.mkdir(parents=True, exist_ok=True)
    base: dict[str, Any] = {
        "state_dir": str(workdir / f"state-{tag}"),
        "temporal": {"port": tp, "ui_port": ui, "ui": False},
        "gateway": {"port": gw},
        "metrics": {"port": mp},
        "orchestration": {"model_discovery": {"watch_directories": [str(incoming)]}},
    }
    for key, value in config.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    path = workdir / f"modelium-{tag}.yaml"
    path.write_text(yaml.safe_dump(base))
    log = (workdir / f"serve-{tag}.log").open("wb")
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "--config", str(path), "serve"],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=workdir,
    )
    url = f"http://127.0.0.1:{gw}"
    try:
        with httpx.Client(timeout=30) as http:
            while True:
                with contextlib.suppress(httpx.TransportError):
                    if http.get(f"{url}/ready").status_code == 200:
                        break
                if proc.poll() is not None:
                    raise SystemExit(f"modelium serve exited; see {log.name}")
                time.sleep(0.05)
        yield Served(proc, url, f"http://127.0.0.1:{mp}/metrics", incoming, time.monotonic() - started)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        log.close()


def wait_phase(url: str, model: str, phase: str, timeout: float = 180.0) -> dict[str, Any]:
    """Poll GET /models/{model} until it is in `phase`; return what it says then."""
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=30) as http:
        while time.monotonic() < deadline:
            response = http.get(f"{url}/models/{model}")
            if response.status_code == 200 and response.json()["phase"] == phase:
                return response.json()  # type: ignore[no-any-return]
            time.sleep(0.1)
    raise SystemExit(f"{model} did not reach {phase} within {timeout:.0f}s")
