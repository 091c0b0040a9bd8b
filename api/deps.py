"""Typed dependencies: everything a route needs comes from `app.state`, set by the lifespan."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from temporalio.client import Client

from api.auth import KeyRing, Principal
from api.coldstart import ColdStarts
from api.control_plane import ControlPlane
from api.events import EventHub
from api.recent import RecentRequests
from api.registry import ModelRegistry
from api.upstream import UpstreamPool
from api.usage import UsageBatcher
from modelium.config import Settings
from modelium.metrics import Metrics


@dataclass
class Gateway:
    """The gateway's shared parts, built once by the lifespan. Hot routes take this one
    dependency rather than seven: each dependency costs time on every request."""

    settings: Settings
    temporal: Client
    upstream: UpstreamPool
    registry: ModelRegistry
    usage: UsageBatcher
    metrics: Metrics
    cold: ColdStarts
    keys: KeyRing
    control: ControlPlane
    events: EventHub
    recent: RecentRequests


# Dependencies are `async def` on purpose: FastAPI runs plain `def` dependencies in a thread
# pool, a thread hop per dependency per request (profiled: the largest cost on the hot path).
async def get_gateway(request: Request) -> Gateway:
    return request.app.state.gateway  # type: ignore[no-any-return]


async def get_settings(request: Request) -> Settings:
    return (await get_gateway(request)).settings


async def get_temporal(request: Request) -> Client:
    return (await get_gateway(request)).temporal


async def get_registry(request: Request) -> ModelRegistry:
    return (await get_gateway(request)).registry


async def get_principal(request: Request) -> Principal:
    """The caller, from its API key; raises 401 when keys are configured and none fits."""
    return (await get_gateway(request)).keys.authenticate(request)


GatewayDep = Annotated[Gateway, Depends(get_gateway)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
TemporalDep = Annotated[Client, Depends(get_temporal)]
RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]
