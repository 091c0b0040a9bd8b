"""The embedded runtime's HTTP face: OpenAI's `/v1/completions`, `/v1/chat/completions` and
`/v1/models` for text generation, `POST /predict` for every task, `/health`; errors in OpenAI's
envelope, streams as OpenAI's server-sent events."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from modelium.runtimes.embedded_server.engine import TEXT_GENERATION, BadRequest, Engine

log = logging.getLogger("modelium.embedded_server")

MAX_BATCH = 64


class Routes:
    """The routes of one model's server."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.m = engine.m
        # Requests being answered, streams until their last byte: /health tells it, so that an
        # old version being replaced is stopped once it has answered what it had (a drain).
        self.in_flight = 0

    async def completions(self, request: Request) -> Response:
        body = await _json(request)
        prompt = body.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if (
            not isinstance(prompts, list)
            or not prompts
            or len(prompts) > MAX_BATCH
            or not all(isinstance(p, str) for p in prompts)
        ):
            raise BadRequest(f"prompt must be a string or a list of 1-{MAX_BATCH} strings", "prompt")
        ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if _streaming(body):
            if len(prompts) != 1:
                raise BadRequest("stream supports one prompt per request", "prompt")
            gen = self.engine.prepare(prompts[0], body)  # bad parameters are a 400, not a broken stream
            result: dict[str, Any] = {}

            def chunk(text: str, finish: str | None) -> dict[str, Any]:
                return {
                    "id": ident,
                    "object": "text_completion",
                    "created": created,
                    "model": self.m.name,
                    "system_fingerprint": self.m.fingerprint,
                    "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
                }

            return _sse(self.engine.stream(gen, result), chunk, result, body)
        results = [await run_in_threadpool(self.engine.generate, p, body) for p in prompts]
        return JSONResponse(
            {
                "id": ident,
                "object": "text_completion",
                "created": created,
                "model": self.m.name,
                "system_fingerprint": self.m.fingerprint,
                "choices": [
                    {"index": i, "text": r["text"], "finish_reason": r["finish_reason"], "logprobs": None}
                    for i, r in enumerate(results)
                ],
                "usage": _usage(results),
            }
        )

    async def chat_completions(self, request: Request) -> Response:
        body = await _json(request)
        if "max_completion_tokens" in body and "max_tokens" not in body:
            body["max_tokens"] = body["max_completion_tokens"]
        prompt = self.engine.chat_prompt(body)
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if _streaming(body):
            gen = self.engine.prepare(prompt, body)
            result: dict[str, Any] = {}
            first = True

            def chunk(text: str, finish: str | None) -> dict[str, Any]:
                nonlocal first
                delta: dict[str, Any] = {"content": text} if finish is None else {}
                if first:
                    delta["role"], first = "assistant", False
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
                return {
                    "id": ident,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": self.m.name,
                    "system_fingerprint": self.m.fingerprint,
                    "choices": [choice],
                }

            return _sse(self.engine.stream(gen, result), chunk, result, body)
        done = await run_in_threadpool(self.engine.generate, prompt, body)
        return JSONResponse(
            {
                "id": ident,
                "object": "chat.completion",
                "created": created,
                "model": self.m.name,
                "system_fingerprint": self.m.fingerprint,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": done["text"]},
                        "finish_reason": done["finish_reason"],
                    }
                ],
                "usage": _usage([done]),
            }
        )

    async def predict(self, request: Request) -> JSONResponse:
        body = await _json(request)
        inputs = body.get("inputs")
        texts = [inputs] if isinstance(inputs, str) else inputs
        if (
            not isinstance(texts, list)
            or not texts
            or len(texts) > MAX_BATCH
            or not all(isinstance(t, str) and t for t in texts)
        ):
            raise BadRequest(f"inputs must be a string or a list of 1-{MAX_BATCH} strings", "inputs")
        if self.m.task == TEXT_GENERATION:
            results = [await run_in_threadpool(self.engine.generate, t, body) for t in texts]
            outputs: list[Any] = [r["text"] for r in results]
            usage = _usage(results)
            cut_to = None
        else:
            outputs, tokens, cut_to = await run_in_threadpool(self.engine.infer, texts)
            usage = {"prompt_tokens": tokens, "completion_tokens": 0, "total_tokens": tokens}
        output = outputs[0] if isinstance(inputs, str) else outputs
        answer: dict[str, Any] = {"model": self.m.name, "task": self.m.task, "output": output, "usage": usage}
        if cut_to is not None:
            answer["truncated"] = True
            answer["warning"] = f"inputs longer than the model's limit of {cut_to} tokens were truncated to it"
        return JSONResponse(answer)

    async def health(self, request: Request) -> JSONResponse:
        return JSONResponse(
            {
                "status": "ok",
                "model": self.m.name,
                "task": self.m.task,
                "fingerprint": self.m.fingerprint,
                "in_flight": self.in_flight,
            }
        )

    async def models(self, request: Request) -> JSONResponse:
        return JSONResponse(
            {
                "object": "list",
                "data": [{"id": self.m.name, "object": "model", "created": self.m.created, "owned_by": "modelium"}],
            }
        )

    def app(self) -> _Counting:
        routes = [
            Route("/health", self.health),
            Route("/v1/models", self.models),
            Route("/predict", _guard(self.predict), methods=["POST"]),
        ]
        if self.m.task == TEXT_GENERATION:
            routes += [
                Route("/v1/completions", _guard(self.completions), methods=["POST"]),
                Route("/v1/chat/completions", _guard(self.chat_completions), methods=["POST"]),
            ]
        return _Counting(Starlette(routes=routes), self)


