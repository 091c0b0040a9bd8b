"""What every runtime that runs as one process per model shares (the embedded runtime, vLLM):
start in its own process group on a port, wait until healthy, record it so that a node agent
started after this one was killed adopts it, check its health, stop it and everything it spawned.

A subclass says how to run one model (`argv`, `env`, `protocol`) and what healthy means.
"""

from __future__ import annotations

import asyncio
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from modelium.gpu import process_tree
from modelium.names import model_of
from modelium.runtimes.base import Progress, RuntimeStartError, RuntimeUnhealthy
from modelium.runtimes.process import ManagedProcess, free_port, runtime_http
from modelium.runtimes.records import RuntimeRecords
from modelium.types import Endpoint, EndpointProtocol, LoadRequest

log = logging.getLogger(__name__)

# A warm-up request is one token; a runtime that takes longer than this is measured without it.
WARM_UP_TIMEOUT = 60.0


class ProcessRuntime(ABC):
    name = "process"

    def __init__(
        self,
        node: str,
        log_dir: Path,
        *,
        host: str = "127.0.0.1",
        advertise: str | None = None,
        load_timeout_seconds: float = 600.0,
        state_dir: Path | None = None,
    ) -> None:
        self._node = node
        self._log_dir = log_dir
        # Runtimes listen on `host`; their endpoints name `advertise` (how gateways reach this node).
        self._host = host
        self._advertise = advertise or host
        self._load_timeout = load_timeout_seconds
        self._procs: dict[str, tuple[ManagedProcess, Endpoint]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        # One record per started model, so that a node agent started after this one was killed
        # adopts the processes that outlived it, or stops them (None: nothing is recorded).
        self._records = RuntimeRecords(state_dir) if state_dir is not None else None

    # -- what a runtime says -------------------------------------------------------------------
    @abstractmethod
    def argv(self, request: LoadRequest, port: int) -> list[str]:
        """The command that serves `request.model` on `port`."""

    def env(self, request: LoadRequest) -> dict[str, str]:
        """Variables added to this process's environment for the runtime."""
        return {}

    @abstractmethod
    def protocol(self, request: LoadRequest) -> EndpointProtocol:
        """The protocol the model's endpoint speaks."""

    def port(self) -> int:
        """A free port for the next model."""
        return free_port(self._host)

    async def probe(self, endpoint: Endpoint, model: str) -> None:
        """Raise RuntimeUnhealthy unless the model answers at `endpoint`."""
        await _get_ok(f"{endpoint.url}/health")

    async def after_stop(self, model: str, pids: set[int]) -> None:
        """Called once the process group (`pids`, as it was before the stop) is gone: e.g. to
        confirm that its GPU memory came back."""
        log.debug("%s: %s (pids %s) is gone", self.name, model, sorted(pids))

    # -- the adapter interface -----------------------------------------------------------------
    def _lock(self, model: str) -> asyncio.Lock:
        return self._locks.setdefault(model, asyncio.Lock())

    def running(self) -> list[str]:
        return [m for m, (proc, _) in self._procs.items() if proc.alive()]

    def process(self, model: str) -> ManagedProcess | None:
        entry = self._procs.get(model)
        return entry[0] if entry else None

    def endpoint(self, model: str) -> Endpoint | None:
        """Where a running instance answers (None when it does not run)."""
        entry = self._procs.get(model)
        return entry[1] if entry is not None and entry[0].alive() else None

    def ports_in_use(self) -> set[int]:
        return {int(e.url.rsplit(":", 1)[1]) for _, e in self._procs.values()}

    def log_path(self, model: str) -> Path:
        return self._log_dir / f"{model}.log"

    async def start(self, request: LoadRequest, progress: Progress) -> Endpoint:
        async with self._lock(request.model):
            existing = self._procs.get(request.model)
            if existing is not None:
                proc, endpoint = existing
                if proc.alive() and proc.serves == self.argv(request, int(endpoint.url.rsplit(":", 1)[1])):
                    try:
                        await self.probe(endpoint, request.model)
                        return endpoint
                    except RuntimeUnhealthy:
                        pass
                await self._stop_locked(request.model)
            taken = await self.from_pool(request, progress)
            if taken is not None:
                return taken
            port = self.port()
            env = {**self.base_env(), **self.env(request)}
            proc = ManagedProcess(self.argv(request, port), self.log_path(request.model), env=env)
            try:
                proc.start()
            except OSError as exc:
                raise RuntimeStartError(
                    f"{self.name} could not be started ({proc.argv[0]}): {exc}", retryable=False
                ) from None
            endpoint = Endpoint(
                f"http://{self._advertise}:{port}", self.protocol(request), self.name, self._node, proc.pid
            )
            # Recorded before it is healthy: a node agent killed while this model loads must not
            # leave it behind.
            self.track(request.model, proc, endpoint)
            try:
                await self._wait_healthy(proc, endpoint, request.model, progress)
            except BaseException:
                # Cancelled or failed: never leave a half-started process behind.
                await self._stop_locked(request.model)
                raise
            log.info("%s serves %s at %s (pid %s)", self.name, request.model, endpoint.url, proc.pid)
            return endpoint

    async def from_pool(self, request: LoadRequest, progress: Progress) -> Endpoint | None:
        """Serve `request` from a process started ahead of it (a warm pool), called with the
        model's lock held; None (the default) starts a process for it."""
        return None

    @staticmethod
    def base_env() -> dict[str, str]:
        """The environment of every runtime process, before the model's own variables."""
        # Never reach for a model hub: everything is read from the model directory.
        return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}

    def track(self, model: str, proc: ManagedProcess, endpoint: Endpoint) -> None:
        """`proc` serves `model` from now on: kept, and recorded for the next node agent."""
        self._procs[model] = (proc, endpoint)
        if self._records is not None:
            self._records.save(model, proc, endpoint)

    async def _wait_healthy(self, proc: ManagedProcess, endpoint: Endpoint, model: str, progress: Progress) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._load_timeout
        while True:
            if not proc.alive():
                raise proc.exited()
            try:
                await self.probe(endpoint, model)
                return
            except RuntimeUnhealthy as exc:
                if loop.time() > deadline:
                    raise RuntimeStartError(
                        f"not healthy after {self._load_timeout:.0f}s ({exc}); last lines of "
                        f"{proc.log_path}:\n{proc.log_tail()}"
                    ) from None
            progress(f"waiting for {model} (pid {proc.pid})", proc.last_line())
            await asyncio.sleep(0.25)

    async def adopt(self) -> list[str]:
        """Take over the processes an earlier node agent of this node left running (it was killed):
        those still alive, the same process (pid, start time, command line) and healthy. Others are
        stopped and forgotten. Returns the adopted models."""
        if self._records is None:
            return []
        adopted = []
        for model, record in self._records.load().items():
            proc = ManagedProcess.adopt(record.pid, record.argv, self.log_path(model), record.started_at)
            proc.serves = record.serves or record.argv
            if record.same_process():
                try:
                    await self.probe(record.endpoint, model)
                except RuntimeUnhealthy as exc:
                    log.warning("not adopting %s (pid %s): %s; stopping it", model, record.pid, exc)
                    await asyncio.to_thread(proc.stop)
                else:
                    self._procs[model] = (proc, record.endpoint)
                    adopted.append(model)
                    log.info(
                        "adopted %s at %s (pid %s), left running by an earlier node agent",
                        model,
                        record.endpoint.url,
                        record.pid,
                    )
                    continue
            self._records.remove(model)
        return adopted

    async def warm_up(self, endpoint: Endpoint, model: str) -> bool:
        """One smallest real request (one token, or one short input), so that memory measured
        afterwards includes what the first inference maps and allocates. False when this
        protocol has no request that needs no model-specific input."""
        try:
            return await self.smoke(endpoint, model)
        except RuntimeUnhealthy as exc:
            log.warning("warm-up request to %s failed: %s", model, exc)
            return False

    async def smoke(self, endpoint: Endpoint, model: str) -> bool:
        return await smallest_request(endpoint, model)

    async def in_flight(self, endpoint: Endpoint, model: str) -> int | None:
        return await reported_in_flight(endpoint)

    async def check_health(self, model: str) -> None:
        entry = self._procs.get(model)
        if entry is None:
            raise RuntimeUnhealthy(f"{model} is not running on node {self._node}")
        proc, endpoint = entry
        if not proc.alive():
            code = proc.exit_code()
            raise RuntimeUnhealthy(f"{model}'s process {proc.pid} exited" + (f" with code {code}" if code else ""))
        await self.probe(endpoint, model)

    def dead(self) -> dict[str, int | None]:
        """Models whose process exited without being stopped (crashed, killed), with its pid."""
        return {m: proc.pid for m, (proc, _) in self._procs.items() if not proc.alive()}

    async def stop(self, model: str) -> bool:
        async with self._lock(model):
            return await self._stop_locked(model)

    async def _stop_locked(self, model: str) -> bool:
        entry = self._procs.pop(model, None)
        if entry is None:
            return False
        proc = entry[0]
        pids = process_tree(proc.pid) if proc.pid is not None and proc.alive() else set()
        await asyncio.to_thread(proc.stop)
        if self._records is not None:
            self._records.remove(model)
        await self.after_stop(model, pids | ({proc.pid} if proc.pid else set()))
        log.info("%s stopped %s (pid %s)", self.name, model, proc.pid)
        return True

    async def stop_all(self) -> None:
        await asyncio.gather(*(self.stop(model) for model in list(self._procs)))


