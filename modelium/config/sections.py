"""The settings' schema: every section of `modelium.yaml`, its defaults and its checks (pydantic).
Reading them from the file and the environment is `modelium.config.loading`."""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    FilePath,
    SecretStr,
    field_validator,
    model_validator,
)

from modelium.names import CONTROL_TASK_QUEUE, sanitize_node_id, validate_model_name
from modelium.types import MAX_DURATION_SECONDS, MIN_IDLE_SECONDS

# Byte counts beyond this are no machine's (and would not fit Temporal's 64-bit integers).
MAX_BYTES = 2**62


class _Section(BaseModel):
    # NaN and infinities are refused everywhere: a timer or a budget built from one breaks.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class Triton(_Section):
    """NVIDIA Triton in explicit model-control mode: the server at `url`, or one the node agent
    starts from `binary` ("auto": the one in the nvidia-pytriton wheel, else `tritonserver` on PATH)."""

    enabled: bool = False
    url: str | None = None
    binary: str = "auto"
    # Where Modelium writes model entries; None: under the node's state directory.
    model_repository: Path | None = None
    # The started server's HTTP port; None: a free one.
    http_port: int | None = Field(default=None, ge=1, le=65535)
    start_timeout_seconds: float = Field(default=120.0, gt=0.0, le=MAX_DURATION_SECONDS)


class RayServe(_Section):
    """Ray Serve: the cluster whose dashboard is at `address` (e.g. http://head:8265), or a local
    one the node agent starts. One application per model, route prefix /<model>."""

    enabled: bool = False
    address: str | None = None
    # Port of Serve's HTTP proxy (the gateway sends requests there).
    http_port: int = Field(default=8500, ge=1, le=65535)
    # CPUs the local cluster offers; None: all of this machine's.
    num_cpus: int | None = Field(default=None, ge=1)
    start_timeout_seconds: float = Field(default=180.0, gt=0.0, le=MAX_DURATION_SECONDS)
    load_timeout_seconds: float = Field(default=600.0, gt=0.0, le=MAX_DURATION_SECONDS)


class Vllm(_Section):
    """vLLM's OpenAI-compatible server, one process per model on the booked GPUs."""

    enabled: bool = False
    # The command, then Modelium's arguments (--served-model-name, --host, --port,
    # --tensor-parallel-size, --gpu-memory-utilization), then `extra_args`. "{model_dir}" and
    # "{name}" are replaced in every element.
    command: list[str] = Field(default_factory=lambda: ["vllm", "serve", "{model_dir}"], min_length=1)
    extra_args: list[str] = Field(default_factory=list)
    host: str = "127.0.0.1"
    # Ports the servers listen on: [first, last].
    port_range: tuple[int, int] = (8300, 8399)
    load_timeout_seconds: float = Field(default=900.0, gt=0.0, le=MAX_DURATION_SECONDS)
    # What an idle model does: `sleep` parks it (vLLM's sleep mode, level 1: weights to host
    # memory, KV cache freed; a request wakes it in about a second) when the node's CPU budget
    # has room for its weights, else it is unloaded; `unload` always unloads. With `sleep` the
    # server runs with --enable-sleep-mode and VLLM_SERVER_DEV_MODE=1 (which serves /sleep).
    park: Literal["sleep", "unload"] = "sleep"

    @field_validator("port_range")
    @classmethod
    def _valid_range(cls, value: tuple[int, int]) -> tuple[int, int]:
        first, last = value
        if not 1024 <= first <= last <= 65535:
            raise ValueError(f"must be [first, last] with 1024 <= first <= last <= 65535, got {list(value)}")
        return value

    @field_validator("extra_args")
    @classmethod
    def _not_managed(cls, args: list[str]) -> list[str]:
        managed = {"--port", "--host", "--served-model-name", "--tensor-parallel-size", "--gpu-memory-utilization"}
        clash = sorted({a.split("=", 1)[0] for a in args} & managed)
        if clash:
            raise ValueError(f"{', '.join(clash)} are set by Modelium from the booking; remove them")
        return args


class ModelDiscovery(_Section):
    watch_directories: list[Path] = Field(default_factory=lambda: [Path("./models/incoming")])
    # A model directory is handed over only after its files stopped changing for this long.
    settle_seconds: float = Field(default=3.0, ge=0.0, le=3600.0)
    # Polling works on network and container mounts where inotify sees nothing.
    polling: bool = False
    poll_interval_seconds: float = Field(default=1.0, gt=0.0, le=600.0)


