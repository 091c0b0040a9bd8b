"""Management API: list models, load one (optionally pinned, with its own idle timeout), unload it."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import replace
from datetime import timedelta
from typing import Annotated, TypeVar

from fastapi import APIRouter, Body, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from temporalio.client import WorkflowFailureError, WorkflowUpdateFailedError, WorkflowUpdateRPCTimeoutOrCancelledError
from temporalio.service import RPCError

from api.auth import Principal, require_admin
from api.deps import Gateway, GatewayDep, PrincipalDep
from api.errors import BadRequest, Conflict, GatewayError, ModelNotReady, public_detail, temporal_error
from api.schemas import LoadModelRequest, ModelInfo, ModelList, RollbackModelRequest, RuntimeLog, UnloadModelRequest
from api.serving import known_model
from modelium.names import model_of, workflow_id
from modelium.types import LISTED_PHASES, ModelState, Phase
from workflows.contracts import (
    EnsureLoadedRequest,
    EnsureUnloadedRequest,
    LoadCommand,
    RollbackRequest,
    UnloadCommand,
    failure_message,
)
from workflows.lifecycle import ModelLifecycleWorkflow
from workflows.logs import RuntimeLogWorkflow
from workflows.steps import LogRequest, LogTail

router = APIRouter(prefix="/models", tags=["models"])
_T = TypeVar("_T")


def _info(gw: Gateway, state: ModelState, principal: Principal) -> ModelInfo:
    info = ModelInfo.from_state(state)
    info.waiting_requests = gw.cold.waiting(state.name)
    return info if principal.admin else info.for_non_admin(principal.organization)


_PHASES = tuple(sorted(LISTED_PHASES))


@router.get("", response_model=ModelList)
async def list_models(
    gw: GatewayDep,
    principal: PrincipalDep,
    phase: Annotated[str | None, Query(description=f"only models in this phase: {', '.join(_PHASES)}")] = None,
    limit: Annotated[int | None, Query(ge=1, le=1000, description="one page of at most this many models")] = None,
    page_token: Annotated[str | None, Query(max_length=4096, description="previous next_page_token")] = None,
) -> ModelList:
    """Every model with its phase, runtime, node, memory, last use and request counts, read from
    Temporal's visibility store in one List call (no model's workflow is queried). Sorted by
    name without `limit`; with it, one page in the store's order and a `next_page_token`.
    A key without the admin scope sees its own organization's counts, and no paths, endpoints
    or error details."""
    if phase is not None and phase not in LISTED_PHASES:
        raise BadRequest(f"phase must be one of {', '.join(_PHASES)}, got {phase!r}", param="phase")
    token = None
    if page_token is not None:
        if limit is None:
            raise BadRequest("page_token needs limit (the page size it was made with)", param="page_token")
        token = _read_token(page_token, phase)
    if limit is None:
        states = await gw.registry.all()
        if phase is not None:
            states = [s for s in states if s.phase == phase]
        next_token = None
    else:
        states, next_raw = await gw.registry.listed(phase=phase, limit=limit, page_token=token)
        next_token = _make_token(next_raw, phase) if next_raw else None
    visible = [s for s in states if principal.may_use(s.name)]
    return ModelList(models=[_info(gw, s, principal) for s in visible], next_page_token=next_token)


def _make_token(raw: bytes, phase: str | None) -> str:
    """Temporal's page token, with the filter it belongs to and a checksum, so that a token
    mistyped or reused with another `phase` is refused here (Temporal answers those with an
    internal error after retries)."""
    body = json.dumps({"p": phase, "t": base64.b64encode(raw).decode("ascii")}, separators=(",", ":"))
    check = hashlib.sha256(body.encode()).hexdigest()[:16]
    return base64.urlsafe_b64encode(f"{check}{body}".encode()).decode("ascii").rstrip("=")


def _read_token(token: str, phase: str | None) -> bytes:
    try:
        text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        check, body = text[:16], text[16:]
        if hashlib.sha256(body.encode()).hexdigest()[:16] != check:
            raise ValueError("checksum")
        fields = json.loads(body)
        raw = base64.b64decode(fields["t"], validate=True)
    except (ValueError, KeyError, TypeError, UnicodeError):
        raise BadRequest("page_token is not a next_page_token this API handed out", param="page_token") from None
    if fields.get("p") != phase:
        raise BadRequest(
            f"page_token belongs to a listing with phase={fields.get('p')!r}; pass the same phase", param="page_token"
        )
    return raw


@router.get("/{name}", response_model=ModelInfo)
async def get_model(name: str, gw: GatewayDep, principal: PrincipalDep) -> ModelInfo:
    return _info(gw, await known_model(gw.registry, name, principal), principal)


@router.get("/{name}/logs", response_model=None, responses={200: {"model": RuntimeLog}})
async def model_logs(
    name: str,
    request: Request,
    gw: GatewayDep,
    principal: PrincipalDep,
    tail: Annotated[int, Query(ge=1, le=10_000, description="how many of the last lines")] = 200,
    follow: Annotated[bool, Query(description="stream new lines as server-sent events")] = False,
) -> RuntimeLog | StreamingResponse:
    """The end of the model's runtime log, read on the node that runs it (admin keys only).
    With `follow`, the lines as server-sent events (`data:` one line each), new ones once a
    second, for as long as the client stays."""
    require_admin(principal, "read runtime logs")
    gw.control.require(f"read the runtime log of {name}")
    state = await known_model(gw.registry, name, principal)
    node = (
        state.node
        or (state.booking.node if state.booking else None)
        or (state.decision.node if state.decision else None)
    )
    if node is None or state.runtime is None:
        raise ModelNotReady(
            f"model {name} has no runtime log: it was never placed on a node", extra={"phase": state.phase}
        )
    query = LogRequest(state.key, state.runtime, node, tail)
    first = await _read_log(gw, query)
    if not follow:
        return RuntimeLog(model=state.name, node=node, runtime=state.runtime, path=first.path, lines=first.lines)

    async def lines() -> AsyncIterator[bytes]:
        tail_now = first
        while True:
            for line in tail_now.lines:
                yield b"data: " + line.encode() + b"\n\n"
            yield b": following\n\n"
            await asyncio.sleep(1.0)
            if await request.is_disconnected():
                return
            try:
                tail_now = await _read_log(gw, replace(query, after=tail_now.size))
            except GatewayError as exc:
                yield exc.sse("error")
                return

    return StreamingResponse(lines(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _read_log(gw: Gateway, query: LogRequest) -> LogTail:
    """One short `ModeliumRuntimeLog` workflow: the node's activity reads the file."""
    name = model_of(query.model)  # the query names the instance (a new version's has its own log)
    try:
        return await gw.temporal.execute_workflow(
            RuntimeLogWorkflow.run,
            query,
            id=f"modelium-log-{name}-{uuid.uuid4().hex[:12]}",
            task_queue=gw.settings.temporal.control_task_queue,
            execution_timeout=timedelta(seconds=30),
        )
    except WorkflowFailureError as exc:
        # The workflow failed because its activity did: the activity's own error says why.
        cause: BaseException | None = exc.cause
        while cause is not None and cause.__cause__ is not None:
            cause = cause.__cause__
        message = getattr(cause, "message", None) or str(cause)
        raise ModelNotReady(f"could not read the runtime log of {name} on {query.node}: {message}") from None
    except RPCError as exc:
        raise temporal_error(exc, name, "read the runtime log of", on_unreachable=gw.control.mark_down) from None


