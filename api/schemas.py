"""Request and response bodies of the gateway. Pydantic only: no torch, no runtime code."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

from api.errors import one_line, public_detail
from modelium.types import MAX_DURATION_SECONDS, MIN_IDLE_SECONDS, ModelState

# OpenAI's seed is a 64-bit integer; larger ones are refused here, not by a runtime's 5xx.
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1


class PredictRequest(BaseModel):
    """`prompt` for text generation, `inputs` for every task: a string or a list of strings; for a
    Triton (KServe v2) model also named tensors as nested lists (`{"INPUT0": [[1, 2]]}`) or KServe
    v2 tensors as they are (`[{"name": ..., "shape": ..., "datatype": ..., "data": ...}]`)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prompt: str | None = Field(default=None, min_length=1, max_length=200_000)
    inputs: str | list[str] | dict[str, Any] | list[dict[str, Any]] | None = None
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: StrictInt | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)


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
    # Set when an input was longer than the model takes and was cut to its limit.
    truncated: bool | None = None
    warning: str | None = None


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
    measured_memory_bytes: int | None
    peak_memory_bytes: int | None = None
    booked_bytes: int | None
    # Parked (vLLM asleep): host memory booked for its weights; the GPU booking it takes back.
    parked_bytes: int | None = None
    wake_bytes: int | None = None
    idle_timeout_seconds: float
    last_used_at: float | None
    loaded_at: float | None
    load_seconds: float | None
    load_count: int
    request_count: int
    last_error: str | None
    unload_reason: str | None
    rest_reason: str | None = None
    demanded_at: float | None = None
    pinned: bool
    requests_by_organization: dict[str, int]
    waiting_requests: int = 0
    # The serving version: its files' fingerprint, and when it was switched to (an update).
    fingerprint: str = ""
    switched_at: float | None = None
    # An update under way (analyzing, loading_beside, smoke_check, draining), or update_failed
    # (the previous version still serves) with its reason; updates tried so far.
    update_state: str | None = None
    update_error: str | None = None
    update_count: int = 0
    # The serving version's folder (a symlink resolved, a numbered version folder) and number
    # (numbered layouts); what POST /models/{name}/rollback would go back to (null: nothing).
    serving_path: str | None = None
    version: str | None = None
    rollback_to: str | None = None

    def for_non_admin(self, organization: str) -> ModelInfo:
        """What a key without the admin scope may read: no paths, endpoints or error details
        (one line and an error id instead), and its own organization's counts only."""
        own = self.requests_by_organization.get(organization, 0)
        return self.model_copy(
            update={
                "path": "",
                "endpoint": None,
                "last_error": public_detail(self.last_error) if self.last_error else None,
                "unload_reason": one_line(self.unload_reason) if self.unload_reason else None,
                "rest_reason": one_line(self.rest_reason) if self.rest_reason else None,
                "update_error": public_detail(self.update_error) if self.update_error else None,
                "serving_path": None,
                "rollback_to": _without_dirs(self.rollback_to),
                "request_count": own,
                "requests_by_organization": {organization: own} if own else {},
            }
        )

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
            else None,
            memory_estimate_bytes=s.memory_estimate_bytes,
            measured_memory_bytes=s.measured_memory_bytes,
            peak_memory_bytes=s.peak_memory_bytes,
            booked_bytes=s.booking.bytes if s.booking else None,
            parked_bytes=s.parked_bytes,
            wake_bytes=s.wake_bytes,
            idle_timeout_seconds=s.idle_seconds,
            last_used_at=s.last_used_at,
            loaded_at=s.loaded_at,
            load_seconds=s.load_seconds,
            load_count=s.load_count,
            request_count=s.request_count,
            last_error=s.last_error,
            unload_reason=s.unload_reason,
            rest_reason=s.rest_reason,
            demanded_at=s.demanded_at,
            pinned=s.pinned,
            requests_by_organization=s.requests_by_organization,
            fingerprint=s.fingerprint,
            switched_at=s.switched_at,
            update_state=s.update_state,
            update_error=s.update_error,
            update_count=s.update_count,
            serving_path=s.serving_path,
            version=s.version,
            rollback_to=(f"version {s.previous.version}" if s.previous.version else s.previous.path)
            if s.previous
            else None,
        )


