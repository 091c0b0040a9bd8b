"""The inference path shared by `/predict` and `/v1/*`: find a model that serves (loading it
if need be), send its runtime the request, and account for it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from api.auth import Principal
from api.coldstart import failed_model
from api.deps import Gateway
from api.errors import (
    BadRequest,
    GatewayError,
    GatewayTimeout,
    ModelNotFound,
    ModelNotReady,
    UpstreamError,
    public_detail,
)
from api.registry import ModelRegistry
from api.upstream import Stream, UpstreamFailure, UpstreamTimeout
from modelium.names import InvalidModelName, validate_model_name, workflow_id
from modelium.types import ModelState, Phase, Task
from workflows.contracts import HealthReport
from workflows.lifecycle import ModelLifecycleWorkflow

log = logging.getLogger(__name__)

RELOAD_RETRY_AFTER = 10.0
# The caller was already let through to this model; this re-reads it (a held request).
_ANY_MODEL = Principal("gateway", "gateway", admin=False)


# How many model names a "not found" answer lists.
KNOWN_MODELS_IN_404 = 50


async def known_model(registry: ModelRegistry, name: str, principal: Principal) -> ModelState:
    """The state of `name`, or ModelNotFound listing the models that exist (those the caller's key
    may see: a model outside its `models` is not found, as if it did not exist)."""
    try:
        validate_model_name(name)
    except InvalidModelName as exc:
        raise BadRequest(str(exc), param="model") from None
    state = await registry.get(name) if principal.may_use(name) else None
    if state is None:
        # One page of names, not the whole fleet: a 404 must stay cheap at 10,000 models.
        names, more = await registry.some_names(KNOWN_MODELS_IN_404)
        known = [n for n in names if principal.may_use(n)]
        listing = ", ".join(known) if known else "none yet"
        if more:
            listing += ", … (GET /models lists them all)"
        raise ModelNotFound(
            f"model {name!r} not found; known models: {listing}",
            param="model",
            extra={"known_models": known},
        )
    return state


async def serving_model(
    gw: Gateway, name: str, principal: Principal, tally: Tally | None = None, *, route: str | None = None
) -> ModelState:
    """The state of a model that serves now; a model that is not loaded is loaded first, and
    this waits for it (bounded). `route`: an OpenAI route, which serves text generation only."""
    state = await routable_model(gw, name, principal, tally, route=route)
    if state.phase == Phase.LOADED and state.endpoint is not None:
        return state
    return await gw.cold.wait_loaded(state)


async def routable_model(
    gw: Gateway, name: str, principal: Principal, tally: Tally | None = None, *, route: str | None = None
) -> ModelState:
    """The model's state if a request may go to it now or once it loads; the errors a request
    gets at once otherwise (unknown, the wrong task for `route`, failed, restarting)."""
    state = await known_model(gw.registry, name, principal)
    if tally is not None:
        tally.model = state.name  # known: a label from here on, whatever the answer
    if route is not None and state.task is not None and state.task != Task.TEXT_GENERATION:
        raise BadRequest(
            f"model {name} is a {state.task} model; {route} serves text-generation models. "
            f'Use POST /predict/{name} with {{"inputs": ...}}',
            param="model",
            extra={"task": state.task},
        )
    if state.phase == Phase.LOADED and state.endpoint is not None:
        return state
    if state.phase == Phase.FAILED:
        raise failed_model(state)
    if state.phase == Phase.RESTARTING:
        wait = max(1, math.ceil((state.restart_at or 0) - time.time()))
        raise ModelNotReady(
            f"model {name} is restarting: {public_detail(state.last_error or '')}",
            retry_after=wait,
            extra={"phase": state.phase},
        )
    return state


class Tally:
    """One request's bookkeeping: Prometheus series and the usage signal. `status` is what the
    request ends with (500 until the route says otherwise; 0 when a stream's end decides)."""

    __slots__ = ("gw", "organization", "started", "model", "runtime", "status")

    def __init__(self, gw: Gateway, principal: Principal) -> None:
        self.gw = gw
        self.organization = principal.organization
        self.started = time.perf_counter()
        self.model = "_unknown"  # a name from the request is a label only once it is known
        self.runtime = "none"
        self.status = 500

    def routed(self, state: ModelState) -> None:
        self.model = state.name
        self.runtime = state.endpoint.runtime if state.endpoint else "none"

    def finish(self, status: int) -> None:
        metrics = self.gw.metrics
        seconds = time.perf_counter() - self.started
        metrics.requests.labels(
            model=self.model, runtime=self.runtime, status=str(status), organizationId=self.organization
        ).inc()
        self.gw.events.request(self.model, self.organization, status, seconds)
        self.gw.recent.add(self.model, self.organization, status, seconds)
        if status == 200:
            metrics.request_duration.labels(model=self.model, runtime=self.runtime).observe(seconds)
            self.gw.usage.record(self.model, self.organization)
            self.gw.registry.mark_used(self.model)


@contextlib.contextmanager
def tallied(gw: Gateway, principal: Principal) -> Iterator[Tally]:
    """Count one inference request however it ends: with the status the route set, a gateway
    error's status, or 500. A streamed answer (status 0) is counted by `relay` when it ends."""
    tally = Tally(gw, principal)
    try:
        yield tally
    except GatewayError as exc:
        tally.status = exc.status
        raise
    finally:
        if tally.status:
            tally.finish(tally.status)


async def answered(request: Request) -> int:
    """200, or 499 when the client hung up while it waited and so did not get its answer (as for
    a stream)."""
    return 499 if await request.is_disconnected() else 200


def check_max_tokens(gw: Gateway, body: object, *fields: str) -> None:
    """Refuse a token budget over `gateway.max_tokens_limit`, naming the field."""
    limit = gw.settings.gateway.max_tokens_limit
    for field in fields:
        value = getattr(body, field, None)
        if value is not None and value > limit:
            raise BadRequest(f"{field} must be at most {limit} (gateway.max_tokens_limit)", param=field)


async def _unreachable(gw: Gateway, state: ModelState, exc: Exception) -> GatewayError:
    """The runtime did not answer: tell the workflow, which checks it and reloads it."""
    assert state.endpoint is not None
    if isinstance(exc, UpstreamTimeout):
        # Slow is not dead: the client hears so, and the workflow is not bothered.
        return GatewayTimeout(
            f"model {state.name}'s runtime did not answer in time (gateway.request_timeout_seconds): {exc}"
        )
    gw.registry.invalidate(state.name)
    gw.upstream.forget(state.endpoint.url)
    handle = gw.temporal.get_workflow_handle(workflow_id(state.name))
    try:
        await handle.signal(
            ModelLifecycleWorkflow.report_unhealthy,
            HealthReport(f"gateway could not reach {state.endpoint.url}: {exc}"),
        )
    except Exception as signal_exc:  # the 503 below is still the right answer
        log.warning("could not report %s as unhealthy: %s", state.name, signal_exc)
    return ModelNotReady(
        f"model {state.name}'s runtime did not answer ({exc}); it is being checked and reloaded",
        retry_after=state.load_seconds or RELOAD_RETRY_AFTER,
    )


def upstream_failure(state: ModelState, status: int, content: bytes) -> GatewayError:
    """The runtime answered with an error: its 4xx are the client's, its 5xx are ours."""
    message: str = content[:500].decode("utf-8", "replace")
    param = code = None
    try:
        err = json.loads(content).get("error")
        if isinstance(err, dict):
            message, param = str(err.get("message")), err.get("param")
            code = err.get("code") if isinstance(err.get("code"), str) else None
        elif isinstance(err, str):
            message = err
    except (ValueError, AttributeError):
        pass
    if 400 <= status < 500:
        return BadRequest(f"{state.name}: {message}", param=param, status=status, code=code)
    return UpstreamError(f"{state.name}'s runtime failed ({status}): {public_detail(message)}")


async def post(gw: Gateway, state: ModelState, path: str, content: bytes) -> tuple[ModelState, bytes]:
    """POST `content` to the runtime; return the state that answered and its answer, unparsed. A
    runtime that cannot be reached (its process or its whole node gone) is reported, and the
    request is held until the model serves again, as for a cold model, then sent once more."""
    try:
        return state, await _post_once(gw, state, path, content)
    except _Unreachable as exc:
        if isinstance(exc.failure, GatewayTimeout):
            raise exc.failure from None
        state = await _serving_again(gw, state, exc.failure)
    try:
        return state, await _post_once(gw, state, path, content)
    except _Unreachable as exc:
        raise exc.failure from None


class _Unreachable(Exception):
    def __init__(self, failure: GatewayError) -> None:
        self.failure = failure


async def _post_once(gw: Gateway, state: ModelState, path: str, content: bytes) -> bytes:
    assert state.endpoint is not None
    try:
        stream = await gw.upstream.open(state.endpoint.url + path, content)
        if stream.status >= 400:
            raise upstream_failure(state, stream.status, await stream.read())
        return await stream.read()
    except UpstreamFailure as exc:
        raise _Unreachable(await _unreachable(gw, state, exc)) from exc


async def _serving_again(gw: Gateway, failed: ModelState, failure: GatewayError) -> ModelState:
    """Wait (bounded by the cold-start timeout) until the model serves from another endpoint: its
    runtime restarted, or the model placed on another node. A model that is restarting after a
    crash, or failed, is answered as it is (503 with Retry-After)."""
    assert failed.endpoint is not None
    deadline = time.monotonic() + gw.settings.gateway.cold_start_timeout_seconds
    while time.monotonic() < deadline:
        state = await gw.registry.get(failed.name, fresh=True)
        if state is None:
            raise failure
        if state.phase != Phase.LOADED:
            return await serving_model(gw, failed.name, _ANY_MODEL)
        if state.endpoint is not None and state.endpoint.url != failed.endpoint.url:
            return state
        await asyncio.sleep(0.25)
    raise failure


async def post_json(gw: Gateway, state: ModelState, path: str, payload: dict[str, Any]) -> tuple[ModelState, Any]:
    served_by, content = await post(gw, state, path, json.dumps(payload).encode())
    return served_by, json.loads(content)


async def open_stream(gw: Gateway, state: ModelState, path: str, content: bytes) -> Stream:
    """POST and return the runtime's answer with its body not read yet (server-sent events)."""
    assert state.endpoint is not None
    try:
        stream = await gw.upstream.open(state.endpoint.url + path, content)
    except UpstreamFailure as exc:
        raise await _unreachable(gw, state, exc) from exc
    if stream.status >= 400:
        try:
            body = await stream.read()
        except UpstreamFailure as exc:
            raise await _unreachable(gw, state, exc) from exc
        raise upstream_failure(state, stream.status, body)
    return stream


class ClosingStreamingResponse(StreamingResponse):
    """A streamed answer whose body is closed as soon as the response ends, however it ends.
    When the client hangs up while the answer is being sent, Starlette stops iterating the body
    but leaves the generator suspended; it was then closed (and the request counted, as 499)
    only when the garbage collector got to it, which could take many seconds."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:
                await close()


async def relay(gw: Gateway, state: ModelState, stream: Stream, tally: Tally, client: Request) -> AsyncIterator[bytes]:
    """Pass the runtime's event stream through as it arrives: no buffering, no re-encoding. A
    client that hung up is counted as 499: the stream is cancelled then (below), or, when the
    runtime finished first, noticed at the end."""
    status = 200
    try:
        async for chunk in stream.chunks():
            yield chunk
        if await client.is_disconnected():
            status = 499
    except UpstreamFailure as exc:
        status = 502
        yield (await _unreachable(gw, state, exc)).sse()
    except BaseException:
        status = 499  # the client went away (the stream was cancelled)
        raise
    finally:
        # Counted first: when the client hung up, this task is being cancelled, and the close
        # below (an await) may be cancelled in turn before anything after it runs.
        tally.finish(status)
        await stream.aclose()


async def stream_after_load(
    gw: Gateway, state: ModelState, path: str, content: bytes, tally: Tally, client: Request
) -> AsyncIterator[bytes]:
    """A streamed request whose model is not loaded yet: SSE comments while it loads (`: loading
    tiny 1.8s of ~4.1s`, once a second; clients ignore comments, as the SSE standard says), then
    the runtime's stream. The answer's status line is sent already, so a load that fails ends
    the stream with an error event in the gateway's envelope."""
    name = state.name
    expected = state.load_seconds
    started = time.monotonic()
    load = asyncio.create_task(gw.cold.wait_loaded(state), name=f"stream-waits-{name}")
    try:
        while True:
            elapsed = time.monotonic() - started
            of = f" of ~{expected:.1f}s" if expected else ""
            yield f": loading {name} {elapsed:.1f}s{of}\n\n".encode()
            done, _ = await asyncio.wait({load}, timeout=1.0)
            if done:
                break
            if await client.is_disconnected():
                tally.finish(499)
                return
        loaded = load.result()
        tally.routed(loaded)
        upstream = await open_stream(gw, loaded, path, content)
    except GatewayError as exc:
        tally.finish(exc.status)
        yield exc.sse()
        yield b"data: [DONE]\n\n"
        return
    except BaseException:
        tally.finish(499)  # the client went away while it waited (the stream was cancelled)
        raise
    finally:
        if not load.done():
            load.cancel()  # the waiter is withdrawn (ColdStarts counts it out)
    async for chunk in relay(gw, loaded, upstream, tally, client):
        yield chunk
