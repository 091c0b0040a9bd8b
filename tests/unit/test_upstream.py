"""The gateway's HTTP/1.1 pool to runtime endpoints, against a real HTTP server (uvicorn)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from api.upstream import UpstreamFailure, UpstreamPool, UpstreamTimeout
from modelium.runtimes.process import free_port


class Runtime:
    """A tiny HTTP server standing in for a runtime endpoint; it records client connections."""

    def __init__(self) -> None:
        self.peers: set[tuple[str, int]] = set()
        self.gate = asyncio.Event()

    def app(self) -> Starlette:
        async def echo(request: Request) -> Response:
            assert request.client is not None
            self.peers.add((request.client.host, request.client.port))
            return JSONResponse({"got": len(await request.body())})

        async def slow(request: Request) -> Response:
            await asyncio.sleep(5)
            return Response(b"late")

        async def stream(request: Request) -> Response:
            async def events() -> AsyncIterator[bytes]:
                yield b"data: first\n\n"
                await self.gate.wait()  # the test opens the gate after it saw the first event
                yield b"data: second\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")

        return Starlette(
            routes=[
                Route("/echo", echo, methods=["POST"]),
                Route("/slow", slow, methods=["POST"]),
                Route("/stream", stream, methods=["POST"]),
            ]
        )


@contextlib.asynccontextmanager
async def serving(runtime: Runtime, port: int) -> AsyncIterator[str]:
    server = uvicorn.Server(uvicorn.Config(runtime.app(), port=port, log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


async def test_keep_alive_reuse_and_a_restarted_runtime() -> None:
    port = free_port()
    pool = UpstreamPool(timeout=10)
    runtime = Runtime()
    async with serving(runtime, port) as url:
        for i in range(20):
            answer = await pool.post(url + "/echo", b"x" * i)
            assert (answer.status, answer.body) == (200, f'{{"got":{i}}}'.encode())
        assert len(runtime.peers) == 1, "sequential requests share one kept-alive connection"
    # The runtime restarts on the same port; the pool's idle connection is stale by now.
    async with serving(Runtime(), port) as url:
        assert (await pool.post(url + "/echo", b"{}")).status == 200
    await pool.aclose()


async def test_unreachable_and_slow_runtimes_fail_with_their_reason() -> None:
    pool = UpstreamPool(timeout=0.3, connect_timeout=1)
    with pytest.raises(UpstreamFailure, match="could not connect to 127.0.0.1"):
        await pool.post(f"http://127.0.0.1:{free_port()}/echo", b"{}")
    async with serving(Runtime(), free_port()) as url:
        with pytest.raises(UpstreamTimeout, match="within 0.3s"):
            await pool.post(url + "/slow", b"{}")
    await pool.aclose()


async def test_stream_chunks_arrive_before_the_answer_ends() -> None:
    pool = UpstreamPool(timeout=10)
    runtime = Runtime()
    async with serving(runtime, free_port()) as url:
        stream = await pool.open(url + "/stream", b"{}")
        assert stream.status == 200
        chunks = stream.chunks()
        # The server is blocked until the gate opens: this chunk can only come unbuffered.
        assert await chunks.__anext__() == b"data: first\n\n"
        runtime.gate.set()
        assert [c async for c in chunks] == [b"data: second\n\n"]
        # The connection went back to the pool and serves the next request.
        assert (await pool.post(url + "/echo", b"{}")).status == 200
    await pool.aclose()


async def test_connection_closed_by_the_runtime_as_the_request_arrives_is_retried_once() -> None:
    """A kept-alive connection the server drops when the next request comes (its keep-alive
    timeout fired just then) must not fail the request: it is resent on a new connection."""
    served_on: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        requests = 0
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
            )
            await reader.readexactly(length)
            requests += 1
            if requests == 2:  # the second request on a connection: drop it, answer nothing
                writer.close()
                return
            served_on.append(id(writer))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = UpstreamPool(timeout=5)
    async with server:
        first = await pool.post(f"http://127.0.0.1:{port}/x", b"{}")
        second = await pool.post(f"http://127.0.0.1:{port}/x", b"{}")
        assert (first.body, second.body) == (b"ok", b"ok")
        assert len(set(served_on)) == 2, "the second answer came on a new connection"
    await pool.aclose()
