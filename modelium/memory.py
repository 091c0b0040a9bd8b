"""What a model will take in memory before it is loaded: weights + KV cache + runtime overhead.

Pure arithmetic on facts the analyzer read (no I/O), so every term can be checked by hand:

    weights * (1 + slack)                     the tensors, plus activations and allocator slack
  + 2 * layers * kv_heads * head_dim * bytes  keys and values, per token
      * context tokens * concurrent sequences
  + runtime overhead                          interpreter, CUDA context, kernels, server

Runtimes differ in slack, overhead and how many sequences they keep in flight: the embedded
runtime generates one sequence at a time; vLLM batches many.
"""

from __future__ import annotations

from dataclasses import dataclass

from modelium.runtimes import EMBEDDED, RUNTIMES, RuntimeProfile

MIB = 1024 * 1024
GIB = 1024 * MIB

# Each runtime's profile, from the runtime table (modelium.runtimes).
PROFILES: dict[str, RuntimeProfile] = {name: facts.profile for name, facts in RUNTIMES.items()}


@dataclass(frozen=True)
class KvShape:
    """Per-token key/value cache of a decoder: from config.json."""

    layers: int
    kv_heads: int
    head_dim: int
    bytes_per_value: int

    def bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.bytes_per_value


def kv_cache_bytes(kv: KvShape | None, context_tokens: int | None, sequences: int) -> int:
    if kv is None or not context_tokens:
        return 0
    return kv.bytes_per_token() * context_tokens * sequences


def estimate(
    weight_bytes: int,
    kv: KvShape | None,
    model_context: int | None,
    runtime: str,
    *,
    max_context_tokens: int,
) -> int:
    """Bytes `runtime` will need to serve the model. The KV cache is sized for the model's own
    context, capped at `max_context_tokens` (what the gateway lets a request use)."""
    profile = PROFILES.get(runtime, PROFILES[EMBEDDED])
    context = min(model_context, max_context_tokens) if model_context else None
    weights = int(weight_bytes * (1 + profile.weight_slack))
    return weights + kv_cache_bytes(kv, context, profile.concurrent_sequences) + profile.overhead_bytes


def per_shard(need: int, runtime: str, shards: int) -> int:
    """What each of `shards` GPUs needs when a model of `need` bytes is split tensor-parallel:
    weights and KV cache divide; every shard's process carries the whole runtime overhead."""
    overhead = PROFILES.get(runtime, PROFILES[EMBEDDED]).overhead_bytes
    return -(-max(need - overhead, 0) // shards) + overhead
