"""Every error the gateway answers, in one body shape (OpenAI's error envelope):
`{"error": {"message", "type", "param", "code", ...}}`."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable
from pathlib import PurePosixPath
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from temporalio.client import (
    WorkflowQueryFailedError,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.service import RPCError, RPCStatusCode

from modelium.types import Phase
from workflows.contracts import failure_message

log = logging.getLogger(__name__)


class GatewayError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        retry_after: float | None = None,
        extra: dict[str, Any] | None = None,
        status: int | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after = retry_after
        self.extra = extra or {}
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        return {"Retry-After": str(max(1, round(self.retry_after)))}

    def response_body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code, **self.extra)

    def response(self) -> JSONResponse:
        return JSONResponse(self.response_body(), status_code=self.status, headers=self.headers())

    def sse(self, event: str | None = None) -> bytes:
        """The same envelope as a server-sent event, for a stream whose status line is sent
        already (OpenAI's streams send it as a plain `data:` line; `event` names it otherwise)."""
        head = f"event: {event}\n".encode() if event else b""
        return head + b"data: " + json.dumps(self.response_body()).encode() + b"\n\n"


class BadRequest(GatewayError):
    status = 400
    type = "invalid_request_error"


class InvalidRequest(GatewayError):
    """A body that does not match the schema; the message names the field."""

    status = 422
    type = "invalid_request_error"


class Unauthorized(GatewayError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class Forbidden(GatewayError):
    status = 403
    type = "permission_error"
    code = "insufficient_scope"


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class TooManyWaiting(GatewayError):
    status = 429
    type = "rate_limit_error"
    code = "too_many_waiting"


class Conflict(GatewayError):
    """The request is fine, the model's state does not allow it now."""

    status = 409
    type = "invalid_request_error"
    code = "conflict"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class ModelNotReady(GatewayError):
    status = 503
    type = "model_not_ready"


class UpstreamError(GatewayError):
    status = 502
    type = "upstream_error"


class GatewayTimeout(GatewayError):
    status = 504
    type = "timeout_error"


class ControlPlaneUnavailable(GatewayError):
    status = 503
    type = "control_plane_unavailable"


def is_unreachable(exc: BaseException) -> bool:
    """Temporal itself cannot be reached (as opposed to answering with an error)."""
    return isinstance(exc, RPCError) and exc.status == RPCStatusCode.UNAVAILABLE


def temporal_error(
    exc: BaseException, model: str, doing: str, *, on_unreachable: Callable[[str], None] | None = None
) -> GatewayError:
    """The one mapping from a failed call to a model's workflow to the gateway's answer.
    `doing` says what was asked ("load", "read the state of"); `on_unreachable` hears Temporal's
    message when Temporal could not be reached at all (the control plane marks itself down).

    - the workflow failed the update: 503 with its reason (and `phase: failed`), retry in 30 s;
    - the update outlived its RPC deadline: 503, the workflow goes on, retry in 5 s;
    - the workflow did not answer a query: 503, retry in 5 s;
    - no such workflow: 404, the model was removed;
    - anything else Temporal answered, or Temporal unreachable: 503 control plane unavailable."""
    if isinstance(exc, WorkflowUpdateFailedError):
        return ModelNotReady(
            f"could not {doing} {model}: {public_detail(failure_message(exc))}",
            retry_after=30,
            extra={"phase": Phase.FAILED},
        )
    if isinstance(exc, WorkflowUpdateRPCTimeoutOrCancelledError):
        return ModelNotReady(f"{model} is still on its way ({doing}); retry shortly", retry_after=5)
    if isinstance(exc, WorkflowQueryFailedError):
        return ControlPlaneUnavailable(f"the workflow of {model} did not answer ({doing}): {exc}", retry_after=5)
    if isinstance(exc, RPCError):
        if exc.status == RPCStatusCode.NOT_FOUND:
            return ModelNotFound(f"model {model!r} was removed", param="model")
        if is_unreachable(exc) and on_unreachable is not None:
            on_unreachable(exc.message)
        return ControlPlaneUnavailable(
            f"Temporal did not take the request to {doing} {model}: {exc.message}", retry_after=5
        )
    raise TypeError(f"not a Temporal error: {exc!r}")


# Absolute paths (the state directory, site-packages, the model's folder) are not the client's
# business: shown by their last part only.
_PATH = re.compile(r"(?<![\w.])(?:/[\w.@+-]+){2,}/?")
_logged_ids: dict[str, None] = {}


def public_detail(detail: str) -> str:
    """What a client may read of an internal error: its first line, paths cut to their file name,
    and an error id. The whole text is logged once under that id (and stays in the model's
    workflow history and `GET /models` for admin keys)."""
    error_id = "err_" + hashlib.sha256(detail.encode("utf-8", "replace")).hexdigest()[:12]
    if error_id not in _logged_ids:
        _logged_ids[error_id] = None
        if len(_logged_ids) > 4096:
            _logged_ids.pop(next(iter(_logged_ids)))
        log.warning("error %s in full: %s", error_id, detail)
    return f"{one_line(detail)} (error id {error_id})"


def one_line(detail: str) -> str:
    """The first line of `detail`, absolute paths cut to their last part, at most 300 characters."""
    first = next((line.strip() for line in detail.splitlines() if line.strip()), "no detail")
    first = _PATH.sub(lambda m: PurePosixPath(m.group(0)).name or "/", first).rstrip(":")
    return first if len(first) <= 300 else first[:297] + "..."


def error_body(
    message: str, kind: str, param: str | None = None, code: str | None = None, **extra: Any
) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code, **extra}}


def describe_validation(errors: list[Any]) -> tuple[str, str]:
    """One message naming every field that is wrong, and the first such field."""
    problems = []
    first_field = None
    for err in errors:
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "path", "query")]
        field = ".".join(loc) or "body"
        first_field = first_field or field
        problems.append(f"{field}: {err.get('msg')}")
    return "; ".join(problems), first_field or "body"


def _json_error(body: bytes, err: Any) -> str:
    """Where a body stops being JSON, as a person counts: line and column, from 1."""
    loc = err.get("loc", ())
    offset = loc[-1] if loc and isinstance(loc[-1], int) else None
    reason = (err.get("ctx") or {}).get("error") or err.get("msg") or "not valid JSON"
    if offset is None:
        return f"the body is not valid JSON: {reason}"
    before = body[:offset].decode("utf-8", "replace")
    line = before.count("\n") + 1
    column = offset - (before.rfind("\n") + 1) + 1
    return f"invalid JSON at line {line}, column {column}: {reason}"


def install(app: FastAPI) -> None:
    @app.exception_handler(GatewayError)
    async def _gateway_error(request: Request, exc: GatewayError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        broken = next((e for e in errors if e.get("type") == "json_invalid"), None)
        if broken is not None:
            return InvalidRequest(_json_error(await request.body(), broken), param="body", status=400).response()
        message, field = describe_validation(errors)
        return InvalidRequest(message, param=field).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        message = str(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}; see /docs for the API"
        return JSONResponse(error_body(message, kind), status_code=exc.status_code)
