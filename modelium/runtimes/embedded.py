"""The embedded runtime: one process per model, serving it with transformers + PyTorch.

Always available; works on the CPU. Text generation speaks the OpenAI protocol; classification and
embedding models speak Modelium's JSON (`POST /predict {"inputs": ...}`). A load is handed to a
warm spare from the pool (`warm_pool.py`) when there is one, else a process is started for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Callable
from pathlib import Path

import httpx

from modelium.config import EmbeddedRuntime as EmbeddedConfig
from modelium.ledger import Ledger
from modelium.names import model_of
from modelium.runtimes import EMBEDDED
from modelium.runtimes.base import Progress, RuntimeStartError
from modelium.runtimes.managed import ProcessRuntime
from modelium.runtimes.process import ManagedProcess, loopback_for, runtime_http
from modelium.runtimes.warm_pool import SPARE_PREFIX, Spare, WarmPool
from modelium.types import Endpoint, EndpointProtocol, LoadRequest, Task

log = logging.getLogger(__name__)

# A spare handed a model is replaced this long after. Started at once, its imports (a core for
# ~3.5 s here) competed with the model's warm-up and first request: a cold request through the
# gateway took 170-260 ms more than the load, 135-155 ms with the replacement a second later.
REFILL_AFTER_SECONDS = 1.0

NAME = EMBEDDED


def protocol_for(task: str) -> EndpointProtocol:
    return EndpointProtocol.OPENAI if task == Task.TEXT_GENERATION else EndpointProtocol.MODELIUM_JSON


class EmbeddedRuntimeAdapter(ProcessRuntime):
    name = NAME

    def __init__(
        self,
        node: str,
        log_dir: Path,
        config: EmbeddedConfig | None = None,
        host: str = "127.0.0.1",
        python: str = sys.executable,
        state_dir: Path | None = None,
        advertise: str | None = None,
    ) -> None:
        self._config = config or EmbeddedConfig()
        super().__init__(
            node,
            log_dir,
            host=host,
            advertise=advertise,
            load_timeout_seconds=self._config.load_timeout_seconds,
            state_dir=state_dir,
        )
        self._python = python
        self.pool = WarmPool(
            self._config.warm_pool,
            self._spare_argv,
            self.base_env,
            log_dir / "warm-pool.log",
            host,
            self._records,
            ready_timeout=self._config.load_timeout_seconds,
        )

    # -- the warm pool -------------------------------------------------------------------------
    def start_pool(self, ledger: Ledger | None = None, on_booking: Callable[[], None] | None = None) -> None:
        """Start the spares (after `adopt`: what an earlier agent left is stopped first). With
        `ledger`, the pool's memory is booked in its CPU budget; `on_booking` after a change."""
        if ledger is not None:
            self.pool.book_in(ledger, on_booking or (lambda: None))
        self.pool.start()

    def _spare_argv(self, port: int) -> list[str]:
        # --pool names whose spare it is (`ps` shows it; a test finds what a node left behind).
        owner = ["--pool", str(self._log_dir.parent)]
        server = "modelium.runtimes.embedded_server"
        return [self._python, "-m", server, "--spare", *owner, "--host", self._host, "--port", str(port)]

    async def from_pool(self, request: LoadRequest, progress: Progress) -> Endpoint | None:
        if self.pool.size <= 0:
            return None
        spare = await self.pool.take()
        if spare is None:
            self.pool.fill()
            return None
        proc = spare.proc
        proc.serves = self.argv(request, spare.port)
        proc.rebind_log(self.log_path(request.model))
        endpoint = Endpoint(
            f"http://{self._advertise}:{spare.port}", self.protocol(request), self.name, self._node, proc.pid
        )
        self.pool.handed_over(spare)
        self.track(request.model, proc, endpoint)
        try:
            await self._hand_over(spare, request, progress)
            await self._wait_healthy(proc, endpoint, request.model, progress)
        except BaseException:
            await self._stop_locked(request.model)
            self.pool.fill()
            raise
        # The replacement starts a little later: its imports take a core for seconds, which on
        # a small machine slows the new model's warm-up and first requests. A load that finds
        # no spare meanwhile starts it at once (`fill` above).
        asyncio.get_running_loop().call_later(REFILL_AFTER_SECONDS, self.pool.fill)
        log.info("%s serves %s at %s (warm spare pid %s)", self.name, request.model, endpoint.url, proc.pid)
        return endpoint

    async def _hand_over(self, spare: Spare, request: LoadRequest, progress: Progress) -> None:
        """Tell the spare its model; returns once it is loaded, with progress meanwhile."""
        proc = spare.proc
        order = {
            "model_dir": request.path,
            "name": model_of(request.model),
            "task": request.task,
            "device": self._device(request.booking.device),
            "threads": self._config.cpu_threads,
            "env": self.env(request),
            "log": str(proc.log_path),
        }
        url = f"http://{loopback_for(self._host)}:{spare.port}/take"
        async with runtime_http(self._load_timeout) as http:
            post = asyncio.create_task(http.post(url, json=order))
            try:
                while not (await asyncio.wait({post}, timeout=0.25))[0]:
                    if not proc.alive():
                        raise proc.exited()
                    progress(f"waiting for {request.model} (warm spare pid {proc.pid})", proc.last_line())
            finally:
                post.cancel()
                with contextlib.suppress(BaseException):
                    await post
        try:
            response = post.result()
        except httpx.HTTPError as exc:
            if not proc.alive():
                raise proc.exited() from None
            raise RuntimeStartError(
                f"the warm spare pid {proc.pid} did not answer when given {request.model}: {exc}; "
                f"last lines of {proc.log_path}:\n{proc.log_tail()}"
            ) from None
        if response.status_code != 200:
            try:
                reason = response.json().get("error")
            except ValueError:
                reason = response.text[:300]
            raise RuntimeStartError(
                f"could not load {request.model}: {reason}; last lines of {proc.log_path}:\n{proc.log_tail()}"
            )

    def spare_pids(self) -> list[int]:
        return self.pool.pids()

    async def adopt(self) -> list[str]:
        # Spares an earlier node agent left are stopped, never adopted: this agent starts its own.
        if self._records is not None:
            for key, record in self._records.load().items():
                if not key.startswith(SPARE_PREFIX):
                    continue
                if record.same_process():
                    log.info("stopping warm spare pid %s, left running by an earlier node agent", record.pid)
                    await asyncio.to_thread(ManagedProcess.adopt(record.pid, record.argv, self.log_path(key)).stop)
                self._records.remove(key)
        return await super().adopt()

    async def stop_all(self) -> None:
        await self.pool.close()
        await super().stop_all()

    def _device(self, booked: str) -> str:
        """The device as the runtime process names it. A booked GPU is the only one the process
        sees (CUDA_VISIBLE_DEVICES, see `env`), so inside it is always cuda:0."""
        configured = self._config.device
        if configured != "auto":
            return configured
        return "cuda:0" if booked.startswith("cuda:") else booked

    def argv(self, request: LoadRequest, port: int) -> list[str]:
        argv = [
            self._python,
            "-m",
            "modelium.runtimes.embedded_server",
            "--model-dir",
            request.path,
            "--name",
            model_of(request.model),
            "--task",
            request.task,
            "--host",
            self._host,
            "--port",
            str(port),
            "--device",
            self._device(request.booking.device),
        ]
        if self._config.cpu_threads:
            argv += ["--threads", str(self._config.cpu_threads)]
        return argv

    def env(self, request: LoadRequest) -> dict[str, str]:
        if self._config.device == "auto" and request.booking.device.startswith("cuda:"):
            return {"CUDA_VISIBLE_DEVICES": request.booking.device.split(":", 1)[1]}
        return {}

    def protocol(self, request: LoadRequest) -> EndpointProtocol:
        return protocol_for(request.task)
