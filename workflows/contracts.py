"""What workflows, activities, workers and the gateway agree on: names, payloads, search attributes.

Deterministic and free of I/O, like everything in `workflows/`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any, TypeVar

from temporalio.common import SearchAttributeKey

from modelium.names import model_from_workflow_id
from modelium.types import (
    Booking,
    Decision,
    DecisionSource,
    DeviceInventory,
    Endpoint,
    EndpointProtocol,
    Eviction,
    ModelSource,
    ModelState,
    NodeInventory,
    Phase,
    Task,
)

if TYPE_CHECKING:
    from temporalio.client import WorkflowExecution, WorkflowUpdateFailedError

_D = TypeVar("_D")
_E = TypeVar("_E", bound=StrEnum)


class ActivityName:
    ANALYZE_MODEL = "analyze_model"
    DECIDE_RUNTIME = "decide_runtime"
    RESERVE_GPU = "reserve_gpu"
    RELEASE_GPU = "release_gpu"
    LOAD_MODEL = "load_model"
    UNLOAD_MODEL = "unload_model"
    CHECK_HEALTH = "check_health"
    EVICT_MODELS = "evict_models"
    CONFIRM_FREED = "confirm_memory_freed"
    NOTIFY_WAITING = "notify_waiting_models"
    NOTIFY_NODE_LOST = "notify_node_lost"
    READ_RUNTIME_LOG = "read_runtime_log"
    SMOKE_CHECK = "smoke_check"
    DRAIN_RUNTIME = "drain_runtime"
    COUNT_UPDATE = "count_update"
    PARK_MODEL = "park_model"
    WAKE_MODEL = "wake_model"


class ErrorType(StrEnum):
    """`ApplicationError.type` values the workflow reacts to."""

    BAD_MODEL_DIRECTORY = "ModelDirectoryError"
    INSUFFICIENT_CAPACITY = "InsufficientCapacity"
    NO_RUNTIME = "NoRuntimeAvailable"
    RUNTIME_START = "RuntimeStartError"
    RUNTIME_UNHEALTHY = "RuntimeUnhealthy"
    MODEL_REMOVED = "ModelRemoved"
    LOAD_FAILED = "LoadFailed"
    NO_CAPACITY = "NoCapacity"
    MODEL_TOO_LARGE = "ModelTooLarge"
    MEMORY_NOT_FREED = "MemoryNotFreed"
    SMOKE_FAILED = "SmokeCheckFailed"


WORKFLOW_TYPE = "ModelLifecycle"
NODE_WORKFLOW_TYPE = "ModeliumNode"

MODEL_KEY = SearchAttributeKey.for_keyword("ModeliumModel")
PHASE_KEY = SearchAttributeKey.for_keyword("ModeliumPhase")
RUNTIME_KEY = SearchAttributeKey.for_keyword("ModeliumRuntime")
NODE_KEY = SearchAttributeKey.for_keyword("ModeliumNode")
# When the workflow last wrote its summary (STATE_MEMO): a gateway keeping every model's summary
# asks only for those written since its last look.
UPDATED_KEY = SearchAttributeKey.for_datetime("ModeliumUpdatedAt")
SEARCH_ATTRIBUTES = (MODEL_KEY, PHASE_KEY, RUNTIME_KEY, NODE_KEY, UPDATED_KEY)
# Memo key under which each ModelLifecycle keeps its `ModelState` in the visibility store: one
# List call reads every model's summary, with no per-workflow query.
STATE_MEMO = "state"
# Memo key under which each ModeliumNode keeps its node's inventory, updated on each announcement.
INVENTORY_MEMO = "inventory"


class Preload(StrEnum):
    """`orchestration.preload`: what a discovered model does before anyone asks for it."""

    # Loaded at once when it fits without evicting anything; otherwise it rests until demanded.
    FIT = "fit"
    # Analyzed and decided, then it rests until demanded.
    NONE = "none"


def running_models_query(**equals: str) -> str:
    """Visibility query for running ModelLifecycle workflows, optionally narrowed by search
    attributes (`running_models_query(ModeliumNode="n1")`)."""
    clauses = [f'WorkflowType="{WORKFLOW_TYPE}"', 'ExecutionStatus="Running"']
    clauses += [f'{key}="{value}"' for key, value in equals.items()]
    return " AND ".join(clauses)


def models_changed_query(since: datetime) -> str:
    """Visibility query for the ModelLifecycle runs whose summary was written at `since` or later,
    whatever their status (a removed model's last summary says `removed`). One indexed time
    column: an OR with start and close times made SQLite scan and sort every row, which timed out
    while 10,000 models registered."""
    at = since.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return f'WorkflowType="{WORKFLOW_TYPE}" AND {UPDATED_KEY.name}>="{at}"'


async def listed_state(execution: WorkflowExecution) -> ModelState | None:
    """A model's state as the visibility store lists it: the summary its workflow keeps in its
    memo, or (a workflow started before summaries existed) what its search attributes say."""
    name = model_from_workflow_id(execution.id)
    if not name:
        return None
    state = await _memo(execution, STATE_MEMO, ModelState, state_from_json)
    if state is not None:
        return state
    attrs = execution.typed_search_attributes
    return ModelState(
        name=name,
        path="",
        phase=Phase(attrs.get(PHASE_KEY) or Phase.DISCOVERED),
        runtime=attrs.get(RUNTIME_KEY),
        node=attrs.get(NODE_KEY),
    )


async def listed_inventory(execution: WorkflowExecution) -> NodeInventory | None:
    """A node's inventory as its ModeliumNode workflow keeps it in the visibility store; None
    for one started before it kept it there."""
    return await _memo(execution, INVENTORY_MEMO, NodeInventory, inventory_from_json)


async def _memo(
    execution: WorkflowExecution, key: str, cls: type[_D], from_json: Callable[[dict[str, Any]], _D]
) -> _D | None:
    """The memo value under `key`, None if absent. JSON (the default converter's form) is read
    with `from_json`: 70x faster than the data converter's generic dataclass decoding, which at
    10,000 models was most of a listing's time."""
    payload = execution.raw_info.memo.fields.get(key)
    if payload is None:
        return None
    if payload.metadata.get("encoding") == b"json/plain":
        return from_json(json.loads(payload.data))
    value: _D = await execution.memo_value(key, type_hint=cls)
    return value


def inventory_from_json(data: dict[str, Any]) -> NodeInventory:
    fields = dict(data)
    fields["devices"] = [_build(DeviceInventory, d) for d in fields.get("devices") or []]
    return _build(NodeInventory, fields)


def state_from_json(data: dict[str, Any]) -> ModelState:
    """A ModelState from its JSON form (as the default data converter writes dataclasses). Keys
    this version does not know (written by a newer one) are skipped."""
    fields = dict(data)
    fields["phase"] = _member(Phase, fields.get("phase", Phase.DISCOVERED))
    if fields.get("task") is not None:
        fields["task"] = _member(Task, fields["task"])
    if fields.get("endpoint"):
        endpoint = dict(fields["endpoint"])
        endpoint["protocol"] = _member(EndpointProtocol, endpoint.get("protocol"))
        fields["endpoint"] = _build(Endpoint, endpoint)
    if fields.get("booking"):
        fields["booking"] = _build(Booking, fields["booking"])
    if fields.get("decision"):
        decision = dict(fields["decision"])
        decision["evict"] = [_build(Eviction, e) for e in decision.get("evict") or []]
        decision["source"] = _member(DecisionSource, decision.get("source", DecisionSource.RULES))
        fields["decision"] = _build(Decision, decision)
    return _build(ModelState, fields)


def _member(enum: type[_E], value: Any) -> Any:
    """`value` as a member of `enum`, as the data converter would decode it; a value this version
    does not know (written by a newer one) is kept as it is rather than failing the listing."""
    try:
        return enum(value)
    except ValueError:
        return value


_FIELDS: dict[type, frozenset[str]] = {}


def _build(cls: type[_D], data: dict[str, Any]) -> _D:
    names = _FIELDS.get(cls)
    if names is None:
        names = _FIELDS[cls] = frozenset(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]
    return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class LifecycleInput:
    source: ModelSource
    idle_seconds: float = 300.0
    # How long a load may take: the chosen runtime's own setting (runtime name -> seconds), else
    # `load_timeout_seconds` (histories from before the per-runtime table carry only that).
    load_timeout_seconds: float = 600.0
    load_timeouts: dict[str, float] = field(default_factory=dict)
    max_restarts: int = 3
    restart_backoff_seconds: float = 2.0
    preload: str = Preload.FIT
    # orchestration.updates: `blue_green` or `recreate`, and the old version's drain time.
    update_strategy: str = "blue_green"
    drain_seconds: float = 30.0
    # Runtimes on which the new version runs beside the old one (modelium.runtimes.BESIDE_RUNTIMES;
    # the others, and workflows started before this was set, recreate).
    beside_runtimes: list[str] = field(default_factory=list)
    # Runtimes whose idle models are parked (put to sleep, woken by a request) instead of
    # unloaded: vLLM with `vllm.park: sleep` (workflows started before this was set unload).
    park_runtimes: list[str] = field(default_factory=list)
    # A run continues as new past this many history events, if Temporal has not suggested it
    # before (Temporal's own hard limit is 51,200).
    history_limit: int | None = 10_000
    # Set when the workflow continues as new: everything it knew, so nothing restarts.
    state: ModelState | None = None


@dataclass
class RollbackRequest:
    reason: str = "rollback requested"


# Update states in which the model's route is about to change: its new version loads beside the
# serving one, or is being checked. A gateway not told of route changes (`route_changed`) reads
# the state of a model in one of them again within a fraction of a second.
SWITCH_NEAR = ("loading_beside", "smoke_check")


@dataclass
class RouteWatch:
    """A gateway's question (`route_changed`): tell me when requests should no longer go to
    instance `key` where it serves now."""

    key: str = ""


@dataclass
class UsageReport:
    """Requests served since the last report (the gateway coalesces them)."""

    count: int
    # The same requests by organization; sums to `count` when the gateway knows them.
    by_organization: dict[str, int] = field(default_factory=dict)


@dataclass
class RetryRequest:
    reason: str = "retry requested"


@dataclass
class LoadCommand:
    reason: str = "load requested"
    # None leaves the setting as it is.
    pin: bool | None = None
    idle_seconds: float | None = None


@dataclass
class UnloadCommand:
    reason: str = "unload requested"


@dataclass
class RemoveCommand:
    reason: str = "model directory removed"


@dataclass
class HealthReport:
    """Someone (the gateway, a node agent after a restart) saw the runtime fail."""

    reason: str


@dataclass
class EnsureLoadedRequest:
    reason: str = "request waiting"
    pin: bool | None = None
    idle_seconds: float | None = None
    # A request's demand lasts this long (the gateway's cold-start timeout) or until withdrawn
    # under `demand_id`; without it (a manual load) the demand holds until the model loads.
    wait_seconds: float | None = None
    demand_id: str | None = None


@dataclass
class MemoryPeak:
    """A loaded model's runtime held more than ever before (measured by its node agent)."""

    model: str
    bytes: int
    # Its booking after the node resized it to the peak (None: it has none there).
    booked_bytes: int | None = None
    # Devices booked past their capacity because of it.
    over_capacity: list[str] = field(default_factory=list)


@dataclass
class WithdrawDemand:
    """Every request that asked for the model under `demand_id` gave up (timed out, hung up)."""

    demand_id: str


@dataclass
class EnsureUnloadedRequest:
    reason: str = "unload requested"


@dataclass
class EvictCommand:
    """Unload an idle model so that `for_model` fits. Refused (the validator) unless the model is
    loaded, unpinned, not already unloading and unused for `min_idle_seconds`."""

    reason: str
    for_model: str
    min_idle_seconds: float = 0.0


@dataclass
class EvictRequest:
    """For the control activity that evicts the brain's chosen models for `for_model`."""

    for_model: str
    victims: list[Eviction]


@dataclass
class EvictResult:
    evicted: list[str]
    # Model -> why it could not be evicted (used meanwhile, already unloading, ...).
    refused: dict[str, str]
    # The evicted models' runtime processes, whose memory must come back.
    pids: list[int]


@dataclass
class CapacityFreed:
    """Some node released memory: the first models waiting for capacity decide again."""

    node: str
    model: str
    # What was freed; the waiters woken are those whose estimates fit in it (at least one).
    bytes: int = 0
    # Wake only waiters after this place in the queue (`ModelState.wait_order`): a woken waiter
    # that still did not fit passes the room on down the line, never back up it.
    after: list[float] | None = None


def running_nodes_query() -> str:
    return f'WorkflowType="{NODE_WORKFLOW_TYPE}" AND ExecutionStatus="Running"'


@dataclass
class NodeRegistryInput:
    inventory: NodeInventory
    # Declared lost after this long without an announcement (3 x node.announce_seconds); None
    # (workflows started before this existed) never declares it.
    lost_after_seconds: float | None = None


@dataclass
class NodeLost:
    """The node missed its announcements: what runs there is written off and placed again."""

    node: str
    reason: str = "node lost"


@dataclass
class LeaveRequest:
    reason: str = "node agent stopped"


def failure_message(exc: WorkflowUpdateFailedError) -> str:
    """What a workflow said when it refused or failed an update: its ApplicationError's message."""
    return getattr(exc.cause, "message", None) or str(exc.cause)
