"""Runtime adapters: each starts a model somewhere and gives back an HTTP endpoint.

This module is the one table of runtimes: their names and the facts the brain, the memory model
and the workers read (adding a runtime means one adapter and one entry here). It imports no
adapter, so reading the table pulls in no runtime's dependencies."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from modelium.config import Settings

MIB = 1024 * 1024

EMBEDDED = "embedded"
VLLM = "vllm"
TRITON = "triton"
RAY_SERVE = "ray_serve"


@dataclass(frozen=True)
class RuntimeProfile:
    """What a runtime adds to a model's weights in memory (modelium.memory)."""

    overhead_bytes: int
    weight_slack: float
    # Sequences whose KV cache is resident at once.
    concurrent_sequences: int


@dataclass(frozen=True)
class RuntimeFacts:
    name: str
    profile: RuntimeProfile
    # Whether this node may place models on it, from the settings (the embedded one always).
    enabled: Callable[[Settings], bool]
    # How long a load may take on it; None: the embedded runtime's (Triton's server start has
    # a timeout of its own).
    load_timeout_seconds: Callable[[Settings], float | None]
    # Splits one model over several GPUs (tensor parallel).
    splits_models: bool = False


# Overheads measured on the embedded runtime (a Python process with torch + transformers); the
# others are the usual figures for their servers and are corrected by measured profiles.
RUNTIMES: dict[str, RuntimeFacts] = {
    EMBEDDED: RuntimeFacts(
        EMBEDDED,
        RuntimeProfile(overhead_bytes=400 * MIB, weight_slack=0.2, concurrent_sequences=1),
        enabled=lambda s: True,
        load_timeout_seconds=lambda s: s.runtimes.embedded.load_timeout_seconds,
    ),
    VLLM: RuntimeFacts(
        VLLM,
        RuntimeProfile(overhead_bytes=1536 * MIB, weight_slack=0.05, concurrent_sequences=16),
        enabled=lambda s: s.vllm.enabled,
        load_timeout_seconds=lambda s: s.vllm.load_timeout_seconds,
        splits_models=True,
    ),
    TRITON: RuntimeFacts(
        TRITON,
        RuntimeProfile(overhead_bytes=300 * MIB, weight_slack=0.1, concurrent_sequences=4),
        enabled=lambda s: s.triton.enabled,
        load_timeout_seconds=lambda s: None,
    ),
    RAY_SERVE: RuntimeFacts(
        RAY_SERVE,
        RuntimeProfile(overhead_bytes=600 * MIB, weight_slack=0.2, concurrent_sequences=1),
        enabled=lambda s: s.ray_serve.enabled,
        load_timeout_seconds=lambda s: s.ray_serve.load_timeout_seconds,
    ),
}

# Runtimes that split a model over several GPUs.
TENSOR_PARALLEL = frozenset(name for name, facts in RUNTIMES.items() if facts.splits_models)
# Runtimes on which an update loads the new version beside the serving one (blue/green): all of
# them, since each keys what it serves by the instance key (a process of its own, a Triton
# model, a Ray Serve application). Workflows started before Triton and Ray Serve were among
# them carry the shorter list in their input and recreate on those.
BESIDE_RUNTIMES = frozenset(RUNTIMES)


def enabled_runtimes(settings: Settings) -> list[str]:
    """The runtimes models may be placed on with these settings, in the table's order (a node
    places a model only on a runtime it runs, and the control worker offers only those)."""
    return [name for name, facts in RUNTIMES.items() if facts.enabled(settings)]


def load_timeouts(settings: Settings) -> dict[str, float]:
    """How long a load may take on each runtime that has its own setting."""
    out = {}
    for name, facts in RUNTIMES.items():
        seconds = facts.load_timeout_seconds(settings)
        if seconds is not None:
            out[name] = seconds
    return out
