"""A warm spare: an embedded runtime process that has imported torch, transformers and the model
classes, and waits to be told which model to serve (`python -m modelium.runtimes.embedded_server
--spare --host H --port N`).

Until then it answers `GET /spare` (200, its state) and nothing else (503). `POST /take` with the
model's directory, name, task, device and log file loads the model (the answer comes once it is
loaded: 200, or 500 with the reason) and from then on the process is that model's server, the
same routes as a process started for it. Its output goes to the model's log from the `take` on.

A spare is a process started afresh, never a fork: CUDA state must not be forked, and a fork of a
parent with torch's thread pools is not safe either. CUDA is not initialised before `take` (import
torch does not), so `CUDA_VISIBLE_DEVICES` sent with `take` still picks the booked GPU.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import tempfile
import time
from typing import Any

import torch

from modelium.runtimes.embedded_server import STARTED
from modelium.runtimes.embedded_server.engine import (
    TASKS,
    TEXT_GENERATION,
    Engine,
    load,
    warm_imports,
    write_rehearsal_model,
)
from modelium.runtimes.embedded_server.http import Routes

log = logging.getLogger("modelium.embedded_server")

# What `take` must name, and what it may.
_REQUIRED = ("model_dir", "name", "task", "device", "log")


class SpareApp:
    """ASGI app of a spare: its own two routes until it serves a model, then the model's routes."""

    def __init__(self) -> None:
        self.ready_at = time.monotonic()
        self.taking = False
        self.served: Any = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if self.served is not None:
            await self.served(scope, receive, send)
            return
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if path == "/spare" and method == "GET":
            state = "loading" if self.taking else "waiting"
            await _answer(send, 200, {"state": state, "pid": os.getpid()})
        elif path == "/take" and method == "POST":
            status, body = await self.take(await _body(receive))
            await _answer(send, status, body)
        else:
            message = "this runtime process is a warm spare and serves no model yet"
            await _answer(send, 503, {"error": {"message": message, "type": "server_error"}})

    async def take(self, raw: bytes) -> tuple[int, dict[str, Any]]:
        if self.taking:
            return 409, {"error": "this spare is taken already"}
        try:
            order = json.loads(raw)
        except ValueError:
            return 400, {"error": "the body is not JSON"}
        missing = [k for k in _REQUIRED if not isinstance(order.get(k), str)] if isinstance(order, dict) else _REQUIRED
        if missing:
            return 400, {"error": f"take needs {', '.join(missing)}"}
        if order["task"] not in TASKS:
            return 400, {"error": f"task {order['task']!r} is not one of {', '.join(TASKS)}"}
        env = order.get("env") or {}
        if "CUDA_VISIBLE_DEVICES" in env and torch.cuda.is_initialized():
            return 409, {"error": "CUDA is initialised in this spare already; start the model afresh"}
        self.taking = True
        _log_to(order["log"])
        waited = time.monotonic() - self.ready_at
        print(
            f"embedded runtime: warm spare pid {os.getpid()} (ready {waited:.1f}s ago) takes {order['name']}",
            file=sys.stderr,
            flush=True,
        )
        os.environ.update({str(k): str(v) for k, v in env.items()})
        threads = order.get("threads")
        if isinstance(threads, int) and threads > 0:
            torch.set_num_threads(threads)
        started = time.monotonic()
        try:
            loaded = await asyncio.to_thread(load, order["model_dir"], order["name"], order["task"], order["device"])
        except Exception as exc:
            # The adapter stops this process: a failed load may leave anything behind in it.
            log.exception("could not load %s", order["name"])
            return 500, {"error": f"{type(exc).__name__}: {exc}"}
        self.served = Routes(Engine(loaded)).app()
        return 200, {"loaded": order["name"], "seconds": round(time.monotonic() - started, 3)}


def _log_to(path: str) -> None:
    """From now on this process's output (fds 1 and 2, so C libraries' too) goes to `path`."""
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


async def _body(receive: Any) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def _answer(send: Any, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


def rehearse() -> None:
    """Load a tiny model written here and answer one completion through the routes, in-process:
    a process's first load and first request pay for setup the later ones do not (the demo
    model's load went from 0.13 s to 0.02 s here, its first request from 28 ms to 7 ms)."""
    import httpx

    with tempfile.TemporaryDirectory(prefix="modelium-rehearsal-") as tmp:
        write_rehearsal_model(tmp)
        app = Routes(Engine(load(tmp, "rehearsal", TEXT_GENERATION, "cpu"))).app()

    async def ask() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://rehearsal") as http:
            body = {"model": "rehearsal", "prompt": "hello", "max_tokens": 1}
            (await http.post("/v1/completions", json=body)).raise_for_status()

    asyncio.run(ask())


def serve_spare(host: str, port: int) -> None:
    import uvicorn

    warm_imports()
    rehearse()
    app = SpareApp()
    took = time.monotonic() - STARTED
    line = f"embedded runtime: warm spare ready, imports and a rehearsal load took {took:.2f}s"
    print(line, file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, lifespan="off")
