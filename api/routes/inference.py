"""`POST /predict/{model}`: one request shape and one response shape, whatever the runtime."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request

from api.deps import GatewayDep, PrincipalDep
from api.errors import BadRequest, GatewayError
from api.schemas import PredictRequest, PredictResponse, Usage
from api.serving import Tally, post_json, serving_model
from modelium.types import EndpointProtocol, ModelState, Task

router = APIRouter(tags=["inference"])


def _upstream_request(state: ModelState, body: PredictRequest) -> tuple[str, dict[str, Any]]:
    assert state.endpoint is not None
    if state.endpoint.protocol == EndpointProtocol.KSERVE_V2:
        return kserve_request(state, body)
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


def kserve_request(state: ModelState, body: PredictRequest) -> tuple[str, dict[str, Any]]:
    """`/predict`'s body as a KServe v2 inference request."""
    inputs: Any = body.inputs if body.inputs is not None else body.prompt
    if inputs is None:
        raise BadRequest("inputs is required: text, named tensors or KServe v2 tensors", param="inputs")
    if isinstance(inputs, list) and inputs and all(isinstance(t, dict) for t in inputs):
        tensors = inputs  # KServe v2 tensors already
    elif isinstance(inputs, dict):
        tensors = [_tensor(name, value) for name, value in inputs.items()]
    else:
        texts = [inputs] if isinstance(inputs, str) else inputs
        tensors = [{"name": "TEXT", "shape": [len(texts)], "datatype": "BYTES", "data": texts}]
    return f"/v2/models/{state.name}/infer", {"inputs": tensors}


def _tensor(name: str, value: Any) -> dict[str, Any]:
    shape: list[int] = []
    probe = value
    while isinstance(probe, list):
        shape.append(len(probe))
        probe = probe[0] if probe else None
    flat = _flatten(value)
    if all(isinstance(v, bool) for v in flat):
        datatype = "BOOL"
    elif all(isinstance(v, int) and not isinstance(v, bool) for v in flat):
        datatype = "INT64"
    elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in flat):
        datatype = "FP32"
    elif all(isinstance(v, str) for v in flat):
        datatype = "BYTES"
    else:
        raise BadRequest(f"input {name!r} mixes types; send numbers, booleans or strings", param="inputs")
    return {"name": name, "shape": shape or [1], "datatype": datatype, "data": flat}


def _flatten(value: Any) -> list[Any]:
    if not isinstance(value, list):
        return [value]
    return [item for part in value for item in _flatten(part)]


def kserve_output(outputs: list[dict[str, Any]]) -> Any:
    """A generated text entry's OUTPUT (JSON per input) as values; other models' outputs by name,
    shaped as nested lists."""
    if len(outputs) == 1 and outputs[0].get("name") == "OUTPUT" and outputs[0].get("datatype") == "BYTES":
        values = [json.loads(v) for v in outputs[0].get("data", [])]
        return values[0] if len(values) == 1 else values
    return {o["name"]: _unflatten(o.get("data", []), o.get("shape", [])) for o in outputs}


def _unflatten(data: list[Any], shape: list[int]) -> Any:
    if len(shape) <= 1:
        return data
    step = len(data) // shape[0] if shape[0] else 0
    return [_unflatten(data[i * step : (i + 1) * step], shape[1:]) for i in range(shape[0])]


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
        model=state.name, runtime=state.endpoint.runtime, node=state.endpoint.node,
        task=state.task, output=output, finish_reason=finish, usage=usage,
        truncated=data.get("truncated"), warning=data.get("warning"),
    )  # fmt: skip


@router.post("/predict/{model}", response_model=PredictResponse)
async def predict(
    model: str, body: PredictRequest, request: Request, gw: GatewayDep, principal: PrincipalDep
) -> PredictResponse:
    """Run the model on `prompt` (text generation) or `inputs` (any task). A model that is not
    loaded is loaded first; the request waits for it."""
    tally = Tally(gw, principal)
    status = 500
    try:
        limit = gw.settings.gateway.max_tokens_limit
        if body.max_tokens is not None and body.max_tokens > limit:
            raise BadRequest(f"max_tokens must be at most {limit} (gateway.max_tokens_limit)", param="max_tokens")
        state = await serving_model(gw, model, principal, tally)
        tally.routed(state)
        path, payload = _upstream_request(state, body)
        state, answer = await post_json(gw, state, path, payload)
        result = _shape(state, answer)
        # A client that hung up while it waited did not get its answer: 499, as for a stream.
        status = 499 if await request.is_disconnected() else 200
        return result
    except GatewayError as exc:
        status = exc.status
        raise
    finally:
        tally.finish(status)
