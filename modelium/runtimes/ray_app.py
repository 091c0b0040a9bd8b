"""The Ray Serve application Modelium deploys for one model: a transformers pipeline behind
`GET <prefix>/health` (with the requests it is answering, `in_flight`, which an update's drain
reads) and `POST <prefix>/predict {"inputs": ...} -> {"output": ...}` (Modelium's JSON
protocol). Import path: `modelium.runtimes.ray_app:build`; imported only in Ray's workers."""

from __future__ import annotations

import asyncio
from typing import Any

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse


def _plain(value: Any) -> Any:
    """Pipeline results as JSON: tensors and arrays become lists."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


@serve.deployment(name="ModeliumModel")
class ModeliumModel:
    def __init__(self, model_dir: str, task: str, name: str) -> None:
        import torch
        from transformers import pipeline

        self.name, self.task = name, task
        self.in_flight = 0
        self.pipe = pipeline(task, model=model_dir, device=0 if torch.cuda.is_available() else -1)  # type: ignore[call-overload]

    async def __call__(self, request: Request) -> JSONResponse:
        path = request.url.path.rstrip("/")
        if path.endswith("/health"):
            return JSONResponse({"status": "ok", "model": self.name, "task": self.task, "in_flight": self.in_flight})
        if request.method != "POST" or not path.endswith("/predict"):
            return JSONResponse({"error": {"message": f"no route {request.method} {path}"}}, status_code=404)
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"error": {"message": "the body is not JSON"}}, status_code=400)
        inputs = body.get("inputs") if isinstance(body, dict) else None
        if inputs is None or inputs == [] or inputs == "":
            return JSONResponse({"error": {"message": "inputs is required", "param": "inputs"}}, status_code=400)
        self.in_flight += 1
        try:
            output = await asyncio.to_thread(self.pipe, inputs)
        finally:
            self.in_flight -= 1
        return JSONResponse({"model": self.name, "task": self.task, "output": _plain(output)})


def build(args: dict[str, str]) -> Any:
    return ModeliumModel.bind(args["model_dir"], args["task"], args["name"])  # type: ignore[attr-defined]
