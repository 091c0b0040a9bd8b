"""`create_app(settings)`: the gateway as a FastAPI application."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import httpx
from fastapi import FastAPI
from temporalio.client import Client

from api import errors
from api.registry import ModelRegistry
from api.routes import health, inference, models
from api.usage import UsageBatcher
from modelium import __version__
from modelium.config import Settings
from modelium.metrics import Metrics

log = logging.getLogger(__name__)

STATE_REFRESH_SECONDS = 5.0


def temporal_address(settings: Settings) -> str:
    return settings.temporal.address or f"127.0.0.1:{settings.temporal.port}"


def create_app(
    settings: Settings,
    *,
    client: Client | None = None,
    metrics: Metrics | None = None,
) -> FastAPI:
    """Build the gateway. `client` and `metrics` are shared with the caller when given
    (`modelium serve` runs everything in one process); otherwise the lifespan makes its own."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        temporal = client or await Client.connect(temporal_address(settings), namespace=settings.temporal.namespace)
        app.state.settings = settings
        app.state.temporal = temporal
        app.state.metrics = metrics or Metrics()
        app.state.registry = ModelRegistry(temporal, settings.gateway.endpoint_cache_seconds)
        app.state.metrics.track_idle(app.state.registry.last_use)
        app.state.usage = UsageBatcher(temporal, settings.gateway.usage_flush_seconds)
        app.state.usage.start()
        refresher = asyncio.create_task(app.state.registry.refresh_forever(STATE_REFRESH_SECONDS), name="state-refresh")
        limits = httpx.Limits(max_connections=1024, max_keepalive_connections=256)
        timeout = httpx.Timeout(settings.gateway.request_timeout_seconds, connect=5.0)
        async with httpx.AsyncClient(limits=limits, timeout=timeout) as http:
            app.state.http = http
            try:
                yield
            finally:
                refresher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await refresher
                await app.state.usage.stop()

    app = FastAPI(
        title="Modelium gateway",
        version=__version__,
        description="One HTTP entry point for every model Modelium serves.",
        lifespan=lifespan,
    )
    errors.install(app)
    app.include_router(health.router)
    app.include_router(models.router)
    app.include_router(inference.router)
    return app
