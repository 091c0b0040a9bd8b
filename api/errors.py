"""Every error the gateway answers, in one body shape (OpenAI's error envelope):
`{"error": {"message", "type", "param", "code", ...}}`."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class GatewayError(Exception):
    status = 500
    type = "server_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        retry_after: float | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after = retry_after
        self.extra = extra or {}


class BadRequest(GatewayError):
    status = 400
    type = "invalid_request_error"


class ModelNotFound(GatewayError):
    status = 404
    type = "model_not_found"


class ModelNotReady(GatewayError):
    status = 503
    type = "model_not_ready"


class UpstreamError(GatewayError):
    status = 502
    type = "upstream_error"


class ControlPlaneUnavailable(GatewayError):
    status = 503
    type = "control_plane_unavailable"


def error_body(message: str, kind: str, param: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": None, **extra}}


def install(app: FastAPI) -> None:
    @app.exception_handler(GatewayError)
    async def _gateway_error(request: Request, exc: GatewayError) -> JSONResponse:
        headers = {}
        if exc.retry_after is not None:
            headers["Retry-After"] = str(max(1, round(exc.retry_after)))
        return JSONResponse(
            error_body(exc.message, exc.type, exc.param, **exc.extra),
            status_code=exc.status,
            headers=headers,
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        first_field = None
        for err in exc.errors():
            loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "path", "query")]
            field = ".".join(loc) or "body"
            first_field = first_field or field
            problems.append(f"{field}: {err.get('msg')}")
        return JSONResponse(error_body("; ".join(problems), "invalid_request_error", first_field), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code)
