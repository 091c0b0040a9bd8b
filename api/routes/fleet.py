"""`GET /nodes` (every node's devices: memory, bookings and who holds them) and
`GET /stats/requests` (the last minutes of requests, from the gateway's own ring)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from api.deps import GatewayDep, PrincipalDep
from api.errors import BadRequest
from api.recent import KEEP_SECONDS
from api.schemas import DeviceBooking, DeviceInfo, ModelRequestSeries, NodeInfo, NodeList, RequestSeries
from modelium.names import InvalidModelName, validate_model_name

router = APIRouter(tags=["fleet"])


@router.get("/nodes", response_model=NodeList)
async def list_nodes(gw: GatewayDep, principal: PrincipalDep) -> NodeList:
    """Each node as it last announced itself: its devices with total, booked and used memory,
    and which models hold the bookings (from the fleet index, no workflow is queried). A key
    sees the bookings of the models it may use; the others count in `booked_bytes` only."""
    inventories = await gw.registry.nodes()
    states = await gw.registry.all()
    held: dict[tuple[str, str], list[DeviceBooking]] = {}
    for state in states:
        if not principal.may_use(state.name):
            continue
        # The serving version's booking, and a new version's beside it (listed from its smoke
        # check on; while it loads, its bytes count in the device's booked_bytes only).
        for booked, phase in ((state.booking, str(state.phase)), (state.update_booking, "new version")):
            if booked is None:
                continue
            for device in booked.all_devices:
                booking = DeviceBooking(model=state.name, bytes=booked.bytes, phase=phase)
                held.setdefault((booked.node, device), []).append(booking)
        if state.parked_bytes and state.booking is not None:
            # A parked model's weights, in its node's host memory.
            parked = DeviceBooking(model=state.name, bytes=state.parked_bytes, phase="parked weights")
            held.setdefault((state.booking.node, "cpu"), []).append(parked)
    nodes = [
        NodeInfo(
            node=inv.node,
            devices=[
                DeviceInfo(
                    device=d.device,
                    name=d.name,
                    total_bytes=d.total_bytes,
                    used_bytes=d.used_bytes,
                    booked_bytes=d.booked_bytes,
                    bookings=sorted(held.get((inv.node, d.device), []), key=lambda b: -b.bytes),
                )
                for d in inv.devices
            ],
            runtimes=inv.runtimes,
            announced_at=inv.announced_at,
            lost=inv.lost,
        )
        for inv in sorted(inventories, key=lambda i: i.node)
    ]
    return NodeList(nodes=nodes)


@router.get("/stats/requests", response_model=RequestSeries)
async def request_stats(
    gw: GatewayDep,
    principal: PrincipalDep,
    seconds: Annotated[int, Query(ge=10, le=KEEP_SECONDS, description="the window, in one-second buckets")] = 120,
    model: Annotated[str | None, Query(description="only these models (comma-separated)")] = None,
    top: Annotated[int, Query(ge=1, le=100, description="at most this many models, the busiest first")] = 12,
) -> RequestSeries:
    """Requests a second and p50 latency per model over the last `seconds`, as this gateway
    answered them (each gateway counts its own; Prometheus has the whole history). A key without
    the admin scope sees its own organization's requests."""
    names = frozenset(n.strip() for n in (model or "").split(",") if n.strip())
    for name in names:
        try:
            validate_model_name(name)
        except InvalidModelName as exc:
            raise BadRequest(str(exc), param="model") from None
    start, series = gw.recent.series(principal, seconds=seconds, models=names, top=top)
    return RequestSeries(
        start=start, seconds=seconds, models={name: ModelRequestSeries(**one) for name, one in series.items()}
    )
