"""`create_app(settings)`: the gateway as a FastAPI application."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI
from temporalio.client import Client

from api import errors
from api.auth import KeyRing
from api.coldstart import ColdStarts
from api.control_plane import ControlPlane
from api.deps import Gateway
from api.events import EventHub
from api.limits import BodyLimit, HeadAsGet
from api.recent import RecentRequests
from api.registry import ModelRegistry
from api.routes import events as events_routes
from api.routes import fleet, health, inference, models, openai, ui
from api.temporal_client import connect_temporal
from api.upstream import UpstreamPool
from api.usage import UsageBatcher
from modelium import __version__
from modelium.config import Settings
from modelium.metrics import Metrics

log = logging.getLogger(__name__)

STATE_REFRESH_SECONDS = 15.0


def create_app(
    settings: Settings,
    *,
    client: Client | None = None,
    metrics: Metrics | None = None,
    control: ControlPlane | None = None,
) -> FastAPI:
    """Build the gateway. `client`, `metrics` and `control` (the probe of Temporal, started by its
    owner) are shared with the caller when given (`modelium serve` runs everything in one
    process); otherwise the lifespan makes its own."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        gw_settings = settings.gateway
        temporal = client or await connect_temporal(settings)
        own_metrics = metrics or Metrics()
        probe = control or ControlPlane(temporal, gauge=own_metrics.temporal_up)
        if control is None:
            probe.start()
        registry = ModelRegistry(temporal, gw_settings.endpoint_cache_seconds, probe)
        own_metrics.track_idle(registry.last_use)
        own_metrics.track_phases(registry.phase_counts)
        usage = UsageBatcher(temporal, gw_settings.usage_flush_seconds, settings.state_dir / "gateway" / "usage")
        usage.start()
        refresher = asyncio.create_task(registry.refresh_forever(STATE_REFRESH_SECONDS), name="state-refresh")
        upstream = UpstreamPool(timeout=gw_settings.request_timeout_seconds)
        cold = ColdStarts(
            temporal,
            registry,
            own_metrics,
            probe,
            timeout=gw_settings.cold_start_timeout_seconds,
            max_waiting=gw_settings.max_waiting_requests,
        )
        events = EventHub(registry.fleet, registry.nodes, registry.load_report, ring_size=gw_settings.events_ring_size)
        app.state.gateway = Gateway(
            settings=settings,
            temporal=temporal,
            upstream=upstream,
            registry=registry,
            usage=usage,
            metrics=own_metrics,
            cold=cold,
            keys=keys,
            control=probe,
            events=events,
            recent=RecentRequests(),
        )
        try:
            yield
        finally:
            refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await refresher
            await registry.close()
            await events.stop()
            await usage.stop()
            await upstream.aclose()
            if control is None:
                await probe.stop()

    keys = KeyRing(settings.gateway.api_keys)
    if not keys.enabled and not _is_loopback(settings.gateway.host):
        log.warning(
            "the gateway listens on %s without API keys: anyone who can reach it may run, load and "
            "unload models; set gateway.api_keys (see `modelium keys create`) or bind to 127.0.0.1",
            settings.gateway.host,
        )
    app = FastAPI(
        title="Modelium gateway",
        version=__version__,
        description="One HTTP entry point for every model Modelium serves.",
        lifespan=lifespan,
    )
    errors.install(app)
    app.add_middleware(BodyLimit, limit=settings.gateway.max_body_bytes)
    app.add_middleware(HeadAsGet)
    app.include_router(health.router)
    app.include_router(models.router)
    app.include_router(inference.router)
    app.include_router(openai.router)
    app.include_router(events_routes.router)
    app.include_router(fleet.router)
    app.include_router(ui.router)
    return app


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