async def smallest_request(endpoint: Endpoint, model: str) -> bool:
    """The smallest real request, checked: one token from a fixed prompt (OpenAI protocol),
    or one short input (`/predict`). Raises RuntimeUnhealthy with what went wrong; False when
    the protocol has no request that needs no model-specific input (nothing was sent)."""
    if endpoint.protocol == EndpointProtocol.OPENAI:
        url, body = f"{endpoint.url}/v1/completions", {"model": model_of(model), "prompt": "Hello", "max_tokens": 1}
    elif endpoint.protocol == EndpointProtocol.MODELIUM_JSON:
        url, body = f"{endpoint.url}/predict", {"inputs": "Hello"}
    else:
        return False
    response = await post_expecting(url, body)
    try:
        answer = response.json()
    except ValueError:
        raise RuntimeUnhealthy(f"{url} answered 200 with no JSON: {response.text[:200]}") from None
    wanted = "choices" if endpoint.protocol == EndpointProtocol.OPENAI else "output"
    if not isinstance(answer, dict) or wanted not in answer or answer[wanted] in ([], None):
        raise RuntimeUnhealthy(f"{url} answered 200 without an answer: {response.text[:200]}")
    return True


async def reported_in_flight(endpoint: Endpoint) -> int | None:
    """Requests the runtime is answering now, as its `/health` tells (the embedded runtime and
    Modelium's Ray Serve application do); None when it does not say."""
    try:
        answer = (await _get_ok(f"{endpoint.url}/health")).json()
    except (RuntimeUnhealthy, ValueError):
        return None
    count = answer.get("in_flight") if isinstance(answer, dict) else None
    return count if isinstance(count, int) and not isinstance(count, bool) else None