class Policies(_Section):
    evict_after_idle_seconds: float = Field(default=300.0, ge=MIN_IDLE_SECONDS, le=MAX_DURATION_SECONDS)
    # A runtime that crashes is restarted after restart_backoff_seconds, doubling each time, at
    # most max_restarts times in 10 minutes; then the model is `failed` until asked to load.
    max_restarts: int = Field(default=3, ge=0, le=100)
    restart_backoff_seconds: float = Field(default=2.0, ge=0.1, le=600.0)


class Eviction(_Section):
    """When no device has room, idle models may be unloaded for a model that needs it."""

    enabled: bool = True
    # Only models loaded at least this long (no thrashing of fresh loads) ...
    min_resident_seconds: float = Field(default=120.0, ge=0.0, le=MAX_DURATION_SECONDS)
    # ... and unused at least this long may be evicted.
    min_idle_seconds: float = Field(default=30.0, ge=0.0, le=MAX_DURATION_SECONDS)
    # Which idle model goes first: `score` (recent use x reload time / memory held, lowest
    # first) or `lru` (least recently used first).
    policy: Literal["score", "lru"] = "score"


class Updates(_Section):
    """What happens when a loaded model's files change."""

    # blue_green: the new version is loaded beside the serving one (room permitting), checked
    # with one real request, and the route switches to it; a broken new version leaves the old
    # one serving. recreate: the model is taken down first, then loaded (requests are held).
    # Runtimes that serve many models from one server (Triton, Ray Serve) always recreate.
    strategy: Literal["blue_green", "recreate"] = "blue_green"
    # How long the old version may take to answer the requests it has after the switch.
    drain_seconds: float = Field(default=30.0, ge=0.0, le=3600.0)


class Orchestration(_Section):
    # What a discovered model does before anyone asks for it: `fit` loads it at once when it fits
    # without evicting anything (else it rests in `unloaded`); `none` only analyzes and decides.
    # Only demand (a request, POST /models/{name}/load, a pin) may evict or wait for room.
    preload: Literal["fit", "none"] = "fit"
    model_discovery: ModelDiscovery = Field(default_factory=ModelDiscovery)
    policies: Policies = Field(default_factory=Policies)
    eviction: Eviction = Field(default_factory=Eviction)
    updates: Updates = Field(default_factory=Updates)


RuntimeName = Literal["embedded", "vllm", "triton", "ray_serve"]


class SmokeRequest(_Section):
    """The one real request a new version must answer before it is switched to."""

    # On the runtime, e.g. /v1/completions or /predict.
    path: str = Field(pattern=r"^/[A-Za-z0-9._~/-]{0,200}$")
    # JSON body; for an OpenAI path without "model", the model's name is added.
    body: dict[str, Any] = Field(default_factory=dict)
    status: int = Field(default=200, ge=100, le=599)


class ModelSettings(_Section):
    """Per-model overrides: under `models.<name>` here, or in a `modelium.yaml` beside the model."""

    runtime: RuntimeName | None = None
    pin: bool | None = None
    idle_timeout_seconds: float | None = Field(default=None, ge=MIN_IDLE_SECONDS, le=MAX_DURATION_SECONDS)
    # Place the model only on this node, and only on these of its devices ("cpu", "cuda:0").
    node: str | None = None
    devices: list[str] = Field(default_factory=list)
    # false: a new version of this model is switched to without the one real request first;
    # {path, body, status}: that request instead of the default one.
    smoke: bool | SmokeRequest | None = None

    @field_validator("devices")
    @classmethod
    def _valid_devices(cls, devices: list[str]) -> list[str]:
        for device in devices:
            if device != "cpu" and not (device.startswith("cuda:") and device[5:].isdigit()):
                raise ValueError(f"{device!r} is not a device; use cpu or cuda:<index>")
        return devices


class LlmBrain(_Section):
    """Ask an OpenAI-compatible endpoint (any, even a model Modelium serves) where a model should
    run; the rules decide when it fails, times out or answers something not available."""

    enabled: bool = False
    # e.g. http://127.0.0.1:8000/v1 (the gateway itself) or a hosted API's base URL.
    base_url: str | None = None
    model: str | None = None
    # The name of an environment variable holding the API key, if the endpoint needs one.
    api_key_env: str | None = None
    timeout_seconds: float = Field(default=10.0, gt=0.0, le=300.0)


class Brain(_Section):
    llm: LlmBrain = Field(default_factory=LlmBrain)


class Metrics(_Section):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=9090, ge=0, le=65535)


