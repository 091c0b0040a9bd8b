"""One server process that holds many models of a node (a tritonserver, a local Ray head): started
once in its own process group, recorded so that a node agent started after this one was killed
adopts it, and stopped with the node agent."""

from __future__ import annotations

import abc
import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

import httpx

from modelium.runtimes.base import Progress, RuntimeUnhealthy
from modelium.runtimes.process import ManagedProcess, loopback_for, runtime_http
from modelium.runtimes.records import RuntimeRecords
from modelium.types import Endpoint, EndpointProtocol

log = logging.getLogger(__name__)


async def answers(url: str, timeout: float = 10.0) -> bool:
    """True when a GET of `url` answers 200."""
    try:
        async with runtime_http(timeout) as http:
            return (await http.get(url)).status_code == 200
    except httpx.TransportError:
        return False


class SharedServer:
    def __init__(
        self, key: str, records: RuntimeRecords, log_path: Path, runtime: str, node: str, protocol: EndpointProtocol
    ) -> None:
        self._key = key
        self._records = records
        self._log_path = log_path
        self._runtime = runtime
        self._node = node
        self._protocol = protocol
        self.proc: ManagedProcess | None = None
        # Where the server answers (its base URL); set once started or adopted.
        self.url: str | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def log_path(self) -> Path:
        return self._log_path

    def exited(self) -> bool:
        """True when this node agent's server process ran and is gone."""
        return self.proc is not None and not self.proc.alive()

    async def start(
        self,
        argv: list[str],
        url: str,
        health_url: str,
        timeout: float,
        progress: Progress,
        env: Mapping[str, str] | None = None,
    ) -> None:
        """Start it, record it, and wait until `health_url` answers; on failure nothing is left."""
        self.proc = ManagedProcess(argv, self._log_path, env=env)
        self.proc.start()
        self.url = url
        self._records.save(
            self._key, self.proc, Endpoint(url, self._protocol, self._runtime, self._node, self.proc.pid)
        )
        try:
            await self.proc.wait_healthy(
                health_url, timeout, tick=lambda line: progress(f"waiting for {argv[0]}", line)
            )
        except BaseException:
            await self.stop()
            raise
        log.info("%s runs at %s (pid %s)", Path(argv[0]).name, url, self.proc.pid)

    async def adopt(self, answers: Callable[[str], Awaitable[bool]]) -> bool:
        """Take over the server an earlier node agent started, if it is the same process (pid, start
        time, command line) and `answers(url)`; otherwise stop it and forget it."""
        record = self._records.load().get(self._key)
        if record is None:
            return False
        proc = ManagedProcess.adopt(record.pid, record.argv, self._log_path, record.started_at)
        same = record.same_process()
        if same and await answers(record.endpoint.url):
            self.proc, self.url = proc, record.endpoint.url
            log.info("adopted %s at %s (pid %s)", self._key, self.url, record.pid)
            return True
        if same:
            await asyncio.to_thread(proc.stop)
        self._records.remove(self._key)
        return False

    async def stop(self, grace: float = 10.0) -> None:
        if self.proc is not None:
            await asyncio.to_thread(self.proc.stop, grace)
        self._records.remove(self._key)
        self.proc = None


class ServesManyModels(abc.ABC):
    """What an adapter whose one server process serves many models answers the same way: the
    models it serves (`_endpoints`), the ones that died with the server, and a model it already
    serves that still answers (a retried load gets it back instead of loading it twice)."""

    def __init__(self, node: str, host: str, advertise: str | None, server: SharedServer) -> None:
        self._node = node
        # The server listens on `host`; gateways are given `advertise`.
        self._host = host
        self._advertise = advertise or host
        # Where this node itself reaches the server (never the wildcard address).
        self._local = loopback_for(host)
        self._server = server
        self._endpoints: dict[str, Endpoint] = {}
        self._lock = asyncio.Lock()

    @abc.abstractmethod
    async def check_health(self, model: str) -> None:
        """Raise RuntimeUnhealthy unless the server answers for `model`."""

    def running(self) -> list[str]:
        return [] if self._server.exited() else list(self._endpoints)

    def endpoint(self, model: str) -> Endpoint | None:
        """Where a served instance answers (None when the server does not serve it)."""
        return None if self._server.exited() else self._endpoints.get(model)

    def dead(self) -> dict[str, int | None]:
        return dict.fromkeys(self._endpoints, self._server.pid) if self._server.exited() else {}

    def log_path(self, model: str) -> Path:
        """The server's one log: every model it serves writes there."""
        return self._server.log_path

    async def _still_serving(self, model: str) -> Endpoint | None:
        endpoint = self._endpoints.get(model)
        if endpoint is None:
            return None
        try:
            await self.check_health(model)
        except RuntimeUnhealthy:
            self._endpoints.pop(model, None)
            return None
        return endpoint
