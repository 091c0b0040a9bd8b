"""Each activity's one typed entry point: its name, payload, result and options in one place.

The workflows call these instead of `workflow.execute_activity(ActivityName.X, ..., result_type=...)`:
a payload of the wrong type is a mypy error at the call, and the task queue, timeouts and retry
policy of a step are set once. The payloads only activities take live here too (those that the
runtime adapters also use, `LoadRequest` and `Endpoint`, stay in `modelium.types`). Names and
options are those the recorded histories hold (tests/workflows/test_replay.py)."""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any, TypeVar

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from modelium.names import node_task_queue
    from modelium.types import (
        Booking,
        Decision,
        Endpoint,
        LoadRequest,
        ModelAnalysis,
        ModelOverrides,
        ModelSource,
        UnloadKind,
    )
    from workflows.contracts import ActivityName, CapacityFreed, ErrorType, EvictRequest, EvictResult, NodeLost

QUICK = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_attempts=3)
NODE_STEP = RetryPolicy(
    initial_interval=timedelta(seconds=2),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=30),
    maximum_attempts=3,
    non_retryable_error_types=[ErrorType.INSUFFICIENT_CAPACITY],
)
# A node agent that is down leaves node activities unstarted; past this they fail visibly.
NODE_SCHEDULE_TO_CLOSE = timedelta(minutes=10)


_R = TypeVar("_R")


@dataclass
class DecideRequest:
    analysis: ModelAnalysis
    # Per-model runtime asked for by the user, if any.
    runtime_override: str | None = None
    overrides: ModelOverrides | None = None
    # Only demand (a request, a manual load, a pin) may evict; a preload takes free room or none.
    may_evict: bool = True
    # Nodes this model was just told are lost: not chosen again even if the listing of nodes
    # read for this decision is from before they were marked lost.
    avoid_nodes: list[str] = field(default_factory=list)


@dataclass
class ReserveRequest:
    model: str
    device: str
    # Bytes to book on each device.
    bytes: int
    # The runtime the model will run on: a measured profile for it replaces the estimate.
    runtime: str = ""
    # Every device to book (tensor parallel); empty means just `device`.
    devices: list[str] = field(default_factory=list)


@dataclass
class ConfirmFreedRequest:
    """Evicted models' processes, whose memory must be back before the next load books it."""

    device: str
    pids: list[int]
    timeout_seconds: float = 60.0


@dataclass
class LoadResult:
    endpoint: Endpoint
    load_seconds: float
    # What the model really took once loaded (GPU memory from NVML, or resident memory on CPU).
    measured_bytes: int | None = None
    # Its booking after the load: resized up to what it measured, when that was more.
    booked_bytes: int | None = None


@dataclass
class UnloadRequest:
    model: str
    runtime: str
    reason: str
    kind: UnloadKind = UnloadKind.REQUESTED


@dataclass
class SmokeRequest:
    """Check a freshly loaded instance with one real request before any traffic goes to it."""

    model: str  # the instance key (see modelium.names.instance_key)
    runtime: str
    endpoint: Endpoint
    # The model's own check (modelium.yaml `smoke: {path, body, status}`); None: the default one.
    path: str | None = None
    body: dict[str, Any] | None = None
    status: int = 200


@dataclass
class DrainRequest:
    """Wait until an instance that no longer gets new requests has answered those it had, at
    most `seconds` (and at least `settle_seconds`, for gateways to stop sending it any)."""

    model: str  # the instance key
    runtime: str
    seconds: float
    settle_seconds: float = 2.0


@dataclass
class UpdateOutcome:
    model: str
    result: str  # switched | failed | recreated


@dataclass
class ParkRequest:
    """Put an idle model's runtime to sleep, booking `host_bytes` of the node's CPU budget for
    the weights it moves to host memory."""

    model: str  # the instance key
    runtime: str
    host_bytes: int


@dataclass
class ParkResult:
    # What its booking on the GPU is now (what it still holds there), and the host memory booked.
    gpu_bytes: int
    host_bytes: int


@dataclass
class WakeRequest:
    """Book the GPU memory a parked model gave up (`bytes` on `device`, or each of `devices`)
    and wake its runtime."""

    model: str  # the instance key
    runtime: str
    device: str
    bytes: int
    devices: list[str] = field(default_factory=list)