class _Counting:
    """ASGI middleware: counts the requests being answered (all but /health), a streamed one
    until its last body message is sent or the client goes away."""

    def __init__(self, app: Any, routes: Routes) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] == "/health":
            await self.app(scope, receive, send)
            return
        self.routes.in_flight += 1
        done = False

        async def counted(message: Any) -> None:
            nonlocal done
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body") and not done:
                done = True
                self.routes.in_flight -= 1

        try:
            await self.app(scope, receive, counted)
        finally:
            if not done:
                self.routes.in_flight -= 1


def _error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


def _streaming(body: dict[str, Any]) -> bool:
    stream = body.get("stream", False)
    if stream is None:
        return False
    if not isinstance(stream, bool):
        raise BadRequest("stream must be true or false", "stream")
    return stream


def _sse(
    pieces: AsyncIterator[str],
    chunk: Callable[[str, str | None], dict[str, Any]],
    result: dict[str, Any],
    body: dict[str, Any],
) -> StreamingResponse:
    """OpenAI's server-sent events: a chunk per piece of text, a last chunk with the finish reason,
    a usage chunk when `stream_options.include_usage` asks for it, then `[DONE]`."""
    options = body.get("stream_options") or {}
    include_usage = isinstance(options, dict) and bool(options.get("include_usage"))

    async def events() -> AsyncIterator[bytes]:
        try:
            async for piece in pieces:
                yield _event(chunk(piece, None))
        except Exception as exc:  # the status line is sent already: report it in the stream
            log.exception("generation failed mid-stream")
            yield _event(
                {"error": {"message": f"generation failed: {exc}", "type": "server_error", "param": None, "code": None}}
            )
            return
        finally:
            await pieces.aclose()  # type: ignore[attr-defined]
        last = chunk("", result["finish_reason"])
        yield _event(last)
        if include_usage:
            yield _event({**last, "choices": [], "usage": _usage([result])})
        yield b"data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _event(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


def _usage(results: list[dict[str, Any]]) -> dict[str, int]:
    prompt = sum(r["prompt_tokens"] for r in results)
    completion = sum(r["completion_tokens"] for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _json(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise BadRequest("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body


def _guard(handler: Any) -> Any:
    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except BadRequest as exc:
            return _error(400, str(exc), exc.param, exc.code)

    return wrapped
