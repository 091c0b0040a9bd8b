"""Typed dependencies: everything a route needs comes from `app.state`, set by the lifespan."""

from __future__ import annotations

from typing import Annotated

import httpx
from fastapi import Depends, Request
from temporalio.client import Client

from api.registry import ModelRegistry
from api.usage import UsageBatcher
from modelium.config import Settings
from modelium.metrics import Metrics


def get_settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


def get_temporal(request: Request) -> Client:
    return request.app.state.temporal  # type: ignore[no-any-return]


def get_http(request: Request) -> httpx.AsyncClient:
    return request.app.state.http  # type: ignore[no-any-return]


def get_registry(request: Request) -> ModelRegistry:
    return request.app.state.registry  # type: ignore[no-any-return]


def get_usage(request: Request) -> UsageBatcher:
    return request.app.state.usage  # type: ignore[no-any-return]


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics  # type: ignore[no-any-return]


SettingsDep = Annotated[Settings, Depends(get_settings)]
TemporalDep = Annotated[Client, Depends(get_temporal)]
HttpDep = Annotated[httpx.AsyncClient, Depends(get_http)]
RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]
UsageDep = Annotated[UsageBatcher, Depends(get_usage)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
