"""One way to reach Temporal from settings: its address, namespace, TLS and API key, the same
for the gateway, the workers and the watcher (an embedded dev server is reached on loopback)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from temporalio.client import Client
from temporalio.service import TLSConfig

from modelium.config import ConfigError, Settings


def temporal_address(settings: Settings) -> str:
    return settings.temporal.address or f"127.0.0.1:{settings.temporal.port}"


def _read(path: Path | None, key: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"temporal.tls.{key}: cannot read {path}: {exc.strerror}") from None


def connect_options(settings: Settings) -> dict[str, Any]:
    """The keyword arguments of `Client.connect` these settings ask for."""
    temporal = settings.temporal
    options: dict[str, Any] = {"namespace": temporal.namespace}
    if temporal.uses_tls:
        tls = temporal.tls
        options["tls"] = TLSConfig(
            server_root_ca_cert=_read(tls.ca_cert, "ca_cert"),
            client_cert=_read(tls.client_cert, "client_cert"),
            client_private_key=_read(tls.client_key, "client_key"),
            domain=tls.server_name,
        )
    if temporal.api_key is not None:
        options["api_key"] = temporal.api_key.get_secret_value()
    return options


async def connect_temporal(settings: Settings) -> Client:
    return await Client.connect(temporal_address(settings), **connect_options(settings))