class TemporalTls(_Section):
    """TLS to a Temporal cluster: mTLS (a client certificate and its key, the cluster's CA) or
    Temporal Cloud (the system's roots, with `temporal.api_key`). Files are PEM."""

    # None: on when any file below or temporal.api_key is set.
    enabled: bool | None = None
    # The CA that signed the server's certificate; None: the system's roots.
    ca_cert: FilePath | None = None
    client_cert: FilePath | None = None
    client_key: FilePath | None = None
    # The name the server's certificate is checked against, when it is not the address's host.
    server_name: str | None = Field(default=None, min_length=1, max_length=253)

    @model_validator(mode="after")
    def _consistent(self) -> TemporalTls:
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("client_cert and client_key go together (mTLS needs both)")
        files = self.ca_cert or self.client_cert or self.server_name
        if self.enabled is False and files:
            raise ValueError("enabled is false, but certificates or server_name are set")
        return self


class Temporal(_Section):
    # None: start an embedded dev server (SQLite under state_dir). Otherwise host:port of a cluster.
    address: str | None = None
    tls: TemporalTls = Field(default_factory=TemporalTls)
    # Sent as a bearer token on every call (Temporal Cloud API keys); never printed.
    api_key: SecretStr | None = None
    namespace: str = "default"
    # The task queue of control workers; node agents each use modelium-node-<node id>.
    control_task_queue: str = CONTROL_TASK_QUEUE
    port: int = Field(default=7233, ge=1, le=65535)
    ui_port: int = Field(default=8233, ge=1, le=65535)
    ui: bool = True
    # The Temporal Web UI of a cluster (`address` set), for the dashboard's links to each model's
    # workflow, e.g. https://temporal.example.com. The embedded server's UI is known without it.
    ui_url: str | None = Field(default=None, pattern=r"^https?://[^\s]+$")
    startup_timeout_seconds: float = Field(default=60.0, gt=0.0, le=MAX_DURATION_SECONDS)
    # Model workflows the control worker keeps in memory (about 0.3 MB each, bench/scale.py).
    # None: sized from the number of models, at most 4,000; one not cached replays its history
    # (milliseconds) on its next signal or query.
    max_cached_workflows: int | None = Field(default=None, ge=10, le=1_000_000)

    @property
    def uses_tls(self) -> bool:
        if self.tls.enabled is not None:
            return self.tls.enabled
        return bool(self.tls.ca_cert or self.tls.client_cert or self.tls.server_name or self.api_key)

    @model_validator(mode="after")
    def _remote_only(self) -> Temporal:
        if self.address is None and (self.uses_tls or self.api_key):
            raise ValueError(
                "tls and api_key are for a Temporal cluster: set temporal.address too "
                "(the embedded dev server listens on loopback without them)"
            )
        return self


class ApiKey(_Section):
    """One API key, stored as the SHA-256 of the key (`modelium keys create` makes both)."""

    name: str = Field(min_length=1, max_length=64)
    organization: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    # "admin" may load and unload models and read every detail; every key may list models and
    # run inference.
    scopes: list[Literal["admin"]] = Field(default_factory=list)
    # Model names or globs (`llama-*`) this key may see and use; empty: every model.
    models: list[str] = Field(default_factory=list, max_length=1000)


class Gateway(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    # Usage counts are coalesced into one signal per model per interval; 0 sends one per request.
    usage_flush_seconds: float = Field(default=1.0, ge=0.0, le=60.0)
    # How long a model's endpoint, read from its workflow, is reused before it is read again.
    endpoint_cache_seconds: float = Field(default=2.0, ge=0.0, le=300.0)
    request_timeout_seconds: float = Field(default=300.0, gt=0.0, le=MAX_DURATION_SECONDS)
    max_tokens_limit: int = Field(default=4096, ge=1, le=10**7)
    # A request for a model that is not loaded waits this long for its load, then gets a 503.
    cold_start_timeout_seconds: float = Field(default=300.0, gt=0.0, le=MAX_DURATION_SECONDS)
    # Requests that may wait on one cold model; past this they get a 429 with Retry-After.
    max_waiting_requests: int = Field(default=256, ge=0, le=10**6)
    # Larger request bodies are refused with a 413.
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024, le=2**31)
    # GET /events: how many recent events each gateway keeps for clients that reconnect.
    events_ring_size: int = Field(default=5000, ge=10, le=10**6)
    # Empty: no authentication (keep the gateway on loopback then).
    api_keys: list[ApiKey] = Field(default_factory=list)

    @field_validator("api_keys")
    @classmethod
    def _unique_keys(cls, keys: list[ApiKey]) -> list[ApiKey]:
        seen: set[str] = set()
        for key in keys:
            if key.sha256 in seen:
                raise ValueError(f"two API keys share the sha256 {key.sha256[:12]}...")
            seen.add(key.sha256)
        return keys


