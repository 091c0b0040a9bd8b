"""Request body size limit, as plain ASGI middleware so it costs next to nothing per request."""

from __future__ import annotations

import contextlib

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import PayloadTooLarge


class BodyLimit:
    """Refuse bodies over `limit` bytes with a 413: by Content-Length before reading anything,
    or while reading a body sent without one (chunked)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > self.limit:
                    await self._too_large(declared).response()(scope, receive, send)
                    return
                break
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise self._too_large(received)  # rendered by the GatewayError handler
            return message

        await self.app(scope, counted, send)

    def _too_large(self, size: int) -> PayloadTooLarge:
        return PayloadTooLarge(
            f"the request body ({size} bytes) is larger than the limit of {self.limit} bytes (gateway.max_body_bytes)",
            param="body",
        )


class HeadAsGet:
    """HEAD is answered for every GET route, as HTTP requires: the GET runs and its body is
    dropped (headers, Content-Length included, are kept). FastAPI routes answer GET only."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def headers_only(message: Message) -> None:
            if message["type"] != "http.response.body":
                await send(message)
                return
            # The answer ends with its headers: a streamed GET (GET /events) would never end.
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            raise _HeadAnswered

        with contextlib.suppress(_HeadAnswered):
            await self.app({**scope, "method": "GET"}, receive, headers_only)


class _HeadAnswered(Exception):
    """Stops the GET behind a HEAD once the headers are sent."""
