from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from api.deps import TemporalDep
from api.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/health", response_model=Health)
async def health() -> Health:
    """The gateway process is alive."""
    return Health(status="ok")


@router.get("/ready", response_model=Health, responses={503: {"model": Health}})
async def ready(temporal: TemporalDep) -> Health | JSONResponse:
    """Temporal is reachable, so models can be routed and managed."""
    try:
        await temporal.service_client.check_health()
    except Exception as exc:  # any failure to reach Temporal means not ready
        body = Health(status="unavailable", detail=f"Temporal not reachable: {exc}")
        return JSONResponse(body.model_dump(), status_code=503, headers={"Retry-After": "5"})
    return Health(status="ok")
