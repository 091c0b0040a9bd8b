"""Ray Serve: one application per model on a Ray cluster, deployed and deleted through Serve's
REST API (the dashboard's `PUT /api/serve/applications/`, which declares every application).

The cluster is the one whose dashboard is at `ray_serve.address`, or a local one this node agent
starts (`ray start --head --block`, in its own process group). Each model is an application named
after it with route prefix `/<model>`, running `modelium.runtimes.ray_app:build` with GPUs from its
booking; it speaks Modelium's JSON (`/predict`, `/health`). A new version loaded beside the
serving one during an update is an application of its own, under its instance key (`/<model>@u2`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import Any

import httpx

from modelium.config import RayServe as RayServeConfig
from modelium.names import model_of
from modelium.runtimes import RAY_SERVE
from modelium.runtimes.base import Progress, RuntimeStartError, RuntimeUnhealthy
from modelium.runtimes.managed import reported_in_flight, smallest_request
from modelium.runtimes.process import free_port, runtime_http
from modelium.runtimes.records import RuntimeRecords
from modelium.runtimes.shared_server import ServesManyModels, SharedServer, answers
from modelium.types import Endpoint, EndpointProtocol, LoadRequest

log = logging.getLogger(__name__)

NAME = RAY_SERVE
_HEAD = "_ray_head"
IMPORT_PATH = "modelium.runtimes.ray_app:build"


class RayServeRuntimeAdapter(ServesManyModels):
    name = NAME

    def __init__(
        self,
        node: str,
        state_dir: Path,
        log_dir: Path,
        config: RayServeConfig,
        host: str = "127.0.0.1",
        advertise: str | None = None,
    ) -> None:
        records = RuntimeRecords(state_dir / "records")
        head = SharedServer(_HEAD, records, log_dir / "ray-head.log", NAME, node, EndpointProtocol.MODELIUM_JSON)
        super().__init__(node, host, advertise, head)
        self._config = config
        self._dashboard: str | None = config.address.rstrip("/") if config.address else None
        self._apps: dict[str, dict[str, Any]] = {}

    # -- the cluster ---------------------------------------------------------------------------
    async def _get(self, path: str) -> httpx.Response:
        assert self._dashboard is not None
        async with runtime_http(30.0) as http:
            return await http.get(f"{self._dashboard}{path}")

    async def _dashboard_up(self, url: str | None = None) -> bool:
        url = url or self._dashboard
        return url is not None and await answers(f"{url}/api/serve/applications/", timeout=30.0)

    async def _ensure_cluster(self, progress: Progress) -> None:
        if not self._server.exited() and await self._dashboard_up():
            return
        if self._config.address:
            raise RuntimeStartError(f"the Ray dashboard at ray_serve.address {self._config.address} does not answer")
        ray = Path(sys.executable).parent / "ray"
        if not ray.is_file():
            raise RuntimeStartError(
                "Ray is not installed here: pip install 'ray[serve]', or set ray_serve.address", retryable=False
            )
        gcs, dashboard = free_port(self._host), free_port(self._host)
        argv = [
            str(ray),
            "start",
            "--head",
            "--block",
            f"--port={gcs}",
            f"--dashboard-port={dashboard}",
            f"--dashboard-host={self._host}",
            f"--node-ip-address={self._local}",
            "--disable-usage-stats",
        ]
        if self._config.num_cpus is not None:
            argv.append(f"--num-cpus={self._config.num_cpus}")
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        url = f"http://{self._local}:{dashboard}"
        await self._server.start(
            argv, url, f"{url}/api/serve/applications/", self._config.start_timeout_seconds, progress, env=env
        )
        self._dashboard = url

    async def _declare(self) -> None:
        """PUT every application this node wants; Serve deletes the ones not listed."""
        assert self._dashboard is not None
        body = {
            "http_options": {"host": self._host, "port": self._config.http_port},
            "applications": list(self._apps.values()),
        }
        async with runtime_http(60.0) as http:
            response = await http.put(f"{self._dashboard}/api/serve/applications/", json=body)
        if response.status_code != 200:
            raise RuntimeStartError(
                f"Ray Serve refused the applications ({response.status_code}): {response.text[:500]}"
            )

    async def _status(self) -> dict[str, Any]:
        data = (await self._get("/api/serve/applications/")).json()
        return dict(data.get("applications") or {})

    # -- the adapter interface -----------------------------------------------------------------
    async def start(self, request: LoadRequest, progress: Progress) -> Endpoint:
        async with self._lock:
            await self._ensure_cluster(progress)
            served = await self._still_serving(request.model)
            if served is not None:
                return served
            gpus = len(request.booking.all_devices) if request.booking.device.startswith("cuda") else 0
            self._apps[request.model] = {
                "name": request.model,
                "route_prefix": f"/{request.model}",
                "import_path": IMPORT_PATH,
                "args": {
                    "model_dir": str(Path(request.path).resolve()),
                    "task": request.task,
                    "name": model_of(request.model),
                },
                "deployments": [
                    {"name": "ModeliumModel", "num_replicas": 1, "ray_actor_options": {"num_cpus": 1, "num_gpus": gpus}}
                ],
            }
            try:
                await self._declare()
                await self._wait_status(request.model, progress)
            except BaseException:
                self._apps.pop(request.model, None)
                await self._declare_quietly()
                raise
            url = f"http://{self._advertise}:{self._config.http_port}/{request.model}"
            endpoint = Endpoint(url, EndpointProtocol.MODELIUM_JSON, NAME, self._node, self._server.pid)
            self._endpoints[request.model] = endpoint
            return endpoint

    async def _wait_status(self, model: str, progress: Progress) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._config.load_timeout_seconds
        while True:
            app = (await self._status()).get(model) or {}
            status = app.get("status")
            if status == "RUNNING":
                return
            if status in ("DEPLOY_FAILED", "UNHEALTHY"):
                raise RuntimeStartError(
                    f"Ray Serve could not deploy {model}: {app.get('message', status)}", retryable=False
                )
            if loop.time() > deadline:
                limit = self._config.load_timeout_seconds
                raise RuntimeStartError(f"{model} not running on Ray Serve after {limit:g}s (status {status})")
            progress(f"Ray Serve deploys {model} ({status or 'pending'})")
            await asyncio.sleep(0.5)

    async def _declare_quietly(self) -> None:
        try:
            await self._declare()
        except (RuntimeStartError, httpx.HTTPError) as exc:
            log.warning("could not update Ray Serve's applications: %s", exc)

    async def check_health(self, model: str) -> None:
        endpoint = self._endpoints.get(model)
        if endpoint is None:
            raise RuntimeUnhealthy(f"{model} is not deployed on this node's Ray Serve")
        if self._server.exited():
            raise RuntimeUnhealthy(f"the local Ray cluster (pid {self._server.pid}) exited")
        try:
            async with runtime_http(10.0) as http:
                response = await http.get(f"{endpoint.url}/health")
        except httpx.TransportError as exc:
            raise RuntimeUnhealthy(f"{endpoint.url} does not answer: {exc}") from exc
        if response.status_code != 200:
            raise RuntimeUnhealthy(f"{endpoint.url}/health answered {response.status_code}")

    async def smoke(self, endpoint: Endpoint, model: str) -> bool:
        return await smallest_request(endpoint, model)

    async def in_flight(self, endpoint: Endpoint, model: str) -> int | None:
        return await reported_in_flight(endpoint)

    async def stop(self, model: str) -> bool:
        async with self._lock:
            if self._endpoints.pop(model, None) is None:
                return False
            self._apps.pop(model, None)
            if await self._dashboard_up():
                await self._declare_quietly()
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 60
                while model in await self._status() and loop.time() < deadline:
                    await asyncio.sleep(0.3)
            return True

    async def stop_all(self) -> None:
        for model in list(self._endpoints):
            await self.stop(model)
        if self._server.proc is not None:
            # Serve shut down first: the head then has nothing to drain and stops at once.
            if await self._dashboard_up():
                try:
                    async with runtime_http(60.0) as http:
                        await http.delete(f"{self._dashboard}/api/serve/applications/")
                except httpx.HTTPError as exc:
                    log.warning("could not shut Ray Serve down: %s", exc)
            # Ray's head drains for 30 s on SIGTERM; with Serve gone there is nothing left to
            # drain, so the whole process group gets SIGKILL after a short grace.
            await self._server.stop(3.0)

    async def adopt(self) -> list[str]:
        """Take over a local Ray cluster an earlier node agent left running, and the applications
        of this node on it."""
        if not await self._server.adopt(self._dashboard_up):
            return []
        self._dashboard = self._server.url
        data = (await self._get("/api/serve/applications/")).json()
        adopted = []
        for name, app in (data.get("applications") or {}).items():
            config = app.get("deployed_app_config") or {}
            if app.get("status") == "RUNNING" and config.get("import_path") == IMPORT_PATH:
                self._apps[name] = config
                url = f"http://{self._advertise}:{self._config.http_port}/{name}"
                self._endpoints[name] = Endpoint(
                    url, EndpointProtocol.MODELIUM_JSON, NAME, self._node, self._server.pid
                )
                adopted.append(name)
        return adopted
