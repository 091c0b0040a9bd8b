"""OpenAI-compatible API: `/v1/models`, `/v1/completions`, `/v1/chat/completions`.

Bodies are checked (model, messages, max_tokens, stream), then passed to the runtime as they
came: fields this gateway does not know reach the runtime untouched, and answers come back
unparsed. `stream: true` answers are relayed chunk by chunk as server-sent events.
"""

from __future__ import annotations

from typing import TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError

from api.auth import Principal
from api.deps import Gateway, GatewayDep, PrincipalDep, RegistryDep
from api.errors import InvalidRequest, describe_validation
from api.schemas import ChatCompletionRequest, CompletionRequest, OpenAIModel, OpenAIModelList
from api.serving import (
    ClosingStreamingResponse,
    answered,
    check_max_tokens,
    open_stream,
    post,
    relay,
    routable_model,
    serving_model,
    stream_after_load,
    tallied,
)
from modelium.types import Phase

router = APIRouter(prefix="/v1", tags=["openai"])

_Body = TypeVar("_Body", bound=BaseModel)
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@router.get("/models", response_model=OpenAIModelList)
async def list_models(registry: RegistryDep, principal: PrincipalDep) -> OpenAIModelList:
    """Every model Modelium knows (that the caller's key may use), loaded or not: a request for any
    of them is served."""
    states = [s for s in await registry.all() if principal.may_use(s.name)]
    return OpenAIModelList(data=[OpenAIModel.from_state(s) for s in states])


def _parse(raw: bytes, schema: type[_Body]) -> _Body:
    try:
        return schema.model_validate_json(raw)
    except ValidationError as exc:
        message, field = describe_validation(list(exc.errors()))
        # OpenAI answers 400 to a malformed body; clients written for it expect that.
        raise InvalidRequest(message, param=field, status=400) from None


async def _proxy(
    request: Request, gw: Gateway, principal: Principal, schema: type[CompletionRequest | ChatCompletionRequest]
) -> Response:
    with tallied(gw, principal) as tally:
        raw = await request.body()
        body = _parse(raw, schema)
        check_max_tokens(gw, body, "max_tokens", "max_completion_tokens")
        path = request.url.path
        if body.stream:
            state = await routable_model(gw, body.model, principal, tally, route=path)
            if state.phase != Phase.LOADED or state.endpoint is None:
                tally.status = 0  # the stream's own end decides
                return ClosingStreamingResponse(
                    stream_after_load(gw, state, path, raw, tally, request),
                    media_type="text/event-stream",
                    headers=_SSE_HEADERS,
                )
        else:
            state = await serving_model(gw, body.model, principal, tally, route=path)
        tally.routed(state)
        if body.stream:
            upstream = await open_stream(gw, state, path, raw)
            tally.status = 0  # the stream's own end decides
            return ClosingStreamingResponse(
                relay(gw, state, upstream, tally, request), media_type="text/event-stream", headers=_SSE_HEADERS
            )
        _, content = await post(gw, state, path, raw)
        tally.status = await answered(request)
        return Response(content=content, media_type="application/json")


@router.post(
    "/completions",
    openapi_extra={"requestBody": {"content": {"application/json": {"schema": CompletionRequest.model_json_schema()}}}},
)
async def completions(request: Request, gw: GatewayDep, principal: PrincipalDep) -> Response:
    """OpenAI text completions; `stream: true` answers with server-sent events."""
    return await _proxy(request, gw, principal, CompletionRequest)


@router.post(
    "/chat/completions",
    openapi_extra={
        "requestBody": {"content": {"application/json": {"schema": ChatCompletionRequest.model_json_schema()}}}
    },
)
async def chat_completions(request: Request, gw: GatewayDep, principal: PrincipalDep) -> Response:
    """OpenAI chat completions; the runtime applies the model's chat template."""
    return await _proxy(request, gw, principal, ChatCompletionRequest)
