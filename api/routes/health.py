from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from api.deps import GatewayDep
from api.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/health", response_model=Health)
async def health() -> Health:
    """The gateway process is alive."""
    return Health(status="ok")


@router.get("/ready", response_model=Health, responses={503: {"model": Health}})
async def ready(gw: GatewayDep) -> Health | JSONResponse:
    """Temporal is reachable, so models can be routed and managed (asked now, within a second)."""
    if not await gw.control.check():
        body = Health(status="unavailable", detail=gw.control.unreachable_detail)
        return JSONResponse(body.model_dump(), status_code=503, headers={"Retry-After": "5"})
    return Health(status="ok")