_NODE_ID = re.compile(r"[a-z0-9](?:[a-z0-9._-]{0,251}[a-z0-9])?")


class Node(_Section):
    id: str = Field(default_factory=lambda: sanitize_node_id(socket.gethostname()))
    # Memory that models may book on a node without a GPU. None: half of this machine's RAM.
    cpu_memory_budget_bytes: int | None = Field(default=None, gt=0, le=MAX_BYTES)
    # How often the node agent announces its inventory; three missed announcements mean gone.
    announce_seconds: float = Field(default=5.0, gt=0.0, le=300.0)
    # A node silent this long (and at least 3 announcements) is declared lost: its models are
    # placed on other nodes. Keep it above the time a node agent takes to restart.
    lost_after_seconds: float = Field(default=15.0, ge=1.0, le=3600.0)
    # How often the node agent looks for runtime processes that exited on their own.
    process_check_seconds: float = Field(default=2.0, gt=0.0, le=300.0)
    # The address this node's runtime servers listen on. Loopback serves only gateways on this
    # machine; a gateway elsewhere (another container, pod or machine) needs 0.0.0.0 and
    # `advertise_host`, the name or address it reaches this node by.
    runtime_host: str = Field(default="127.0.0.1", min_length=1)
    advertise_host: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _reachable(self) -> Node:
        if self.runtime_host in ("0.0.0.0", "::") and self.advertise_host is None:
            raise ValueError(
                f"runtime_host {self.runtime_host} listens on every interface: set node.advertise_host "
                "to the name or address gateways reach this node by (in Kubernetes, the pod's IP)"
            )
        return self

    @field_validator("id")
    @classmethod
    def _valid_id(cls, value: str) -> str:
        # Dots are let through: a Kubernetes node name is a DNS name (up to 253 characters), and
        # the chart passes it as the id. Task queues and workflow ids spell it sanitized (dots as
        # '-', at most 48 characters), like the default made from the hostname.
        if not _NODE_ID.fullmatch(value):
            raise ValueError(
                f"node id {value!r} may only hold lowercase letters, digits, '-', '_' and '.', and must "
                f"start and end with a letter or digit (for example {sanitize_node_id(value)!r})"
            )
        return value


class EmbeddedRuntime(_Section):
    # "auto" takes the booked GPU when there is one, else the CPU.
    device: str = "auto"
    load_timeout_seconds: float = Field(default=600.0, gt=0.0, le=MAX_DURATION_SECONDS)
    # Threads each CPU model may use; None lets PyTorch decide.
    cpu_threads: int | None = Field(default=None, ge=1)
    # Runtime processes kept started, imports done, for the next loads (0: none). Their resident
    # memory is booked in the node's CPU budget.
    warm_pool: int = Field(default=1, ge=0, le=16)


class Runtimes(_Section):
    embedded: EmbeddedRuntime = Field(default_factory=EmbeddedRuntime)


class Settings(_Section):
    state_dir: Path = Path("./.modelium")
    log_level: str = "INFO"
    vllm: Vllm = Field(default_factory=Vllm)
    triton: Triton = Field(default_factory=Triton)
    ray_serve: RayServe = Field(default_factory=RayServe)
    orchestration: Orchestration = Field(default_factory=Orchestration)
    metrics: Metrics = Field(default_factory=Metrics)
    temporal: Temporal = Field(default_factory=Temporal)
    gateway: Gateway = Field(default_factory=Gateway)
    node: Node = Field(default_factory=Node)
    runtimes: Runtimes = Field(default_factory=Runtimes)
    brain: Brain = Field(default_factory=Brain)
    models: dict[str, ModelSettings] = Field(default_factory=dict)

    @field_validator("models")
    @classmethod
    def _valid_model_names(cls, models: dict[str, ModelSettings]) -> dict[str, ModelSettings]:
        for name in models:
            try:
                validate_model_name(name)
            except ValueError as exc:
                raise ValueError(str(exc)) from None
        return models

    @model_validator(mode="after")
    def _llm_brain_complete(self) -> Settings:
        llm = self.brain.llm
        if llm.enabled and not (llm.base_url and llm.model):
            raise ValueError("brain.llm.enabled needs brain.llm.base_url and brain.llm.model")
        return self

    @field_validator("log_level")
    @classmethod
    def _valid_level(cls, value: str) -> str:
        upper = value.upper()
        if upper not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
        return upper

    @property
    def watch_directories(self) -> list[Path]:
        return list(self.orchestration.model_discovery.watch_directories)

    @property
    def idle_seconds(self) -> float:
        return self.orchestration.policies.evict_after_idle_seconds
