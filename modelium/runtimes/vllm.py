"""vLLM: `vllm serve <model dir>` per model, on the GPUs its booking names.

From the booking: `CUDA_VISIBLE_DEVICES` (the booked GPUs), `--tensor-parallel-size` (how many),
and `--gpu-memory-utilization` = booked bytes / the GPU's memory, so that vLLM takes what was
booked and never its default 0.9 of the whole GPU from the models beside it. Healthy when
`/health` answers and `/v1/models` lists the model. After a stop, NVML must stop counting memory
for the process before the stop returns.
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import time
from collections.abc import Mapping
from pathlib import Path

import httpx

from modelium.config import Vllm as VllmConfig
from modelium.gpu import GpuReader, gpu_memory_held
from modelium.names import model_of
from modelium.runtimes import VLLM
from modelium.runtimes.base import RuntimeStartError, RuntimeUnhealthy
from modelium.runtimes.managed import ProcessRuntime, post_expecting, probe_openai
from modelium.runtimes.process import runtime_http
from modelium.types import Endpoint, EndpointProtocol, LoadRequest

log = logging.getLogger(__name__)

NAME = VLLM
# A sleep copies every weight to host memory (and a wake back): seconds for a large model.
SLEEP_TIMEOUT = 300.0


class VllmRuntimeAdapter(ProcessRuntime):
    name = NAME

    def __init__(
        self,
        node: str,
        log_dir: Path,
        config: VllmConfig,
        capacities: Mapping[str, int],
        gpu: GpuReader | None = None,
        state_dir: Path | None = None,
        memory_freed_timeout: float = 60.0,
        advertise: str | None = None,
    ) -> None:
        super().__init__(
            node,
            log_dir,
            host=config.host,
            advertise=advertise,
            load_timeout_seconds=config.load_timeout_seconds,
            state_dir=state_dir,
        )
        self._config = config
        self._capacities = dict(capacities)
        self._gpu = gpu
        self._freed_timeout = memory_freed_timeout

    @staticmethod
    def gpu_memory_utilization(booked_bytes: int, total_bytes: int) -> float:
        """The share of the GPU vLLM may take: what was booked, rounded down to 0.001."""
        share = math.floor(booked_bytes / total_bytes * 1000) / 1000
        if share <= 0:
            raise RuntimeStartError(
                f"a booking of {booked_bytes / 2**20:.0f} MiB is under 0.1% of a {total_bytes / 2**30:.0f} GiB GPU; "
                "vLLM's --gpu-memory-utilization must be above 0",
                retryable=False,
            )
        return min(share, 0.98)

    def argv(self, request: LoadRequest, port: int) -> list[str]:
        booking = request.booking
        devices = booking.all_devices
        if not all(d.startswith("cuda:") for d in devices):
            raise RuntimeStartError(
                f"vLLM runs on GPUs; {request.model} was booked on {', '.join(devices)}", retryable=False
            )
        totals = [self._capacities.get(d) for d in devices]
        if any(t is None for t in totals):
            raise RuntimeStartError(
                f"node {self._node} does not know the size of {', '.join(devices)}", retryable=False
            )
        utilization = min(self.gpu_memory_utilization(booking.bytes, t) for t in totals if t)
        fill = {"model_dir": request.path, "name": model_of(request.model)}
        return [
            *(part.format(**fill) for part in self._config.command),
            "--served-model-name",
            model_of(request.model),
            "--host",
            self._host,
            "--port",
            str(port),
            "--tensor-parallel-size",
            str(len(devices)),
            "--gpu-memory-utilization",
            f"{utilization:g}",
            *(["--enable-sleep-mode"] if self.parks else []),
            *(part.format(**fill) for part in self._config.extra_args),
        ]

    @property
    def parks(self) -> bool:
        """Idle models are put to sleep (`park`) rather than stopped."""
        return self._config.park == "sleep"

    def env(self, request: LoadRequest) -> dict[str, str]:
        env = {"CUDA_VISIBLE_DEVICES": ",".join(d.split(":", 1)[1] for d in request.booking.all_devices)}
        if self.parks:
            env["VLLM_SERVER_DEV_MODE"] = "1"  # vLLM serves /sleep, /wake_up, /is_sleeping only then
        return env

    # -- parking (vLLM's sleep mode) -------------------------------------------------------------
    async def park(self, model: str) -> None:
        """Level 1 sleep: the weights move to host memory, the KV cache is freed; confirmed by
        `/is_sleeping`. Raises RuntimeUnhealthy with what went wrong."""
        url = self._url_of(model)
        await post_expecting(f"{url}/sleep?level=1", {}, timeout=SLEEP_TIMEOUT)
        if not await self._sleeping(url):
            raise RuntimeUnhealthy(f"{url}/is_sleeping still says awake after /sleep")

    async def wake(self, model: str) -> None:
        """Wake a parked model and check that it answers as before."""
        url = self._url_of(model)
        await post_expecting(f"{url}/wake_up", {}, timeout=SLEEP_TIMEOUT)
        if await self._sleeping(url):
            raise RuntimeUnhealthy(f"{url}/is_sleeping still says asleep after /wake_up")
        endpoint = self.endpoint(model)
        assert endpoint is not None
        await self.probe(endpoint, model)

    def _url_of(self, model: str) -> str:
        endpoint = self.endpoint(model)
        if endpoint is None:
            raise RuntimeUnhealthy(f"{model} is not running on node {self._node}")
        return endpoint.url

    @staticmethod
    async def _sleeping(url: str) -> bool:
        try:
            async with runtime_http(10.0) as client:
                response = await client.get(f"{url}/is_sleeping")
            answer = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise RuntimeUnhealthy(f"{url}/is_sleeping did not answer: {exc}") from None
        if response.status_code != 200 or not isinstance(answer, dict) or "is_sleeping" not in answer:
            raise RuntimeUnhealthy(f"{url}/is_sleeping answered {response.status_code}: {response.text[:200]}")
        return bool(answer["is_sleeping"])

    def protocol(self, request: LoadRequest) -> EndpointProtocol:
        return EndpointProtocol.OPENAI

    def port(self) -> int:
        """The first port of `vllm.port_range` that no model of this node holds and that is free."""
        first, last = self._config.port_range
        taken = self.ports_in_use()
        for port in range(first, last + 1):
            if port in taken:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                try:
                    sock.bind((self._host, port))
                except OSError:
                    continue
            return port
        raise RuntimeStartError(f"no free port in vllm.port_range {first}-{last} on node {self._node}")

    async def probe(self, endpoint: Endpoint, model: str) -> None:
        await probe_openai(endpoint, model_of(model))

    async def in_flight(self, endpoint: Endpoint, model: str) -> int | None:
        """Running and waiting requests, from vLLM's Prometheus metrics; None without them."""
        try:
            async with runtime_http(5.0) as client:
                response = await client.get(f"{endpoint.url}/metrics")
        except httpx.HTTPError:
            return None
        if response.status_code != 200:
            return None
        total, seen = 0.0, False
        for line in response.text.splitlines():
            if line.startswith(("vllm:num_requests_running", "vllm:num_requests_waiting")):
                try:
                    total += float(line.rsplit(" ", 1)[1])
                    seen = True
                except ValueError:
                    return None
        return int(total) if seen else None

    async def after_stop(self, model: str, pids: set[int]) -> None:
        """Wait until NVML no longer counts GPU memory for the stopped processes."""
        if self._gpu is None or not pids:
            return
        deadline = time.monotonic() + self._freed_timeout
        while held := gpu_memory_held(self._gpu, pids):
            if time.monotonic() > deadline:
                log.error("vLLM's %s stopped (pids %s) but NVML still counts %s", model, sorted(pids), held)
                return
            await asyncio.sleep(0.2)
