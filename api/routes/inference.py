"""`POST /predict/{model}`: one request shape and one response shape, whatever the runtime."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from api.deps import GatewayDep, PrincipalDep
from api.errors import BadRequest
from api.kserve import kserve_output, kserve_request
from api.schemas import PredictRequest, PredictResponse, Usage
from api.serving import answered, check_max_tokens, post_json, serving_model, tallied
from modelium.types import EndpointProtocol, ModelState, Task

router = APIRouter(tags=["inference"])


def _upstream_request(state: ModelState, body: PredictRequest) -> tuple[str, dict[str, Any]]:
    assert state.endpoint is not None
    if state.endpoint.protocol == EndpointProtocol.KSERVE_V2:
        inputs: Any = body.inputs if body.inputs is not None else body.prompt
        # Triton serves each instance under its key: a new version beside the old one is its own.
        return kserve_request(state.key, inputs)
    params = body.model_dump(exclude_none=True, exclude={"prompt", "inputs"})
    if state.endpoint.protocol == EndpointProtocol.OPENAI and state.task == Task.TEXT_GENERATION:
        prompt = body.prompt if body.prompt is not None else body.inputs
        if prompt is None:
            raise BadRequest("prompt is required for a text-generation model", param="prompt")
        return "/v1/completions", {"model": state.name, "prompt": prompt, **params}
    if body.inputs is None:
        if body.prompt is None:
            raise BadRequest(f"inputs is required for a {state.task} model", param="inputs")
        return "/predict", {"inputs": body.prompt, **params}
    return "/predict", {"inputs": body.inputs, **params}


def _shape(state: ModelState, data: dict[str, Any]) -> PredictResponse:
    assert state.endpoint is not None
    usage = Usage(**(data.get("usage") or {}))
    if "choices" in data:
        choices = data["choices"]
        texts = [c.get("text", "") for c in choices]
        output: Any = texts[0] if len(texts) == 1 else texts
        finish = choices[0].get("finish_reason") if choices else None
    elif "outputs" in data:
        output, finish = kserve_output(data["outputs"]), None
    else:
        output, finish = data.get("output"), None
    return PredictResponse(
        model=state.name,
        runtime=state.endpoint.runtime,
        node=state.endpoint.node,
        task=state.task,
        output=output,
        finish_reason=finish,
        usage=usage,
        truncated=data.get("truncated"),
        warning=data.get("warning"),
    )


@router.post("/predict/{model}", response_model=PredictResponse)
async def predict(
    model: str, body: PredictRequest, request: Request, gw: GatewayDep, principal: PrincipalDep
) -> PredictResponse:
    """Run the model on `prompt` (text generation) or `inputs` (any task). A model that is not
    loaded is loaded first; the request waits for it."""
    with tallied(gw, principal) as tally:
        check_max_tokens(gw, body, "max_tokens")
        state = await serving_model(gw, model, principal, tally)
        tally.routed(state)
        path, payload = _upstream_request(state, body)
        state, answer = await post_json(gw, state, path, payload)
        result = _shape(state, answer)
        tally.status = await answered(request)
        return result
