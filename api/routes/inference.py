"""`POST /predict/{model}`: one request shape and one response shape, whatever the runtime."""

from __future__ import annotations

import logging
import time
from typing import Any

import httpx
from fastapi import APIRouter
from temporalio.client import Client

from api.deps import HttpDep, MetricsDep, RegistryDep, SettingsDep, TemporalDep, UsageDep
from api.errors import BadRequest, GatewayError, ModelNotReady, UpstreamError
from api.routes.models import known_model
from api.schemas import PredictRequest, PredictResponse, Usage
from modelium.names import workflow_id
from modelium.types import ModelState, Phase, Protocol, Task
from workflows.contracts import HealthReport, LoadCommand
from workflows.lifecycle import ModelLifecycleWorkflow

log = logging.getLogger(__name__)
router = APIRouter(tags=["inference"])

DEFAULT_RETRY_AFTER = 10.0


def _not_ready(state: ModelState) -> ModelNotReady:
    if state.phase == Phase.FAILED:
        return ModelNotReady(
            f"model {state.name} failed: {state.last_error}; fix the model directory or send "
            "the workflow a retry signal",
            retry_after=30,
            extra={"phase": state.phase},
        )
    wait = state.load_seconds or DEFAULT_RETRY_AFTER
    return ModelNotReady(
        f"model {state.name} is {state.phase}, not loaded yet; retry shortly",
        retry_after=wait,
        extra={"phase": state.phase},
    )


async def _ask_to_load(temporal: Client, state: ModelState) -> None:
    if state.phase != Phase.UNLOADED:
        return
    handle = temporal.get_workflow_handle(workflow_id(state.name))
    await handle.signal(ModelLifecycleWorkflow.load, LoadCommand("request arrived while unloaded"))


def _upstream_request(state: ModelState, body: PredictRequest) -> tuple[str, dict[str, Any]]:
    assert state.endpoint is not None
    params = body.model_dump(exclude_none=True, exclude={"prompt", "inputs"})
    if state.endpoint.protocol == Protocol.OPENAI and state.task == Task.TEXT_GENERATION:
        prompt = body.prompt if body.prompt is not None else body.inputs
        if prompt is None:
            raise BadRequest("prompt is required for a text-generation model", param="prompt")
        return f"{state.endpoint.url}/v1/completions", {"model": state.name, "prompt": prompt,
                                                        **params}  # fmt: skip
    if body.inputs is None:
        if body.prompt is None:
            raise BadRequest(f"inputs is required for a {state.task} model", param="inputs")
        return f"{state.endpoint.url}/predict", {"inputs": body.prompt, **params}
    return f"{state.endpoint.url}/predict", {"inputs": body.inputs, **params}


def _shape(state: ModelState, data: dict[str, Any]) -> PredictResponse:
    assert state.endpoint is not None
    usage = Usage(**(data.get("usage") or {}))
    if "choices" in data:
        choices = data["choices"]
        texts = [c.get("text", "") for c in choices]
        output: Any = texts[0] if len(texts) == 1 else texts
        finish = choices[0].get("finish_reason") if choices else None
    else:
        output, finish = data.get("output"), None
    return PredictResponse(
        model=state.name, runtime=state.endpoint.runtime, node=state.endpoint.node,
        task=state.task, output=output, finish_reason=finish, usage=usage,
    )  # fmt: skip


@router.post("/predict/{model}", response_model=PredictResponse)
async def predict(
    model: str,
    body: PredictRequest,
    settings: SettingsDep,
    temporal: TemporalDep,
    registry: RegistryDep,
    http: HttpDep,
    usage: UsageDep,
    metrics: MetricsDep,
) -> PredictResponse:
    started = time.perf_counter()
    runtime = "none"
    label = "_unknown"
    status = 500
    try:
        if body.max_tokens is not None and body.max_tokens > settings.gateway.max_tokens_limit:
            raise BadRequest(
                f"max_tokens must be at most {settings.gateway.max_tokens_limit}",
                param="max_tokens",
            )
        state = await known_model(registry, model)
        label = state.name
        if state.phase != Phase.LOADED or state.endpoint is None:
            await _ask_to_load(temporal, state)
            raise _not_ready(state)
        runtime = state.endpoint.runtime
        url, payload = _upstream_request(state, body)
        try:
            response = await http.post(url, json=payload)
        except httpx.TransportError as exc:
            registry.invalidate(state.name)
            handle = temporal.get_workflow_handle(workflow_id(state.name))
            await handle.signal(
                ModelLifecycleWorkflow.report_unhealthy,
                HealthReport(f"gateway could not reach {state.endpoint.url}: {exc!r}"),
            )
            raise ModelNotReady(
                f"model {state.name}'s runtime did not answer; it is being checked and reloaded",
                retry_after=DEFAULT_RETRY_AFTER,
            ) from exc
        data = response.json() if response.content else {}
        if response.status_code >= 400:
            err = data.get("error") if isinstance(data, dict) else None
            message = err.get("message") if isinstance(err, dict) else response.text[:500]
            param = err.get("param") if isinstance(err, dict) else None
            if 400 <= response.status_code < 500:
                raise BadRequest(f"{state.name}: {message}", param=param)
            raise UpstreamError(f"{state.name}'s runtime failed: {message}")
        result = _shape(state, data)
        usage.record(state.name)
        registry.mark_used(state.name)
        status = 200
        return result
    except GatewayError as exc:
        status = exc.status
        raise
    finally:
        metrics.requests.labels(model=label, runtime=runtime, status=str(status)).inc()
        if status == 200:
            metrics.request_duration.labels(model=label, runtime=runtime).observe(time.perf_counter() - started)
