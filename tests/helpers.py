"""What tests share: polling with a deadline, settings for one test, Modelium run in-process or as
`modelium serve`, runtime processes found by their arguments, metric values, deploy/ as Compose
resolves it. Fixtures live in conftest.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families
from temporalio.client import Client
from temporalio.service import RPCError

from modelium.config import Settings
from modelium.runtimes.process import free_port, pid_alive, process_argv
from workers.serve import Running, serve

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
# ("nvidia", not "gpu": a test id naming the gpu marker would be skipped on machines without one)
COMPOSE_VARIANTS = {"nvidia": [], "cpu": ["compose.cpu.yaml"], "dev": ["compose.dev.yaml"]}


def has_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None or Path("/dev/nvidia0").exists()


async def wait_for(
    probe: Callable[[], Awaitable[T | None]] | Callable[[], T | None],
    timeout: float = 60.0,
    interval: float = 0.2,
    what: str = "condition",
) -> T:
    """Poll `probe` until it returns something truthy; fail with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        result = probe()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result  # type: ignore[return-value]
        last = result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")
        await asyncio.sleep(interval)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def stop_processes(procs: Iterable[subprocess.Popen[bytes]]) -> None:
    """Stop Modelium processes as a service manager would: SIGTERM to all, then wait for each
    (SIGKILL for one that does not stop within a minute)."""
    procs = list(procs)
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def copy_model(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    """Settings for one test: its own state dir, watch dir, task queues and free ports."""
    base: dict[str, Any] = {
        "state_dir": str(tmp_path / "state"),
        "node": {"id": unique("node"), "cpu_memory_budget_bytes": 8 * 2**30},
        "temporal": {"control_task_queue": unique("control")},
        "gateway": {"port": 0, "usage_flush_seconds": 0.2, "endpoint_cache_seconds": 0.5},
        "metrics": {"port": 0},
        "orchestration": {
            "model_discovery": {"watch_directories": [str(tmp_path / "incoming")], "settle_seconds": 0.5},
        },
        # No warm pool unless a test asks for one (tests/integration/test_warm_pool.py): a spare
        # takes a few hundred MB of the budgets tests size for their models, and two cores'
        # worth of seconds to start.
        "runtimes": {"embedded": {"cpu_threads": 1, "warm_pool": 0}},
    }
    return Settings.model_validate(merged(base, overrides))


def merged(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """`a` with `b` laid over it, section by section."""
    out = dict(a)
    for k, v in b.items():
        out[k] = merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@dataclass
class ServeConfig:
    """A modelium.yaml for `modelium serve` as a process, and where its parts listen."""

    path: Path
    state: Path
    gateway: str  # the gateway's base URL
    metrics: str  # the metrics port's base URL
    temporal: str  # the embedded Temporal's address, host:port
    ui_port: int | None


def serve_config(tmp_path: Path, *, ui: bool = False, **sections: Any) -> ServeConfig:
    """Write `tmp_path/modelium.yaml`: its own state dir and watched folder (`tmp_path/incoming`),
    free ports for Temporal, the gateway and metrics (and Temporal's UI with `ui`), and `sections`
    laid over that."""
    gateway, temporal, metrics = free_port(), free_port(), free_port()
    ui_port = free_port() if ui else None
    state = tmp_path / "state"
    base: dict[str, Any] = {
        "state_dir": str(state),
        "temporal": {"port": temporal, **({"ui_port": ui_port} if ui else {"ui": False})},
        "gateway": {"port": gateway},
        "metrics": {"port": metrics},
        "orchestration": {
            "model_discovery": {"watch_directories": [str(tmp_path / "incoming")], "settle_seconds": 0.5}
        },
        "runtimes": {"embedded": {"warm_pool": 0}},  # as in make_settings
    }
    path = tmp_path / "modelium.yaml"
    path.write_text(yaml.safe_dump(merged(base, sections)))
    return ServeConfig(
        path, state, f"http://127.0.0.1:{gateway}", f"http://127.0.0.1:{metrics}", f"127.0.0.1:{temporal}", ui_port
    )


@contextlib.asynccontextmanager
async def running_modelium(
    settings: Settings, client: Client, *, end_workflows: bool = True, **parts: Any
) -> AsyncIterator[Running]:
    """`modelium serve`'s composition, in this process, against the session's Temporal.
    `end_workflows=False` leaves the models' workflows running afterwards (a restart test)."""
    stop = asyncio.Event()
    ready: asyncio.Future[Running] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(settings, stop, client=client, on_ready=ready.set_result, **parts))
    done, _ = await asyncio.wait([task, ready], timeout=60, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()
    running = await ready
    try:
        yield running
    finally:
        stop.set()
        try:
            await asyncio.wait_for(task, timeout=60)
        finally:
            # Also when `serve` failed: its node's workflow, left running, would offer later tests
            # a node nobody serves until it is declared lost.
            if end_workflows:
                await end_workflows_of(client, settings.temporal.control_task_queue)


async def end_workflows_of(client: Client, queue: str) -> None:
    """Workflows outlive their workers; end a test's, so that later tests, which share the Temporal
    server, list no models or nodes that no worker serves any more (a query to one waits out its
    timeout)."""
    async for execution in client.list_workflows('ExecutionStatus="Running"'):
        if execution.task_queue == queue:
            # Visibility lags: a workflow listed as running may have ended meanwhile.
            with contextlib.suppress(RPCError):
                await client.get_workflow_handle(execution.id).terminate("test over")


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text output, or None when absent."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


async def phase_of(http: httpx.AsyncClient, name: str, headers: dict[str, str] | None = None) -> str | None:
    """The model's phase as `GET /models/{name}` tells it, or None while it is unknown."""
    response = await http.get(f"/models/{name}", headers=headers)
    return response.json()["phase"] if response.status_code == 200 else None


async def wait_phase(
    http: httpx.AsyncClient, name: str, phase: str, *, timeout: float = 120.0, headers: dict[str, str] | None = None
) -> dict[str, Any]:
    """Poll the gateway until the model is in `phase`; return its `GET /models/{name}`."""

    async def reached() -> dict[str, Any] | None:
        response = await http.get(f"/models/{name}", headers=headers)
        ok = response.status_code == 200 and response.json()["phase"] == phase
        return response.json() if ok else None  # type: ignore[no-any-return]

    return await wait_for(reached, timeout=timeout, what=f"{name} {phase}")


@contextlib.asynccontextmanager
async def modelium_http(
    settings: Settings, client: Client, timeout: float = 120
) -> AsyncIterator[tuple[Running, httpx.AsyncClient]]:
    """`running_modelium`, and an HTTP client on its gateway."""
    async with running_modelium(settings, client) as running:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{running.gateway_port}", timeout=timeout) as http:
            yield running, http


@contextlib.asynccontextmanager
async def serving_model(
    settings: Settings, client: Client, model_dir: Path, name: str, headers: dict[str, str] | None = None
) -> AsyncIterator[tuple[Running, httpx.AsyncClient]]:
    """`running_modelium` with `model_dir` dropped into its watched folder as `name` and loaded;
    yields the running parts and an HTTP client on the gateway."""
    async with modelium_http(settings, client) as (running, http):
        copy_model(model_dir, settings.watch_directories[0] / name)
        await wait_phase(http, name, "loaded", headers=headers)
        yield running, http


def start_serve(tmp_path: Path, config: Path, log: Path) -> subprocess.Popen[bytes]:
    """`modelium serve` as a user starts it, in `tmp_path`, its output appended to `log`."""
    return subprocess.Popen(
        [sys.executable, "-m", "cli", "--config", str(config), "serve"],
        cwd=tmp_path,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def wait_while_running(
    predicate: Callable[[], T | None], timeout: float, what: str, proc: subprocess.Popen[bytes], log: Path
) -> T:
    """Poll `predicate` (a connection refused counts as not yet) while `proc` runs; fail with its
    log's tail when it exits or `timeout` passes."""

    def running() -> None:
        assert proc.poll() is None, f"modelium serve exited early:\n{log.read_text()[-3000:]}"

    return poll_while_running(predicate, timeout, what, running, lambda: f"log:\n{log.read_text()[-3000:]}")


def poll_while_running(
    predicate: Callable[[], T | None],
    timeout: float,
    what: str,
    running: Callable[[], None],
    logs: Callable[[], str],
) -> T:
    """Poll `predicate` (a connection refused counts as not yet) every 0.25 s; `running` raises
    when a process it needs is gone; on timeout, fail with `logs()`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        running()
        try:
            result = predicate()
        except httpx.TransportError:
            result = None
        if result:
            return result
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}; {logs()}")


def interrupt(proc: subprocess.Popen[bytes]) -> int:
    """Ctrl-C, as a user stops `modelium serve`; its exit code."""
    proc.send_signal(signal.SIGINT)
    return proc.wait(timeout=60)


def processes_of_state(state_dir: Path) -> list[str]:
    """Processes still running that belong to this test's Modelium (by their state dir)."""
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if str(state_dir) in line]


def runtime_pids(model: str, under: Path | None = None) -> list[int]:
    """Pids of every live embedded runtime process serving `model` on this machine (from /proc);
    with `under`, only those whose model directory is inside it (one test's, when tests that
    name their model alike run side by side)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and pid_alive(int(entry.name)):
            argv = process_argv(int(entry.name)) or []
            if "modelium.runtimes.embedded_server" not in argv or argv[argv.index("--name") + 1] != model:
                continue
            if under is None or Path(argv[argv.index("--model-dir") + 1]).is_relative_to(under):
                found.append(int(entry.name))
    return found


def compose(variant: str) -> dict[str, Any]:
    """The compose project as Docker Compose itself resolves it (anchors, overrides, .env)."""
    files = [arg for name in ["compose.yaml", *COMPOSE_VARIANTS[variant]] for arg in ("-f", name)]
    binary = shutil.which("docker-compose", path=str(Path(sys.executable).parent)) or "docker-compose"
    done = subprocess.run(
        [binary, *files, "config", "--format", "json"],
        cwd=DEPLOY / "compose",
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def dashboard_metrics() -> set[str]:
    """Every metric name the dashboard's PromQL asks for."""
    dashboard = json.loads((DEPLOY / "grafana" / "modelium.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    return {name for expr in exprs for name in re.findall(r"\bmodelium_[a-z_]+\b", expr)}


def exported_metrics(text: str) -> set[str]:
    """The series names a Prometheus text page can hold, from its TYPE lines (a family with no
    sample yet is still declared): counters end in _total, histograms have _bucket/_count/_sum."""
    names: set[str] = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, flags=re.M):
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_count", f"{name}_sum"}
        elif kind == "counter":
            names.add(name if name.endswith("_total") else f"{name}_total")
        else:
            names.add(name)
    return names
