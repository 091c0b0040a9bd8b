"""Request and response bodies of the gateway. Pydantic only: no torch, no runtime code."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from modelium.types import ModelState


class PredictRequest(BaseModel):
    """`prompt` for text generation, `inputs` for every task (a string or a list of strings)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | None = Field(default=None, min_length=1, max_length=200_000)
    inputs: str | list[str] | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class PredictResponse(BaseModel):
    model: str
    runtime: str
    node: str
    task: str | None
    output: Any
    finish_reason: str | None = None
    usage: Usage


class EndpointInfo(BaseModel):
    url: str
    protocol: str
    pid: int | None = None


class ModelInfo(BaseModel):
    name: str
    path: str
    phase: str
    runtime: str | None
    node: str | None
    device: str | None
    task: str | None
    analysis: str | None
    decision_reason: str | None
    decision_source: str | None
    endpoint: EndpointInfo | None
    memory_estimate_bytes: int | None
    booked_bytes: int | None
    idle_timeout_seconds: float
    last_used_at: float | None
    loaded_at: float | None
    load_seconds: float | None
    load_count: int
    request_count: int
    last_error: str | None
    unload_reason: str | None

    @classmethod
    def from_state(cls, s: ModelState) -> ModelInfo:
        return cls(
            name=s.name,
            path=s.path,
            phase=s.phase,
            runtime=s.runtime,
            node=s.node,
            device=s.device,
            task=s.task,
            analysis=s.analysis_summary,
            decision_reason=s.decision.reason if s.decision else None,
            decision_source=s.decision.source if s.decision else None,
            endpoint=EndpointInfo(url=s.endpoint.url, protocol=s.endpoint.protocol, pid=s.endpoint.pid)
            if s.endpoint
            else None,  # fmt: skip
            memory_estimate_bytes=s.memory_estimate_bytes,
            booked_bytes=s.booking.bytes if s.booking else None,
            idle_timeout_seconds=s.idle_seconds,
            last_used_at=s.last_used_at,
            loaded_at=s.loaded_at,
            load_seconds=s.load_seconds,
            load_count=s.load_count,
            request_count=s.request_count,
            last_error=s.last_error,
            unload_reason=s.unload_reason,
        )


class ModelList(BaseModel):
    models: list[ModelInfo]


class Health(BaseModel):
    status: str
    detail: str | None = None