async def _get_ok(url: str, timeout: float = 5.0) -> httpx.Response:
    try:
        async with runtime_http(timeout) as client:
            response = await client.get(url)
    except httpx.TransportError as exc:
        raise RuntimeUnhealthy(f"{url} does not answer: {exc}") from exc
    if response.status_code != 200:
        raise RuntimeUnhealthy(f"{url} answered {response.status_code}")
    return response


async def post_expecting(
    url: str, body: dict[str, Any], status: int = 200, timeout: float = WARM_UP_TIMEOUT
) -> httpx.Response:
    """POST `body` to a runtime; RuntimeUnhealthy unless it answers with `status` (a smoke
    check's request: the default one, or a model's own; vLLM's sleep and wake)."""
    try:
        async with runtime_http(timeout) as client:
            response = await client.post(url, json=body)
    except httpx.HTTPError as exc:
        raise RuntimeUnhealthy(f"{url} did not answer: {exc or type(exc).__name__}") from None
    if response.status_code != status:
        expected = "" if status == 200 else f", not {status}"
        raise RuntimeUnhealthy(f"{url} answered {response.status_code}{expected}: {response.text[:200]}")
    return response


async def probe_openai(endpoint: Endpoint, model: str, health_path: str = "/health") -> None:
    """Healthy for an OpenAI-compatible server: `/health` answers and `/v1/models` lists the model."""
    await _get_ok(f"{endpoint.url}{health_path}")
    listed = await _get_ok(f"{endpoint.url}/v1/models")
    try:
        ids: Sequence[str] = [m["id"] for m in listed.json()["data"]]
    except (ValueError, KeyError, TypeError):
        raise RuntimeUnhealthy(f"{endpoint.url}/v1/models did not answer a model list") from None
    if model not in ids:
        raise RuntimeUnhealthy(f"{endpoint.url}/v1/models does not list {model} (it lists {', '.join(ids)})")
