"""What workflows, activities, workers and the gateway agree on: names, payloads, search attributes.

Deterministic and free of I/O, like everything in `workflows/`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from temporalio.common import SearchAttributeKey

from modelium.types import Eviction, ModelSource, ModelState, NodeInventory


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


class ErrorType:
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


WORKFLOW_TYPE = "ModelLifecycle"
NODE_WORKFLOW_TYPE = "ModeliumNode"

MODEL_KEY = SearchAttributeKey.for_keyword("ModeliumModel")
PHASE_KEY = SearchAttributeKey.for_keyword("ModeliumPhase")
RUNTIME_KEY = SearchAttributeKey.for_keyword("ModeliumRuntime")
NODE_KEY = SearchAttributeKey.for_keyword("ModeliumNode")
SEARCH_ATTRIBUTES = (MODEL_KEY, PHASE_KEY, RUNTIME_KEY, NODE_KEY)


def running_models_query(**equals: str) -> str:
    """Visibility query for running ModelLifecycle workflows, optionally narrowed by search
    attributes (`running_models_query(ModeliumNode="n1")`)."""
    clauses = [f'WorkflowType="{WORKFLOW_TYPE}"', 'ExecutionStatus="Running"']
    clauses += [f'{key}="{value}"' for key, value in equals.items()]
    return " AND ".join(clauses)


@dataclass
class LifecycleInput:
    source: ModelSource
    idle_seconds: float = 300.0
    load_timeout_seconds: float = 600.0
    max_restarts: int = 3
    restart_backoff_seconds: float = 2.0
    # Set when the workflow continues as new: everything it knew, so nothing restarts.
    state: ModelState | None = None


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
    """Some node released memory: a model waiting for capacity should decide again."""

    node: str
    model: str


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
