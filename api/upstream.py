"""The gateway's hop to runtime endpoints: a lean keep-alive HTTP/1.1 client.

Every inference request crosses this hop, so it is built for that one job: POST a body to a
runtime and hand back its answer, whole or as it streams. Connections are kept per endpoint in
a LIFO stack (the most recently used one is the least likely to have timed out), responses are
parsed by httptools (llhttp, in C), and nothing is copied or re-encoded on the way.

Why not httpx here: profiling the gateway at 256 concurrent clients showed most of its time in
httpcore's connection pool, which walks every connection for every request
(`_assign_requests_to_connections`, `is_idle`, a readability syscall per idle connection);
throughput fell to 7-17% of direct. httpx stays the client everywhere else.
"""

from __future__ import annotations

import asyncio
import functools
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import httptools

# A streaming client that reads slower than the runtime writes: stop reading past this.
_HIGH_WATER = 1 << 20


class UpstreamFailure(Exception):
    """The runtime could not be reached, or the connection broke before a full answer."""


class UpstreamTimeout(UpstreamFailure):
    """The runtime took longer than the request timeout."""


@dataclass
class Answer:
    status: int
    body: bytes


class _Connection(asyncio.Protocol):
    """One connection; one request at a time. httptools calls the `on_*` methods."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.reused = False
        self._reset()

    def _reset(self) -> None:
        loop = asyncio.get_running_loop()
        self.status = 0
        self.keep_alive = False
        self.got_bytes = False
        self.complete = False
        self.headers_ready: asyncio.Future[None] = loop.create_future()
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.readable = asyncio.Event()
        self.error: UpstreamFailure | None = None
        self.paused = False

    # -- asyncio.Protocol ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, but have its methods.
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamFailure(f"malformed answer from the runtime: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.complete:
            reason = f": {exc}" if exc else ""
            self._fail(UpstreamFailure(f"the runtime closed the connection before answering in full{reason}"))

    # -- httptools callbacks -------------------------------------------------------------------
    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        # Read now: once the message is complete the parser has moved on to the next one.
        self.keep_alive = self.parser.should_keep_alive()
        if not self.headers_ready.done():
            self.headers_ready.set_result(None)

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        self.readable.set()
        if self.buffered > _HIGH_WATER and self.transport is not None and not self.paused:
            self.paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        self.complete = True
        self.readable.set()

    # -- use -----------------------------------------------------------------------------------
    def _fail(self, error: UpstreamFailure) -> None:
        self.error = error
        if not self.headers_ready.done():
            self.headers_ready.set_exception(error)
            self.headers_ready.exception()  # retrieved here; the caller re-raises self.error
        self.readable.set()

    def send(self, data: bytes) -> None:
        self._reset()
        if self.closed or self.transport is None:
            self._fail(UpstreamFailure("the connection to the runtime was closed"))
            return
        self.transport.write(data)

    async def next_chunk(self) -> bytes | None:
        """The next piece of the body as it arrived, or None at its end."""
        while not self.chunks:
            if self.complete:
                return None
            if self.error is not None:
                raise self.error
            self.readable.clear()
            await self.readable.wait()
        chunk = self.chunks.popleft()
        self.buffered -= len(chunk)
        if self.paused and self.buffered < _HIGH_WATER // 2 and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return chunk

    @property
    def reusable(self) -> bool:
        return self.complete and not self.closed and self.keep_alive

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


@functools.lru_cache(maxsize=1024)
def _target(url: str) -> tuple[str, int, str]:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"runtime endpoints are plain http://host:port URLs, not {url!r}")
    return parts.hostname, parts.port or 80, parts.path or "/"


class Stream:
    """A runtime's answer whose body is read as it arrives. Close it (or read it to the end)."""

    def __init__(self, pool: UpstreamPool, key: tuple[str, int], conn: _Connection) -> None:
        self.status = conn.status
        self._pool, self._key, self._conn = pool, key, conn
        self._open = True

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            while True:
                async with asyncio.timeout(self._pool.timeout):
                    chunk = await self._conn.next_chunk()
                if chunk is None:
                    return
                yield chunk
        except TimeoutError:
            raise UpstreamTimeout(f"the runtime sent nothing for {self._pool.timeout:g}s") from None
        finally:
            await self.aclose()

    async def read(self) -> bytes:
        return b"".join([c async for c in self.chunks()])

    async def aclose(self) -> None:
        if self._open:
            self._open = False
            self._pool.release(self._key, self._conn)


class UpstreamPool:
    def __init__(self, *, timeout: float, connect_timeout: float = 5.0, max_idle_per_endpoint: int = 512) -> None:
        self.timeout = timeout
        self._connect_timeout = connect_timeout
        self._max_idle = max_idle_per_endpoint
        self._idle: dict[tuple[str, int], list[_Connection]] = {}

    async def post(self, url: str, body: bytes) -> Answer:
        stream = await self.open(url, body)
        try:
            async with asyncio.timeout(self.timeout):
                return Answer(stream.status, await stream.read())
        except TimeoutError:
            raise UpstreamTimeout(f"the runtime did not answer within {self.timeout:g}s") from None
        finally:
            await stream.aclose()

    async def open(self, url: str, body: bytes) -> Stream:
        """Send the request; return once the answer's status and headers are in."""
        host, port, path = _target(url)
        key = (host, port)
        request = (
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        for attempt in range(2):
            conn = await self._acquire(key)
            conn.send(request)
            try:
                async with asyncio.timeout(self.timeout):
                    await conn.headers_ready
            except TimeoutError:
                conn.close()
                raise UpstreamTimeout(f"the runtime did not answer within {self.timeout:g}s") from None
            except UpstreamFailure:
                conn.close()
                # A kept-alive connection the runtime had just closed: the request never got
                # there (no byte came back), so sending it once more on a new one is safe. The
                # other idle ones are likely as stale: the retry opens a fresh connection.
                if attempt == 0 and conn.reused and not conn.got_bytes:
                    self._drop_idle(key)
                    continue
                raise
            return Stream(self, key, conn)
        raise AssertionError("unreachable")

    async def _acquire(self, key: tuple[str, int]) -> _Connection:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if not conn.closed:
                conn.reused = True
                return conn
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, conn = await loop.create_connection(_Connection, *key)
        except TimeoutError:
            raise UpstreamFailure(f"could not connect to {key[0]}:{key[1]} within {self._connect_timeout:g}s") from None
        except OSError as exc:
            raise UpstreamFailure(f"could not connect to {key[0]}:{key[1]}: {exc.strerror or exc}") from None
        return conn

    def release(self, key: tuple[str, int], conn: _Connection) -> None:
        idle = self._idle.setdefault(key, [])
        if conn.reusable and len(idle) < self._max_idle:
            idle.append(conn)
        else:
            conn.close()

    def forget(self, url: str) -> None:
        """Close the idle connections to an endpoint (its runtime went away)."""
        host, port, _ = _target(url)
        self._drop_idle((host, port))

    def _drop_idle(self, key: tuple[str, int]) -> None:
        for conn in self._idle.pop(key, []):
            conn.close()

    async def aclose(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
