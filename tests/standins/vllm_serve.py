"""Stand-in for `vllm serve`, for tests on machines without a GPU (vLLM cannot run there).

It takes vLLM's command line as Modelium's vLLM adapter builds it, records the arguments and the
CUDA_VISIBLE_DEVICES it was given (JSON lines in $MODELIUM_STANDIN_RECORD), and then serves the
model with Modelium's embedded server on the CPU: the same OpenAI protocol vLLM speaks
(`/health`, `/v1/models`, `/v1/completions`, `/v1/chat/completions` with SSE streaming).

With `--enable-sleep-mode` and VLLM_SERVER_DEV_MODE=1 it also speaks vLLM's sleep mode as vLLM's
own server does (`vllm/entrypoints/serve/sleep/api_router.py`): `POST /sleep?level=N`, `POST
/wake_up`, `GET /is_sleeping` -> {"is_sleeping": bool}. Each sleep and wake is recorded, and while
it sleeps the file `<record>.<pid>.asleep` exists (the NVML seam of a test reads it: a sleeping
vLLM frees most of its GPU memory). A request to a sleeping engine is answered 503: it serves
nothing until woken.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any


def _record(entry: dict[str, Any]) -> None:
    record = os.environ.get("MODELIUM_STANDIN_RECORD")
    if record:
        with open(record, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({**entry, "pid": os.getpid()}) + "\n")


class SleepMode:
    """ASGI wrapper: vLLM's sleep-mode routes in front of the model's own."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.level = 0
        record = os.environ.get("MODELIUM_STANDIN_RECORD")
        self.marker = Path(f"{record}.{os.getpid()}.asleep") if record else None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, method = scope["path"], scope["method"]
        if path == "/sleep" and method == "POST":
            query = dict(part.split("=", 1) for part in scope["query_string"].decode().split("&") if "=" in part)
            level = query.get("level", "1")
            if level not in ("1", "2"):
                await _answer(send, 400, {"error": f"level must be 1 or 2, not {level}"})
                return
            self.level = int(level)
            if self.marker is not None:
                self.marker.touch()
            _record({"event": "sleep", "level": self.level})
            await _answer(send, 200, None)
        elif path == "/wake_up" and method == "POST":
            self.level = 0
            if self.marker is not None:
                self.marker.unlink(missing_ok=True)
            _record({"event": "wake_up"})
            await _answer(send, 200, None)
        elif path == "/is_sleeping" and method == "GET":
            await _answer(send, 200, {"is_sleeping": self.level > 0})
        elif self.level and path not in ("/health", "/v1/models", "/metrics"):
            await _answer(send, 503, {"error": {"message": "the engine is sleeping", "type": "server_error"}})
        else:
            await self.app(scope, receive, send)


async def _answer(send: Any, status: int, body: dict[str, Any] | None) -> None:
    data = b"" if body is None else json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="vllm")
    parser.add_argument("command", choices=["serve"])
    parser.add_argument("model")
    parser.add_argument("--served-model-name", required=True)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tensor-parallel-size", type=int, required=True)
    parser.add_argument("--gpu-memory-utilization", type=float, required=True)
    parser.add_argument("--enable-sleep-mode", action="store_true")
    args, extra = parser.parse_known_args(argv)
    _record({"argv": argv, "extra": extra, "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")})

    import torch
    import uvicorn

    from modelium.runtimes.embedded_server.engine import Engine, load
    from modelium.runtimes.embedded_server.http import Routes

    torch.set_num_threads(1)
    app: Any = Routes(Engine(load(args.model, args.served_model_name, "text-generation", "cpu"))).app()
    if args.enable_sleep_mode and os.environ.get("VLLM_SERVER_DEV_MODE") == "1":
        app = SleepMode(app)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main(sys.argv[1:])
