"""`GET /events`: what changes in the fleet, as server-sent events (see `api.events`)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse

from api.deps import GatewayDep, PrincipalDep
from api.errors import BadRequest
from api.events import KINDS, Filter
from modelium.names import InvalidModelName, validate_model_name

router = APIRouter(tags=["events"])


def _names(value: str | None) -> frozenset[str]:
    return frozenset(v.strip() for v in (value or "").split(",") if v.strip())


@router.get(
    "/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "server-sent events"}},
)
async def events(
    request: Request,
    gw: GatewayDep,
    principal: PrincipalDep,
    model: Annotated[str | None, Query(description="only these models' events (comma-separated)")] = None,
    kind: Annotated[str | None, Query(description=f"only these kinds (comma-separated): {', '.join(KINDS)}")] = None,
    last_event_id: Annotated[str | None, Header(description="resume after this event (EventSource sends it)")] = None,
    after: Annotated[int | None, Query(ge=0, description="resume after this event id (as Last-Event-ID)")] = None,
) -> StreamingResponse:
    """Model phases, load progress, bookings and releases, evictions, node announcements and
    sampled requests as they happen. Each event's `id` lets a reconnecting client resume; a
    `gap` event says what could not be resumed. API keys see only the models they may use, and
    requests of their own organization (admin keys: all)."""
    models = _names(model)
    for name in models:
        try:
            validate_model_name(name)
        except InvalidModelName as exc:
            raise BadRequest(str(exc), param="model") from None
    kinds = _names(kind)
    unknown = sorted(kinds - set(KINDS))
    if unknown:
        raise BadRequest(f"unknown event kinds {unknown}; known: {', '.join(KINDS)}", param="kind")
    resume = after
    if resume is None and last_event_id:
        try:
            resume = int(last_event_id)
        except ValueError:
            raise BadRequest(f"Last-Event-ID must be an event id (a number), not {last_event_id!r}") from None
    stream = gw.events.stream(principal, Filter(models, kinds), resume)
    return StreamingResponse(
        stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
