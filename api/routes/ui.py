"""`/ui`: the operator's dashboard, one page of plain HTML, CSS and JavaScript (in `api/ui/`, no
build step, nothing fetched from elsewhere), and `GET /ui/config`, what it reads first.

The page itself holds no data: it calls the same API as everyone else (`/models`, `/nodes`,
`/events`, `/stats/requests`, `/models/{name}/logs`, load and unload) with the key kept in the
browser's session storage, so keys and organizations apply to it exactly as to the API.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import RedirectResponse, Response

from api.deps import GatewayDep, PrincipalDep
from api.errors import NotFound
from api.schemas import Caller, UiConfig
from modelium import __version__
from modelium.names import WORKFLOW_ID_PREFIX
from modelium.types import LISTED_PHASES, Phase

router = APIRouter(tags=["dashboard"])

_MEDIA = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}
# Only what the page needs, from this origin; no inline script, no frames.
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _assets() -> dict[str, tuple[bytes, str]]:
    folder = resources.files("api") / "ui"
    found = {}
    for item in folder.iterdir():
        suffix = "." + item.name.rsplit(".", 1)[-1]
        if item.is_file() and suffix in _MEDIA:
            found[item.name] = (item.read_bytes(), _MEDIA[suffix])
    return found


_ASSETS = _assets()
# Lifecycle order, for the phase filter.
_PHASE_ORDER = [p.value for p in Phase if p in LISTED_PHASES]


@router.get("/", include_in_schema=False)
async def root() -> RedirectResponse:
    return RedirectResponse("/ui", status_code=307)


@router.get("/ui", include_in_schema=False)
async def page() -> Response:
    return _asset("index.html")


@router.get("/ui/config", response_model=UiConfig)
async def ui_config(gw: GatewayDep, principal: PrincipalDep) -> UiConfig:
    """Who the key is, and where the Temporal Web UI is (for links to each model's workflow)."""
    temporal = gw.settings.temporal
    if temporal.ui_url:
        temporal_ui: str | None = temporal.ui_url.rstrip("/")
    elif temporal.address is None and temporal.ui:
        temporal_ui = f"http://127.0.0.1:{temporal.ui_port}"
    else:
        temporal_ui = None
    return UiConfig(
        version=__version__,
        keys_required=gw.keys.enabled,
        principal=Caller(name=principal.name, organization=principal.organization, admin=principal.admin),
        temporal_ui=temporal_ui,
        namespace=temporal.namespace,
        workflow_id_prefix=WORKFLOW_ID_PREFIX,
        phases=_PHASE_ORDER,
        recent_seconds=gw.recent.keep_seconds,
    )


@router.get("/ui/{asset}", include_in_schema=False)
async def asset(asset: str) -> Response:
    return _asset(asset)


def _asset(name: str) -> Response:
    found = _ASSETS.get(name)
    if found is None:
        raise NotFound(f"the dashboard has no file {name!r}")
    body, media = found
    return Response(body, media_type=media, headers=_HEADERS)
