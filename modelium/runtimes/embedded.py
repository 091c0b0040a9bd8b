"""The embedded runtime: one process per model, serving it with transformers + PyTorch.

Always available; works on the CPU. Text generation speaks the OpenAI protocol; classification and
embedding models speak Modelium's JSON (`POST /predict {"inputs": ...}`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path

import httpx

from modelium.config import EmbeddedRuntime as EmbeddedConfig
from modelium.runtimes.base import Progress, RuntimeUnhealthy
from modelium.runtimes.process import ManagedProcess, free_port, process_argv, process_start_ticks
from modelium.runtimes.records import RuntimeRecords
from modelium.types import Endpoint, LoadRequest, Protocol, Task

log = logging.getLogger(__name__)

NAME = "embedded"


def protocol_for(task: str) -> str:
    return Protocol.OPENAI if task == Task.TEXT_GENERATION else Protocol.MODELIUM_JSON


class EmbeddedRuntimeAdapter:
    name = NAME

    def __init__(
        self,
        node: str,
        log_dir: Path,
        config: EmbeddedConfig | None = None,
        host: str = "127.0.0.1",
        python: str = sys.executable,
        state_dir: Path | None = None,
    ) -> None:
        self._node = node
        self._log_dir = log_dir
        # One record per running model, so that a node agent started after this one was killed
        # adopts the runtime processes that outlived it (None: nothing is recorded).
        self._records = RuntimeRecords(state_dir) if state_dir is not None else None
        self._config = config or EmbeddedConfig()
        self._host = host
        self._python = python
        self._procs: dict[str, tuple[ManagedProcess, Endpoint]] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def _lock(self, model: str) -> asyncio.Lock:
        return self._locks.setdefault(model, asyncio.Lock())

    def running(self) -> list[str]:
        return [m for m, (proc, _) in self._procs.items() if proc.alive()]

    def process(self, model: str) -> ManagedProcess | None:
        entry = self._procs.get(model)
        return entry[0] if entry else None

    def _device(self, booked: str) -> str:
        configured = self._config.device
        return booked if configured == "auto" else configured

    def _argv(self, request: LoadRequest, port: int) -> list[str]:
        argv = [
            self._python, "-m", "modelium.runtimes.embedded_server",
            "--model-dir", request.path,
            "--name", request.model,
            "--task", request.task,
            "--host", self._host,
            "--port", str(port),
            "--device", self._device(request.booking.device),
        ]  # fmt: skip
        if self._config.cpu_threads:
            argv += ["--threads", str(self._config.cpu_threads)]
        return argv

    async def start(self, request: LoadRequest, progress: Progress) -> Endpoint:
        async with self._lock(request.model):
            existing = self._procs.get(request.model)
            if existing is not None:
                proc, endpoint = existing
                if proc.alive() and proc.argv[proc.argv.index("--model-dir") + 1] == request.path:
                    try:
                        await self._probe(endpoint)
                        return endpoint
                    except RuntimeUnhealthy:
                        pass
                await asyncio.to_thread(proc.stop)
                self._procs.pop(request.model, None)
            port = free_port(self._host)
            env = dict(os.environ)
            # Never reach for a model hub: everything is read from the model directory.
            env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
            if request.booking.device.startswith("cuda:"):
                env["CUDA_VISIBLE_DEVICES"] = request.booking.device.split(":", 1)[1]
            proc = ManagedProcess(self._argv(request, port), self._log_dir / f"{request.model}.log", env=env)
            proc.start()
            url = f"http://{self._host}:{port}"
            endpoint = Endpoint(
                url=url,
                protocol=protocol_for(request.task),
                runtime=NAME,
                node=self._node,
                pid=proc.pid,
            )
            try:
                await proc.wait_healthy(
                    f"{url}/health",
                    self._config.load_timeout_seconds,
                    tick=lambda: progress(f"waiting for {request.model} (pid {proc.pid})"),
                )
            except BaseException:
                # Cancelled or failed: never leave a half-started process behind.
                await asyncio.to_thread(proc.stop)
                raise
            self._procs[request.model] = (proc, endpoint)
            if self._records is not None:
                self._records.save(request.model, proc, endpoint)
            log.info("embedded runtime serves %s at %s (pid %s)", request.model, url, proc.pid)
            return endpoint

    async def adopt(self) -> list[str]:
        """Take over the runtime processes an earlier node agent of this node left running (it was
        killed): those still alive, the same process (pid and start time), and healthy. Others
        are stopped and forgotten. Returns the adopted models."""
        if self._records is None:
            return []
        adopted = []
        for model, record in self._records.load().items():
            proc = ManagedProcess.adopt(record.pid, record.argv, self._log_dir / f"{model}.log", record.started_at)
            same = process_start_ticks(record.pid) == record.start_ticks and process_argv(record.pid) == record.argv
            if same:
                try:
                    await self._probe(record.endpoint)
                except RuntimeUnhealthy as exc:
                    log.warning("not adopting %s (pid %s): %s", model, record.pid, exc)
                    await asyncio.to_thread(proc.stop)
                else:
                    self._procs[model] = (proc, record.endpoint)
                    adopted.append(model)
                    log.info("adopted %s at %s (pid %s), left running by an earlier node agent",
                             model, record.endpoint.url, record.pid)  # fmt: skip
                    continue
            self._records.remove(model)
        return adopted

    async def _probe(self, endpoint: Endpoint) -> None:
        try:
            async with httpx.AsyncClient(timeout=5.0) as client:
                response = await client.get(f"{endpoint.url}/health")
        except httpx.TransportError as exc:
            raise RuntimeUnhealthy(f"{endpoint.url} does not answer: {exc}") from exc
        if response.status_code != 200:
            raise RuntimeUnhealthy(f"{endpoint.url}/health answered {response.status_code}")

    async def check_health(self, model: str) -> None:
        entry = self._procs.get(model)
        if entry is None:
            raise RuntimeUnhealthy(f"{model} is not running on node {self._node}")
        proc, endpoint = entry
        if not proc.alive():
            raise RuntimeUnhealthy(f"{model}'s process {proc.pid} exited with code {proc.exit_code()}")
        await self._probe(endpoint)

    async def stop(self, model: str) -> bool:
        async with self._lock(model):
            entry = self._procs.pop(model, None)
            if entry is None:
                return False
            await asyncio.to_thread(entry[0].stop)
            if self._records is not None:
                self._records.remove(model)
            log.info("embedded runtime stopped %s (pid %s)", model, entry[0].pid)
            return True

    async def stop_all(self) -> None:
        await asyncio.gather(*(self.stop(model) for model in list(self._procs)))
