"""`modelium serve` and the single-part commands: every process of the design, wired together.

`serve` runs, in one process tree: the embedded Temporal (unless `temporal.address` is set), the
control worker, this machine's node agent, the gateway, the metrics endpoint and the folder
watcher. SIGINT/SIGTERM stop all of it, runtime processes included.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import uvicorn
from temporalio.client import Client
from temporalio.service import RPCError

from api.app import create_app
from api.control_plane import ControlPlane
from api.temporal_client import connect_temporal
from modelium.config import Settings
from modelium.gpu import GpuReader
from modelium.metrics import Metrics
from workers.control import control_worker, count_models
from workers.node import NodeAgent, announce_forever, leave, node_agent, reconcile_node, watch_processes
from workers.temporal_server import EmbeddedTemporal, ensure_search_attributes
from workers.watch import WorkflowBridge, folder_watcher

log = logging.getLogger(__name__)


class _Gateway(uvicorn.Server):
    """uvicorn's server, woken once a second rather than ten times while it serves (its Date
    header changes once a second; at 10,000 idle models those wake-ups were a quarter of
    `serve`'s CPU), and at once when told to stop."""

    _stop_asked: asyncio.Event | None = None
    _loop: asyncio.AbstractEventLoop | None = None

    @property  # type: ignore[override]
    def should_exit(self) -> bool:
        return self._should_exit

    @should_exit.setter
    def should_exit(self, value: bool) -> None:
        self._should_exit = value
        if value and self._stop_asked is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._stop_asked.set)

    async def main_loop(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_asked = asyncio.Event()
        counter = 0
        # on_tick renews the Date header when its counter is a multiple of 10.
        while not await self.on_tick(counter):
            counter = (counter + 10) % 864000
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_asked.wait(), timeout=1.0)

    # The composition root owns the signals; uvicorn must not take them over.
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass
class Running:
    """Handles a caller (the CLI, a test) may use while `serve` runs."""

    client: Client
    metrics: Metrics
    node: NodeAgent | None = None
    gateway: _Gateway | None = None
    metrics_port: int | None = None
    temporal: EmbeddedTemporal | None = None

    @property
    def gateway_port(self) -> int | None:
        if self.gateway is None or not self.gateway.servers:
            return None
        return int(self.gateway.servers[0].sockets[0].getsockname()[1])


@contextlib.asynccontextmanager
async def temporal_client(
    settings: Settings, embedded_ok: bool = True
) -> AsyncIterator[tuple[Client, EmbeddedTemporal | None]]:
    """Connect to `temporal.address`; or, when it is unset, start the embedded dev server (only
    `serve` may: the single-part commands connect to the one `serve` or a cluster runs)."""
    if settings.temporal.address or not embedded_ok:
        client = await connect_temporal(settings)
        await ensure_search_attributes(client)
        yield client, None
        return
    embedded = EmbeddedTemporal(
        settings.state_dir / "temporal",
        settings.temporal.port,
        settings.temporal.ui_port,
        settings.temporal.ui,
        settings.temporal.namespace,
    )
    client = await embedded.start(settings.temporal.startup_timeout_seconds)
    try:
        # Its --search-attribute flags register only on a new database: one made by an older
        # version lacks the attributes added since, and an upsert of those would fail.
        await ensure_search_attributes(client)
        yield client, embedded
    finally:
        await asyncio.to_thread(embedded.stop)


def install_stop_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)


async def _until_stopped(stop: asyncio.Event, tasks: list[asyncio.Task[Any]]) -> None:
    """Wait for `stop`, or for any part to end on its own (which is an error: it stops all)."""
    stopper = asyncio.create_task(stop.wait(), name="stop")
    done, _ = await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    for task in done:
        if task is not stopper and not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]


