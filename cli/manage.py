"""`modelium models | load | unload | rollback`: the management API from the command line.

Talks to a running gateway over HTTP (so API keys and scopes apply as for any client):
`--url` or `$MODELIUM_URL`, `--api-key` or `$MODELIUM_API_KEY`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import httpx

from modelium.config import Settings


class ManageError(Exception):
    """The gateway refused or could not be reached; the message says why."""


def gateway_url(settings: Settings, explicit: str | None) -> str:
    if explicit or os.environ.get("MODELIUM_URL"):
        return (explicit or os.environ["MODELIUM_URL"]).rstrip("/")
    host = settings.gateway.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"http://{host}:{settings.gateway.port}"


class GatewayClient:
    def __init__(self, url: str, api_key: str | None, timeout: float) -> None:
        key = api_key or os.environ.get("MODELIUM_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._url = url
        self._http = httpx.Client(base_url=url, headers=headers, timeout=timeout)

    def __enter__(self) -> GatewayClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self._http.close()

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        try:
            response = self._http.request(method, path, json=body)
        except httpx.TransportError as exc:
            raise ManageError(
                f"cannot reach the gateway at {self._url} ({exc}); is `modelium serve` running?"
            ) from None
        try:
            data = response.json()
        except ValueError:
            data = {"error": {"message": response.text[:300]}}
        if response.status_code >= 400:
            err = data.get("error") if isinstance(data, dict) else None
            message = err.get("message") if isinstance(err, dict) else str(data)
            raise ManageError(f"{response.status_code}: {message}")
        return response.status_code, data


def _ago(epoch: float | None) -> str:
    if not epoch:
        return "-"
    seconds = max(0.0, time.time() - epoch)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.0f} MiB"


def format_models(models: list[dict[str, Any]]) -> str:
    header = ("NAME", "PHASE", "RUNTIME", "NODE", "MEMORY", "LAST USE", "REQUESTS", "PINNED", "IDLE AFTER")
    rows = [header]
    for m in models:
        memory = m.get("booked_bytes") or m.get("memory_estimate_bytes")
        rows.append(
            (
                m["name"],
                m["phase"],
                m.get("runtime") or "-",
                m.get("node") or "-",
                _mib(memory),
                _ago(m.get("last_used_at")),
                str(m.get("request_count", 0)),
                "yes" if m.get("pinned") else "no",
                f"{m.get('idle_timeout_seconds', 0):g}s",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    problems = [f"  {m['name']}: {m['last_error']}" for m in models if m.get("phase") == "failed"]
    if problems:
        lines += ["", "failed:", *problems]
    return "\n".join(lines)


def run(command: str, client: GatewayClient, args: Any) -> int:
    if command == "models":
        _, data = client.call("GET", "/models")
        models = data["models"]
        print(json.dumps(models, indent=2) if args.json else (format_models(models) if models else "no models yet"))
        return 0
    if command == "load":
        body: dict[str, Any] = {"wait": not args.no_wait}
        if args.pin is not None:
            body["pin"] = args.pin
        if args.idle_timeout is not None:
            body["idle_timeout_seconds"] = args.idle_timeout
        if args.timeout is not None:
            body["timeout_seconds"] = args.timeout
        status, data = client.call("POST", f"/models/{args.name}/load", body)
        if status == 202:
            print(f"{args.name}: load requested ({data['phase']}); `modelium models` shows its progress")
        else:
            where = f"{data.get('runtime')} on {data.get('node')}"
            pinned = ", pinned" if data.get("pinned") else f", unloads after {data['idle_timeout_seconds']:g}s idle"
            print(f"{args.name}: loaded ({where}{pinned})")
        return 0
    if command == "rollback":
        status, data = client.call("POST", f"/models/{args.name}/rollback", {})
        if status == 202:
            print(f"{args.name}: rollback under way; `modelium models` shows when it serves")
        else:
            serving = f"version {data['version']}" if data.get("version") else data.get("serving_path")
            print(f"{args.name}: serves {serving}")
        return 0
    if command == "unload":
        status, data = client.call("POST", f"/models/{args.name}/unload", {"wait": not args.no_wait})
        print(f"{args.name}: {'unload requested' if status == 202 else data['phase']}")
        return 0
    raise ValueError(command)


def main(command: str, settings: Settings, args: Any) -> int:
    url = gateway_url(settings, args.url)
    try:
        with GatewayClient(url, args.api_key, timeout=args.http_timeout) as client:
            return run(command, client, args)
    except ManageError as exc:
        print(f"modelium {command}: {exc}", file=sys.stderr)
        return 1