@dataclass
class HealthRequest:
    model: str
    runtime: str


@dataclass
class LogRequest:
    """The end of a model's runtime log on its node: the last `tail` lines, or (with `after`, a
    byte offset an earlier answer gave) what was written since."""

    model: str
    runtime: str
    node: str
    tail: int = 200
    after: int | None = None


@dataclass
class LogTail:
    path: str
    lines: list[str]
    # Where the file ended when read: pass it as `after` for what comes next.
    size: int


# -- control steps: local to the workflow's worker, or (histories from before) on its queue ----
def _control(
    name: str, arg: Any, result_type: type[Any], timeout: timedelta, retry: RetryPolicy, local: bool
) -> Awaitable[Any]:
    if local:
        return workflow.execute_local_activity(
            name, arg, result_type=result_type, start_to_close_timeout=timeout, retry_policy=retry
        )
    return workflow.execute_activity(
        name, arg, result_type=result_type, start_to_close_timeout=timeout, retry_policy=retry
    )


def analyze_model(source: ModelSource, *, local: bool) -> Awaitable[ModelAnalysis]:
    retry = replace(QUICK, non_retryable_error_types=[ErrorType.BAD_MODEL_DIRECTORY])
    return _control(ActivityName.ANALYZE_MODEL, source, ModelAnalysis, timedelta(minutes=2), retry, local)


def decide_runtime(request: DecideRequest, *, local: bool) -> Awaitable[Decision]:
    retry = replace(QUICK, non_retryable_error_types=[ErrorType.NO_RUNTIME])
    return _control(ActivityName.DECIDE_RUNTIME, request, Decision, timedelta(minutes=1), retry, local)


# -- control activities on the control task queue ------------------------------------------------
def evict_models(request: EvictRequest) -> Awaitable[EvictResult]:
    return workflow.execute_activity(
        ActivityName.EVICT_MODELS,
        request,
        result_type=EvictResult,
        start_to_close_timeout=timedelta(minutes=5),
        retry_policy=QUICK,
    )


def notify_waiting(notice: CapacityFreed) -> Awaitable[None]:
    return workflow.execute_activity(
        ActivityName.NOTIFY_WAITING,
        notice,
        start_to_close_timeout=timedelta(seconds=30),
        retry_policy=RetryPolicy(maximum_attempts=2),
    )


def notify_node_lost(notice: NodeLost) -> Awaitable[None]:
    return workflow.execute_activity(
        ActivityName.NOTIFY_NODE_LOST,
        notice,
        start_to_close_timeout=timedelta(minutes=2),
        retry_policy=RetryPolicy(maximum_interval=timedelta(seconds=10)),
    )


# -- node steps, on the queue of the node that holds the model (started: the caller races them
# against the node being declared lost) ------------------------------------------------------------
def reserve_gpu(request: ReserveRequest, node: str) -> workflow.ActivityHandle[Booking]:
    return workflow.start_activity(
        ActivityName.RESERVE_GPU,
        request,
        result_type=Booking,
        task_queue=node_task_queue(node),
        start_to_close_timeout=timedelta(seconds=30),
        schedule_to_close_timeout=NODE_SCHEDULE_TO_CLOSE,
        retry_policy=NODE_STEP,
    )


def load_model(request: LoadRequest, node: str, timeout_seconds: float) -> workflow.ActivityHandle[LoadResult]:
    """`timeout_seconds`: the chosen runtime's own load timeout (a minute is added for the
    agent's own work around it)."""
    return workflow.start_activity(
        ActivityName.LOAD_MODEL,
        request,
        result_type=LoadResult,
        task_queue=node_task_queue(node),
        start_to_close_timeout=timedelta(seconds=timeout_seconds + 60),
        # Loads heartbeat every 0.25 s; a node agent that died mid-load is noticed in 10 s.
        heartbeat_timeout=timedelta(seconds=10),
        retry_policy=NODE_STEP,
    )


def confirm_memory_freed(request: ConfirmFreedRequest, node: str) -> workflow.ActivityHandle[None]:
    return workflow.start_activity(
        ActivityName.CONFIRM_FREED,
        request,
        task_queue=node_task_queue(node),
        start_to_close_timeout=timedelta(seconds=90),
        schedule_to_close_timeout=NODE_SCHEDULE_TO_CLOSE,
        heartbeat_timeout=timedelta(seconds=20),
        retry_policy=NODE_STEP,
    )


