"""Plain data passed between the watcher, workflows, activities and the gateway.

Dataclasses only, no I/O: this module is imported by deterministic workflow code. Times are epoch
seconds (floats) so they serialize the same through every converter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

# Bounds on numbers that come from outside (API, configuration, a model's own settings file, a
# signal sent from the Temporal UI). Every duration is finite and at most a year, so that timers
# built from it never overflow; request counts per usage report are bounded likewise.
MAX_DURATION_SECONDS = 365 * 24 * 3600.0
# An idle timeout shorter than this unloads a model before a request can use it.
MIN_IDLE_SECONDS = 1.0
MAX_USAGE_PER_REPORT = 10**9
# Temporal refuses a timer of zero length (the workflow task fails, again and again): every timer
# a workflow starts lasts at least this long.
MIN_TIMER_SECONDS = 0.001


def valid_seconds(value: object, least: float = 0.0) -> float | None:
    """`value` as a duration when it is a finite number in (0, MAX_DURATION_SECONDS] and at
    least `least`, else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not math.isfinite(value) or not 0 < value <= MAX_DURATION_SECONDS or value < least:
        return None
    return float(value)


class Phase(StrEnum):
    DISCOVERED = "discovered"
    ANALYZING = "analyzing"
    DECIDING = "deciding"
    RESERVING = "reserving"
    LOADING = "loading"
    # No node has room: the model waits, and loads when memory frees.
    WAITING_FOR_CAPACITY = "waiting_for_capacity"
    # Idle models are being unloaded to make room for this one.
    EVICTING = "evicting"
    # The runtime crashed; it is started again at `restart_at` (requests get a 503 meanwhile).
    RESTARTING = "restarting"
    LOADED = "loaded"
    # Idle and asleep (vLLM's sleep mode): its process lives, its weights in host memory, its GPU
    # memory mostly freed. A request wakes it (`waking`), much faster than a load.
    PARKED = "parked"
    WAKING = "waking"
    UNLOADING = "unloading"
    UNLOADED = "unloaded"
    FAILED = "failed"
    REMOVED = "removed"


# The phases a registered model can be listed in (a removed one is no longer listed).
LISTED_PHASES = frozenset(p for p in Phase if p != Phase.REMOVED)


class Task(StrEnum):
    TEXT_GENERATION = "text-generation"
    TEXT_CLASSIFICATION = "text-classification"
    FEATURE_EXTRACTION = "feature-extraction"
    TEXT2TEXT_GENERATION = "text2text-generation"
    TOKEN_CLASSIFICATION = "token-classification"
    FILL_MASK = "fill-mask"
    IMAGE_CLASSIFICATION = "image-classification"
    AUTOMATIC_SPEECH_RECOGNITION = "automatic-speech-recognition"
    AUDIO_CLASSIFICATION = "audio-classification"
    ZERO_SHOT_IMAGE_CLASSIFICATION = "zero-shot-image-classification"
    IMAGE_TEXT_TO_TEXT = "image-text-to-text"
    # An ONNX model or a Triton entry: its inputs and outputs say what it does.
    CUSTOM = "custom"


class Modality(StrEnum):
    TEXT = "text"
    VISION = "vision"
    AUDIO = "audio"
    MULTIMODAL = "multimodal"
    UNKNOWN = "unknown"


class ModelFormat(StrEnum):
    HUGGINGFACE = "huggingface"
    ONNX = "onnx"
    TRITON = "triton"
    GGUF = "gguf"


class EndpointProtocol(StrEnum):
    """What an endpoint speaks (named so as not to shadow `typing.Protocol`)."""

    # OpenAI-compatible /v1/completions (+ /v1/chat/completions) and /health.
    OPENAI = "openai"
    # Modelium's own JSON: POST /predict {"inputs": ...} -> {"output": ...}.
    MODELIUM_JSON = "modelium-json"
    # KServe v2 (Triton): POST /v2/models/<name>/infer with named tensors.
    KSERVE_V2 = "kserve-v2"
    # Temporal's frontend (the record of the embedded server a `serve` started).
    GRPC = "grpc"


@dataclass
class ModelSource:
    """A model directory as the watcher saw it, once its files stopped changing."""

    name: str
    path: str
    fingerprint: str
    # Serve this numbered version folder rather than the highest complete one (a rollback).
    version: str | None = None


