"""Modelium configuration: `modelium.yaml`, overridden by `MODELIUM_*` environment variables.

Every key is optional. Nested keys are reached from the environment with a double underscore:
`MODELIUM_ORCHESTRATION__POLICIES__EVICT_AFTER_IDLE_SECONDS=60`. Values from the environment are
parsed as YAML scalars/lists, so `MODELIUM_VLLM__ENABLED=true` is a boolean and
`MODELIUM_ORCHESTRATION__MODEL_DISCOVERY__WATCH_DIRECTORIES='[/a, /b]'` is a list.
"""

from modelium.config.loading import DEFAULT_CONFIG_FILE, ENV_PREFIX, ConfigError, load_settings
from modelium.config.sections import (
    MAX_BYTES,
    ApiKey,
    Brain,
    EmbeddedRuntime,
    Eviction,
    Gateway,
    LlmBrain,
    Metrics,
    ModelDiscovery,
    ModelSettings,
    Node,
    Orchestration,
    Policies,
    RayServe,
    RuntimeName,
    Runtimes,
    Settings,
    SmokeRequest,
    Temporal,
    TemporalTls,
    Triton,
    Vllm,
)

__all__ = [
    "DEFAULT_CONFIG_FILE",
    "ENV_PREFIX",
    "MAX_BYTES",
    "ApiKey",
    "Brain",
    "ConfigError",
    "EmbeddedRuntime",
    "Eviction",
    "Gateway",
    "LlmBrain",
    "Metrics",
    "ModelDiscovery",
    "ModelSettings",
    "SmokeRequest",
    "Node",
    "Orchestration",
    "Policies",
    "RayServe",
    "RuntimeName",
    "Runtimes",
    "Settings",
    "Temporal",
    "TemporalTls",
    "Triton",
    "Vllm",
    "load_settings",
]