def check_health(request: HealthRequest, node: str) -> workflow.ActivityHandle[None]:
    return workflow.start_activity(
        ActivityName.CHECK_HEALTH,
        request,
        task_queue=node_task_queue(node),
        start_to_close_timeout=timedelta(seconds=30),
        schedule_to_close_timeout=timedelta(minutes=2),
        retry_policy=RetryPolicy(maximum_attempts=1),
    )


def unload_model(request: UnloadRequest, node: str) -> workflow.ActivityHandle[None]:
    return workflow.start_activity(
        ActivityName.UNLOAD_MODEL,
        request,
        task_queue=node_task_queue(node),
        start_to_close_timeout=timedelta(minutes=1),
        schedule_to_close_timeout=NODE_SCHEDULE_TO_CLOSE,
    )


def release_gpu(model: str, node: str) -> workflow.ActivityHandle[None]:
    """The model's name alone, as the recorded histories hold it."""
    return workflow.start_activity(
        ActivityName.RELEASE_GPU,
        model,
        task_queue=node_task_queue(node),
        start_to_close_timeout=timedelta(seconds=30),
        schedule_to_close_timeout=NODE_SCHEDULE_TO_CLOSE,
    )


def park_model(request: ParkRequest, node: str) -> workflow.ActivityHandle[ParkResult]:
    """Weights copied to host memory; tried once: a failed park unloads the model instead."""
    return _once_on_node(ActivityName.PARK_MODEL, request, ParkResult, node)


def wake_model(request: WakeRequest, node: str) -> workflow.ActivityHandle[Booking]:
    """Tried once: a model that does not wake is loaded afresh instead."""
    return _once_on_node(ActivityName.WAKE_MODEL, request, Booking, node)


def _once_on_node(name: str, request: object, result_type: type[_R], node: str) -> workflow.ActivityHandle[_R]:
    return workflow.start_activity(
        name,
        request,
        result_type=result_type,
        task_queue=node_task_queue(node),
        start_to_close_timeout=timedelta(minutes=5),
        schedule_to_close_timeout=NODE_SCHEDULE_TO_CLOSE,
        retry_policy=RetryPolicy(maximum_attempts=1),
    )


def read_runtime_log(request: LogRequest) -> workflow.ActivityHandle[LogTail]:
    return workflow.start_activity(
        ActivityName.READ_RUNTIME_LOG,
        request,
        result_type=LogTail,
        task_queue=node_task_queue(request.node),
        start_to_close_timeout=timedelta(seconds=20),
        schedule_to_close_timeout=timedelta(seconds=30),
        retry_policy=RetryPolicy(maximum_attempts=1),
    )


def smoke_check(request: SmokeRequest, node: str) -> workflow.ActivityHandle[str]:
    """One real request to a new version before the route switches to it; says what was sent."""
    return workflow.start_activity(
        ActivityName.SMOKE_CHECK,
        request,
        result_type=str,
        task_queue=node_task_queue(node),
        start_to_close_timeout=timedelta(seconds=90),
        schedule_to_close_timeout=timedelta(minutes=3),
        retry_policy=RetryPolicy(maximum_attempts=2, non_retryable_error_types=[ErrorType.SMOKE_FAILED]),
    )


def drain_runtime(request: DrainRequest, node: str) -> workflow.ActivityHandle[str]:
    """Wait for an old version's requests to finish (bounded by the request's `seconds`)."""
    return workflow.start_activity(
        ActivityName.DRAIN_RUNTIME,
        request,
        result_type=str,
        task_queue=node_task_queue(node),
        start_to_close_timeout=timedelta(seconds=request.seconds + 60),
        schedule_to_close_timeout=timedelta(seconds=request.seconds + 120),
        heartbeat_timeout=timedelta(seconds=20),
        retry_policy=RetryPolicy(maximum_attempts=2),
    )


def count_update(outcome: UpdateOutcome) -> Awaitable[None]:
    """`modelium_model_updates_total{model,result}` in the control worker's metrics."""
    return workflow.execute_local_activity(
        ActivityName.COUNT_UPDATE,
        outcome,
        start_to_close_timeout=timedelta(seconds=10),
        retry_policy=RetryPolicy(maximum_attempts=3),
    )