@dataclass
class ModelAnalysis:
    name: str
    path: str
    format: ModelFormat
    architecture: str
    model_type: str
    task: Task
    modality: Modality
    weight_files: list[str] = field(default_factory=list)
    weight_bytes: int = 0
    parameter_count: int | None = None
    dtype: str | None = None
    has_tokenizer: bool = False
    context_length: int | None = None
    memory_estimate_bytes: int = 0
    has_chat_template: bool = False
    # e.g. "gptq 4-bit", "awq 4-bit", "Q4_K_M" (GGUF); None for full-precision weights.
    quantization: str | None = None
    # Keys and values cached per token of context (decoders only), from config.json.
    kv_bytes_per_token: int | None = None
    # Runtime name -> bytes it will need (see modelium.memory); memory_estimate_bytes is the
    # embedded runtime's.
    memory_estimates: dict[str, int] = field(default_factory=dict)
    # From the model card's front matter (README.md).
    license: str | None = None
    pipeline_tag: str | None = None
    base_model: str | None = None
    # Format-specific facts in words (ONNX inputs/outputs, Triton platform, GGUF architecture).
    details: dict[str, str] = field(default_factory=dict)
    # How the user asked this model to run (modelium.yaml beside it, `models:` in the config).
    overrides: ModelOverrides | None = None

    def summary(self) -> str:
        size = f"{self.parameter_count:,} params" if self.parameter_count else f"{self.weight_bytes:,} bytes"
        quant = f", {self.quantization}" if self.quantization else ""
        return f"{self.architecture} ({self.model_type}), {self.task}, {size}{quant}"


@dataclass
class Eviction:
    """An idle model to unload so that another fits, and why it was chosen."""

    model: str
    node: str
    device: str
    bytes: int
    # Its retention score (lower goes first) and the score's parts in words.
    score: float
    reason: str
    # Its runtime process, to confirm its memory came back once it is unloaded.
    pid: int | None = None


class DecisionSource(StrEnum):
    RULES = "rules"
    LLM = "llm"


@dataclass
class Decision:
    runtime: str
    node: str
    device: str
    reason: str
    source: DecisionSource = DecisionSource.RULES
    # What the chosen runtime needs on each chosen device (the analyzer's estimate for it).
    memory_bytes: int = 0
    # Every device the model spans (tensor parallel); empty means just `device`.
    devices: list[str] = field(default_factory=list)
    # Idle models to unload first to make room (empty when the model fits as things are).
    evict: list[Eviction] = field(default_factory=list)
    # Set when there is no room now and it may not evict (a preload): why; the decision is then
    # where it would go on emptied nodes, shown while it rests, and it is not loaded.
    no_room: str | None = None

    @property
    def all_devices(self) -> list[str]:
        return self.devices or [self.device]


@dataclass
class DeviceInventory:
    device: str  # "cpu" or "cuda:<index>"
    name: str
    total_bytes: int
    used_bytes: int | None
    booked_bytes: int


@dataclass
class NodeInventory:
    """What a node agent announces: its devices, their memory and bookings, its runtimes."""

    node: str
    devices: list[DeviceInventory]
    runtimes: list[str]
    announced_at: float
    # Set by the control plane once the node missed its announcements (its bookings written off).
    lost: str | None = None


@dataclass
class ModelOverrides:
    """Per-model settings from `models.<name>` in the config or a `modelium.yaml` beside the
    model (the config wins where both set a key). None leaves the default."""

    runtime: str | None = None
    pin: bool | None = None
    idle_timeout_seconds: float | None = None
    # Restrict placement: a node id, and devices on it ("cpu", "cuda:0", ...).
    node: str | None = None
    devices: list[str] = field(default_factory=list)
    # false: an update switches to the new version without the smoke check's real request; a
    # custom check: POST `smoke_body` to `smoke_path` on the runtime, expecting `smoke_status`.
    smoke: bool | None = None
    smoke_path: str | None = None
    smoke_body: dict[str, Any] | None = None
    smoke_status: int = 200
    # Where each value came from, for messages ("models.foo in modelium.yaml", ...).
    source: str = ""


@dataclass
class Resident:
    """A loaded model as placement sees it: what it holds and how it has been used."""

    model: str
    node: str
    devices: list[str]
    # Booked bytes on each device.
    bytes: int
    pinned: bool
    loaded_at: float
    last_used_at: float
    # What loading it took last time: the cost of bringing it back.
    load_seconds: float | None
    pid: int | None = None