def _without_dirs(where: str | None) -> str | None:
    """A path cut to its last part, for keys that see no server paths."""
    return where.rstrip("/").rsplit("/", 1)[-1] if where else None


class ModelList(BaseModel):
    models: list[ModelInfo]
    # With `limit`: pass it as `page_token` for the next page; null on the last page.
    next_page_token: str | None = None


class Health(BaseModel):
    status: str
    detail: str | None = None


class LoadModelRequest(BaseModel):
    """`POST /models/{name}/load`. Omitted settings stay as they are."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    pin: StrictBool | None = Field(default=None, description="true: never unload for being idle")
    idle_timeout_seconds: float | None = Field(
        default=None,
        ge=MIN_IDLE_SECONDS,
        le=MAX_DURATION_SECONDS,
        description="this model's idle timeout (1 s to a year)",
    )
    wait: StrictBool = Field(default=True, description="answer once the model serves (bounded by timeout_seconds)")
    timeout_seconds: float | None = Field(
        default=None, gt=0, le=MAX_DURATION_SECONDS, description="default: gateway.cold_start_timeout_seconds"
    )


class RollbackModelRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    reason: str = Field(default="rollback requested through the API", max_length=500)
    timeout_seconds: float | None = Field(
        default=None, gt=0, le=MAX_DURATION_SECONDS, description="default: gateway.cold_start_timeout_seconds"
    )


class UnloadModelRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field(default="unload requested through the API", max_length=500)
    wait: StrictBool = True


# -- OpenAI-compatible bodies: the fields the gateway checks; the rest pass to the runtime ------
class _OpenAIRequest(BaseModel):
    """What every OpenAI-compatible body shares; unknown fields pass to the runtime."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: str = Field(min_length=1, max_length=200)
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    stream: StrictBool | None = False
    seed: StrictInt | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    # One choice per request: the runtimes return one, and a silently ignored `n` misleads.
    n: StrictInt | None = Field(default=None, ge=1, le=1, description="only 1 is supported")


class CompletionRequest(_OpenAIRequest):
    prompt: str | list[str] | list[int] | list[list[int]]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str = Field(min_length=1, max_length=64)
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)


class OpenAIModel(BaseModel):
    id: str
    object: str = "model"
    created: int
    owned_by: str = "modelium"
    # Beyond OpenAI's fields (clients ignore them): where the model stands.
    phase: str
    runtime: str | None
    task: str | None

    @classmethod
    def from_state(cls, s: ModelState) -> OpenAIModel:
        created = int(s.loaded_at or s.updated_at or 0)
        return cls(id=s.name, created=created, phase=s.phase, runtime=s.runtime, task=s.task)


class OpenAIModelList(BaseModel):
    object: str = "list"
    data: list[OpenAIModel]


class RuntimeLog(BaseModel):
    """The end of a model's runtime log, as its node read it."""

    model: str
    node: str
    runtime: str
    path: str
    lines: list[str]


class DeviceBooking(BaseModel):
    model: str
    bytes: int
    phase: str


class DeviceInfo(BaseModel):
    device: str
    name: str
    total_bytes: int
    used_bytes: int | None
    booked_bytes: int
    # Who holds the booked bytes (the models this key may see; the rest are in `booked_bytes`).
    bookings: list[DeviceBooking]


class NodeInfo(BaseModel):
    node: str
    devices: list[DeviceInfo]
    runtimes: list[str]
    announced_at: float
    lost: str | None = None


class NodeList(BaseModel):
    nodes: list[NodeInfo]


class ModelRequestSeries(BaseModel):
    # Per second, oldest first: requests answered (any status), and the median latency of those
    # answered with 200 (null for a second without one).
    requests: list[int]
    p50_ms: list[float | None]
    total: int
    errors: int
    p50_ms_window: float | None


class RequestSeries(BaseModel):
    start: int
    seconds: int
    models: dict[str, ModelRequestSeries]


class Caller(BaseModel):
    name: str
    organization: str
    admin: bool


class UiConfig(BaseModel):
    """What the dashboard needs to know before it asks for anything else."""

    version: str
    keys_required: bool
    principal: Caller
    # The Temporal Web UI, for links to each model's workflow (null: none known).
    temporal_ui: str | None
    namespace: str
    # A model's workflow id is this prefix and its name.
    workflow_id_prefix: str
    phases: list[str]
    recent_seconds: float