@router.post("/{name}/load", response_model=ModelInfo, responses={202: {"model": ModelInfo}})
async def load_model(
    name: str,
    gw: GatewayDep,
    principal: PrincipalDep,
    body: Annotated[LoadModelRequest | None, Body()] = None,
) -> ModelInfo | JSONResponse:
    """Load the model (a failed one is retried). With `wait` (default) the answer comes once it
    serves; otherwise at once with 202."""
    require_admin(principal, "load models")
    gw.control.require(f"load {name}")
    body = body or LoadModelRequest()
    state = await known_model(gw.registry, name, principal)
    handle = gw.temporal.get_workflow_handle(workflow_id(name))
    reason = f"load requested through the API by {principal.name}"
    if not body.wait:
        command = LoadCommand(reason, body.pin, body.idle_timeout_seconds)
        return await _accepted(gw, state, "load", handle.signal(ModelLifecycleWorkflow.load, command), principal)
    request = EnsureLoadedRequest(reason, body.pin, body.idle_timeout_seconds)
    timeout = body.timeout_seconds or gw.settings.gateway.cold_start_timeout_seconds
    update = handle.execute_update(ModelLifecycleWorkflow.ensure_loaded, request)
    return await _settled(gw, state, "load", update, timeout, principal)


@router.post("/{name}/rollback", response_model=ModelInfo)
async def rollback_model(
    name: str,
    gw: GatewayDep,
    principal: PrincipalDep,
    body: Annotated[RollbackModelRequest | None, Body()] = None,
) -> ModelInfo | JSONResponse:
    """Serve the version served before the last switch again (admin keys only): loaded beside
    the current one, checked, switched to, as an update. Only while that version's files exist
    (numbered version folders, or a symlink to releases); the files rolled back from are held
    off until newer ones arrive. Answers once it serves (or 202 once `timeout_seconds` pass)."""
    require_admin(principal, "roll back models")
    gw.control.require(f"roll back {name}")
    body = body or RollbackModelRequest()
    state = await known_model(gw.registry, name, principal)
    if state.phase != Phase.LOADED:
        raise Conflict(f"only a loaded model can be rolled back; {name} is {state.phase}", extra={"phase": state.phase})
    if state.previous is None:
        raise Conflict(
            f"{name} has no previous version to roll back to: none was switched from since it was loaded, or "
            "its files were replaced in place (keep versions in numbered folders, or point the model's folder "
            "at a release with a symlink)"
        )
    handle = gw.temporal.get_workflow_handle(workflow_id(name))
    request = RollbackRequest(f"{body.reason} (by {principal.name})")
    timeout = body.timeout_seconds or gw.settings.gateway.cold_start_timeout_seconds
    try:
        after = await asyncio.wait_for(handle.execute_update(ModelLifecycleWorkflow.rollback, request), timeout)
    except (TimeoutError, WorkflowUpdateRPCTimeoutOrCancelledError):
        gw.registry.invalidate(name)
        return JSONResponse(_info(gw, state, principal).model_dump(mode="json"), status_code=202)
    except WorkflowUpdateFailedError as exc:
        # Refused (another update under way) or failed (the previous version did not come up):
        # the current version serves on either way.
        gw.registry.invalidate(name)
        raise Conflict(f"could not roll back {name}: {public_detail(failure_message(exc))}") from None
    except RPCError as exc:
        raise temporal_error(exc, name, "roll back", on_unreachable=gw.control.mark_down) from None
    gw.registry.store(after)
    return _info(gw, after, principal)