async def serve(
    settings: Settings,
    stop: asyncio.Event,
    *,
    gateway: bool = True,
    control: bool = True,
    node: bool = True,
    watch: bool = True,
    on_ready: Callable[[Running], Awaitable[None] | None] | None = None,
    client: Client | None = None,
    gpu: GpuReader | None = None,
) -> None:
    """`gpu` replaces the node agent's NVML reading (tests on machines without a GPU)."""
    metrics = Metrics()
    async with contextlib.AsyncExitStack() as stack:
        embedded = None
        if client is None:
            everything = control and node and watch and gateway
            client, embedded = await stack.enter_async_context(temporal_client(settings, embedded_ok=everything))
        assert client is not None
        running = Running(client=client, metrics=metrics, temporal=embedded)
        if gateway:
            _check_port(settings.gateway.host, settings.gateway.port, "gateway.port")
        # One probe of Temporal per process: the gateway's /ready, the metrics port's /ready (the
        # probe of a worker or watcher container) and modelium_temporal_up all read it.
        control_plane = ControlPlane(client, gauge=metrics.temporal_up)
        control_plane.start()
        stack.push_async_callback(control_plane.stop)
        if settings.metrics.enabled:
            _check_port(settings.metrics.host, settings.metrics.port, "metrics.port")

            def not_ready() -> str | None:
                return None if control_plane.available else control_plane.unreachable_detail

            server = metrics.serve(settings.metrics.host, settings.metrics.port, ready=not_ready)
            stack.callback(server.shutdown)
            running.metrics_port = server.server_port
        # Long-lived parts: if one ends on its own, everything stops. One-shot jobs may finish.
        tasks: list[asyncio.Task[Any]] = []
        one_shot: list[asyncio.Task[Any]] = []
        if embedded is not None:
            # Unwinds before the server is stopped: nothing starts it again during shutdown.
            supervisor = asyncio.create_task(embedded.supervise(), name="temporal-supervisor")
            tasks.append(supervisor)
            stack.callback(supervisor.cancel)
        if control:
            try:
                models = await count_models(client, settings)
            except RPCError as exc:
                log.warning("could not count the models (%s); the control worker gets default sizes", exc.message)
                models = 0
            worker = control_worker(client, settings, metrics, models=models)
            tasks.append(asyncio.create_task(worker.run(), name="control-worker"))
            stack.push_async_callback(worker.shutdown)
        if node:
            agent = node_agent(client, settings, metrics, gpu)
            running.node = agent
            # Before any load can arrive: a runtime a killed agent left running is taken over,
            # not started twice.
            await agent.adopt_runtimes()
            agent.start_warm_pool()
            announcer = asyncio.create_task(
                announce_forever(
                    client,
                    agent,
                    settings.temporal.control_task_queue,
                    settings.node.announce_seconds,
                    settings.node.lost_after_seconds,
                ),
                name="node-announce",
            )
            tasks.append(announcer)
            process_watch = asyncio.create_task(
                watch_processes(client, agent, settings.node.process_check_seconds), name="process-watch"
            )
            tasks.append(process_watch)
            stack.callback(process_watch.cancel)
            stack.push_async_callback(leave, client, agent, "node agent stopped")
            stack.callback(announcer.cancel)
            # Runs after the worker stops (callbacks unwind in reverse): nothing left running.
            stack.push_async_callback(agent.shutdown_runtimes)
            tasks.append(asyncio.create_task(agent.worker.run(), name="node-agent"))
            stack.push_async_callback(agent.worker.shutdown)
            one_shot.append(asyncio.create_task(reconcile_node(client, agent), name="reconcile"))
        if gateway:
            app = create_app(settings, client=client, metrics=metrics, control=control_plane)
            config = uvicorn.Config(
                app,
                host=settings.gateway.host,
                port=settings.gateway.port,
                log_level="warning",
                access_log=False,
                lifespan="on",
            )
            server_ = _Gateway(config)
            running.gateway = server_
            gateway_task = asyncio.create_task(server_.serve(), name="gateway")
            tasks.append(gateway_task)

            async def _stop_gateway() -> None:
                server_.should_exit = True
                await gateway_task

            stack.push_async_callback(_stop_gateway)
            await _wait_started(server_, gateway_task)
            log.info("gateway on http://%s:%s", settings.gateway.host, running.gateway_port)
        if watch:
            bridge = WorkflowBridge(client, settings)
            try:
                known = await bridge.learn_running()
            except RPCError as exc:
                log.warning("could not list running models (%s); every model folder is handed over again", exc.message)
            else:
                log.info("%d model(s) already have a workflow; unchanged folders are not signalled", known)
            watcher = folder_watcher(settings, bridge)
            watch_stop = asyncio.Event()
            watch_task = asyncio.create_task(watcher.run(watch_stop), name="watcher")
            tasks.append(watch_task)

            async def _stop_watcher() -> None:
                watch_stop.set()
                await watch_task

            stack.push_async_callback(_stop_watcher)

            async def _remove_vanished() -> None:
                await watcher.wait_scanned()
                await bridge.remove_vanished(watcher)

            one_shot.append(asyncio.create_task(_remove_vanished(), name="remove-vanished"))
        if on_ready is not None:
            result = on_ready(running)
            if asyncio.iscoroutine(result):
                await result
        for task in one_shot:
            task.add_done_callback(_log_failure)
            stack.callback(task.cancel)  # still running at shutdown: not worth waiting for
        await _until_stopped(stop, tasks)
        log.info("stopping")


class PortInUse(OSError):
    pass


def _check_port(host: str, port: int, key: str) -> None:
    if port == 0:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise PortInUse(
                f"{key}: cannot listen on {host}:{port} ({exc.strerror}); choose another with "
                f"--config or MODELIUM_{key.upper().replace('.', '__')}"
            ) from None


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("%s failed: %s", task.get_name(), task.exception())


async def _wait_started(server: uvicorn.Server, task: asyncio.Task[Any]) -> None:
    while not server.started:
        if task.done():
            task.result()  # re-raises why it could not start (port in use, ...)
            raise RuntimeError("the gateway stopped before it started")
        await asyncio.sleep(0.05)