@dataclass
class Booking:
    model: str
    node: str
    device: str
    # Bytes booked on each device.
    bytes: int
    # Every device booked (tensor parallel); empty means just `device`.
    devices: list[str] = field(default_factory=list)

    @property
    def all_devices(self) -> list[str]:
        return self.devices or [self.device]


@dataclass
class Endpoint:
    url: str
    protocol: EndpointProtocol
    runtime: str
    node: str
    pid: int | None = None


@dataclass
class LoadRequest:
    model: str
    path: str
    runtime: str
    task: Task
    booking: Booking
    # What the analyzer found the model to be (`ModelFormat`): a runtime that writes the model in
    # its own form (Triton's repository) goes by it rather than reading the folder again.
    format: ModelFormat = ModelFormat.HUGGINGFACE


class UnloadKind(StrEnum):
    """Why a model was unloaded, as a bounded set (a metric label)."""

    IDLE = "idle"
    REQUESTED = "requested"
    REMOVED = "removed"
    FILES_CHANGED = "files_changed"
    UNHEALTHY = "unhealthy"
    EVICTED = "evicted"


@dataclass
class ModelState:
    """What a model's workflow knows; returned by its `state` query."""

    name: str
    path: str
    fingerprint: str = ""
    phase: Phase = Phase.DISCOVERED
    runtime: str | None = None
    node: str | None = None
    device: str | None = None
    endpoint: Endpoint | None = None
    task: Task | None = None
    analysis_summary: str | None = None
    memory_estimate_bytes: int | None = None
    decision: Decision | None = None
    booking: Booking | None = None
    idle_seconds: float = 300.0
    last_used_at: float | None = None
    loaded_at: float | None = None
    load_seconds: float | None = None
    measured_memory_bytes: int | None = None
    request_count: int = 0
    load_count: int = 0
    last_error: str | None = None
    unload_reason: str | None = None
    updated_at: float | None = None
    # Pinned models are never unloaded for being idle (only on request or removal).
    pinned: bool = False
    # Requests counted per organization (API keys map to one); "anonymous" without keys.
    requests_by_organization: dict[str, int] = field(default_factory=dict)
    # Crashes of its runtime in the current 10-minute window, and when the next start is due.
    crash_count: int = 0
    crashed_at: float | None = None
    restart_at: float | None = None
    # Why an unloaded model rests rather than loads ("not preloaded: no free room on any node").
    rest_reason: str | None = None
    # When the current demand for it began (a request, a manual load, a pin): waiters for
    # capacity are served pinned first, then in this order.
    demanded_at: float | None = None
    # The most memory its runtime held while loaded (RSS on CPU, NVML on a GPU), after a warm-up.
    peak_memory_bytes: int | None = None
    # The key its runtime instance has on its node (process, booking, log; see
    # modelium.names.instance_key): None for the model's name, "name@uN" after an update.
    instance: str | None = None
    # Updates (new files while loaded): how many were tried; the one under way ("analyzing",
    # "loading_beside", "smoke_check", "draining") or the last one's failure ("update_failed",
    # the old version still serving) with its reason; the new version's booking while it loads
    # beside the old one; and when the serving version was switched to.
    update_count: int = 0
    update_state: str | None = None
    update_error: str | None = None
    update_booking: Booking | None = None
    switched_at: float | None = None
    # The serving version: the folder its runtime loaded (a symlink resolved, a numbered version
    # folder), and its number in a numbered layout (`my-model/3/`).
    serving_path: str | None = None
    version: str | None = None
    # What `rollback` goes back to: the version served before the last switch, while its files
    # exist (None when they were replaced in place). After a rollback: the watched folder's
    # fingerprint that was rolled back from (those same files again are not an update), and the
    # numbered version held to.
    previous: ModelSource | None = None
    held_fingerprint: str | None = None
    version_pin: str | None = None
    # While parked: the host memory booked for its weights (the node's CPU budget), and the GPU
    # booking it takes back when it wakes (its booking meanwhile is what it still holds there).
    parked_bytes: int | None = None
    wake_bytes: int | None = None

    @property
    def key(self) -> str:
        """Its runtime instance's key on its node."""
        return self.instance or self.name

    def wait_order(self) -> tuple[int, float]:
        """Its place among models waiting for capacity: pinned first, then the earliest asked."""
        return (0 if self.pinned else 1, self.demanded_at or self.updated_at or 0.0)