@router.post("/{name}/unload", response_model=ModelInfo, responses={202: {"model": ModelInfo}})
async def unload_model(
    name: str,
    gw: GatewayDep,
    principal: PrincipalDep,
    body: Annotated[UnloadModelRequest | None, Body()] = None,
) -> ModelInfo | JSONResponse:
    """Unload the model and unpin it; it stays known, and the next request loads it again."""
    require_admin(principal, "unload models")
    gw.control.require(f"unload {name}")
    body = body or UnloadModelRequest()
    state = await known_model(gw.registry, name, principal)
    handle = gw.temporal.get_workflow_handle(workflow_id(name))
    reason = f"{body.reason} (by {principal.name})"
    if not body.wait:
        signal = handle.signal(ModelLifecycleWorkflow.unload, UnloadCommand(reason))
        return await _accepted(gw, state, "unload", signal, principal)
    update = handle.execute_update(ModelLifecycleWorkflow.ensure_unloaded, EnsureUnloadedRequest(reason))
    return await _settled(gw, state, "unload", update, gw.settings.gateway.cold_start_timeout_seconds, principal)


async def _accepted(
    gw: Gateway, state: ModelState, doing: str, signal: Awaitable[None], principal: Principal
) -> JSONResponse:
    """202: the workflow has the request; `GET /models/{name}` shows how it goes."""
    await _call(gw, state.name, doing, signal)
    gw.registry.invalidate(state.name)
    return JSONResponse(_info(gw, state, principal).model_dump(mode="json"), status_code=202)


async def _settled(
    gw: Gateway, before: ModelState, doing: str, update: Awaitable[ModelState], timeout: float, principal: Principal
) -> ModelInfo | JSONResponse:
    """The model's state once the update is done; if that takes longer than `timeout`, 202 with
    the state it had (the workflow goes on with the request; `GET /models/{name}` follows it)."""
    try:
        state = await asyncio.wait_for(_call(gw, before.name, doing, update), timeout)
    except (TimeoutError, WorkflowUpdateRPCTimeoutOrCancelledError):
        gw.registry.invalidate(before.name)
        return JSONResponse(_info(gw, before, principal).model_dump(mode="json"), status_code=202)
    gw.registry.store(state)
    return _info(gw, state, principal)


async def _call(gw: Gateway, name: str, doing: str, call: Awaitable[_T]) -> _T:
    """Await a workflow call, turning Temporal's failures into the gateway's errors."""
    try:
        return await call
    except (WorkflowUpdateFailedError, RPCError) as exc:
        raise temporal_error(exc, name, doing, on_unreachable=gw.control.mark_down) from None
