from __future__ import annotations

from fastapi import APIRouter

from api.deps import RegistryDep
from api.errors import BadRequest, ModelNotFound
from api.registry import ModelRegistry
from api.schemas import ModelInfo, ModelList
from modelium.names import InvalidModelName, validate_model_name
from modelium.types import ModelState

router = APIRouter(tags=["models"])


async def known_model(registry: ModelRegistry, name: str) -> ModelState:
    """The state of `name`, or ModelNotFound listing the models that exist."""
    try:
        validate_model_name(name)
    except InvalidModelName as exc:
        raise BadRequest(str(exc), param="model") from None
    state = await registry.get(name)
    if state is None:
        known = await registry.names()
        listing = ", ".join(known) if known else "none yet"
        raise ModelNotFound(
            f"model {name!r} not found; known models: {listing}",
            param="model",
            extra={"known_models": known},
        )
    return state


@router.get("/models", response_model=ModelList)
async def list_models(registry: RegistryDep) -> ModelList:
    return ModelList(models=[ModelInfo.from_state(s) for s in await registry.all()])


@router.get("/models/{name}", response_model=ModelInfo)
async def get_model(name: str, registry: RegistryDep) -> ModelInfo:
    return ModelInfo.from_state(await known_model(registry, name))
