"""The brain: pure functions from facts (a model's analysis, the runtimes, the nodes' inventories)
to a decision with its reason in words. No I/O, so every rule is unit-tested without a server."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from modelium import memory
from modelium.runtimes import EMBEDDED, RAY_SERVE, TENSOR_PARALLEL, TRITON, VLLM
from modelium.types import (
    Decision,
    DeviceInventory,
    Eviction,
    Modality,
    ModelAnalysis,
    ModelFormat,
    ModelOverrides,
    NodeInventory,
    Resident,
    Task,
)

# What the embedded runtime serves (modelium.runtimes.embedded_server).
EMBEDDED_TASKS = frozenset({Task.TEXT_GENERATION, Task.TEXT_CLASSIFICATION, Task.FEATURE_EXTRACTION})


class NoRuntimeAvailable(ValueError):
    """No enabled runtime can serve this model."""


class NoCapacity(RuntimeError):
    """Runtimes could serve the model, but no node has room for it now."""


class ModelTooLarge(NoCapacity):
    """No device of any live node could hold the model even if it were empty: waiting for room
    would wait forever."""


def choose_runtime(
    analysis: ModelAnalysis, available: Collection[str], on_gpu: bool, override: str | None = None
) -> tuple[str, str]:
    """(runtime, reason) by rules, for a device of the given kind. Raises NoRuntimeAvailable."""
    if override:
        if override not in available:
            raise NoRuntimeAvailable(
                f"runtime {override!r} was asked for this model but is not available "
                f"(available: {', '.join(sorted(available))})"
            )
        return override, f"{override} asked for by config"
    if analysis.format in (ModelFormat.ONNX, ModelFormat.TRITON):
        if TRITON in available:
            return TRITON, f"{analysis.format} model: Triton serves it"
        raise NoRuntimeAvailable(f"an {analysis.format} model needs Triton; enable triton.enabled")
    if analysis.format == ModelFormat.GGUF:
        if VLLM in available and on_gpu:
            return VLLM, "GGUF decoder on a GPU: vLLM reads GGUF"
        raise NoRuntimeAvailable("a GGUF model needs vLLM on a GPU node; enable vllm.enabled")
    if analysis.task == Task.TEXT_GENERATION and on_gpu and VLLM in available:
        return VLLM, "decoder LLM on a GPU and vLLM is enabled"
    if analysis.modality in (Modality.VISION, Modality.AUDIO, Modality.MULTIMODAL) and RAY_SERVE in available:
        return RAY_SERVE, f"{analysis.modality} model: Ray Serve runs its pipeline"
    if analysis.task in EMBEDDED_TASKS and EMBEDDED in available:
        where = "a GPU" if on_gpu else "CPU"
        return EMBEDDED, f"{analysis.task} model served by the embedded transformers runtime on {where}"
    raise NoRuntimeAvailable(
        f"no enabled runtime serves a {analysis.modality} {analysis.task} model "
        f"(available: {', '.join(sorted(available)) or 'none'})"
    )


def decide_rules(
    analysis: ModelAnalysis,
    available_runtimes: Collection[str],
    node: str,
    device: str,
    runtime_override: str | None = None,
) -> Decision:
    """The runtime for a model on one given node and device (no choice of place)."""
    runtime, reason = choose_runtime(analysis, available_runtimes, device.startswith("cuda"), runtime_override)
    need = analysis.memory_estimates.get(runtime, analysis.memory_estimate_bytes)
    return Decision(runtime, node, device, reason, memory_bytes=need)


TENSOR_PARALLEL_SIZES = (2, 4, 8)


@dataclass(frozen=True)
class EvictionPolicy:
    """Which loaded models may be unloaded to make room: unpinned, resident at least
    `min_resident_seconds` and unused for at least `min_idle_seconds`, at time `now`."""

    now: float
    min_resident_seconds: float = 120.0
    min_idle_seconds: float = 30.0
    enabled: bool = True
    # `score`: retention score (lowest evicted first); `lru`: least recently used first.
    policy: str = "score"

    def rank(self, resident: Resident) -> tuple[float, str]:
        """The resident's eviction rank (lower goes first), and why in words."""
        if self.policy == "lru":
            idle = max(0.0, self.now - resident.last_used_at)
            return -idle, f"least recently used: idle {idle:.0f}s"
        return retention_score(resident, self.now)


def retention_score(resident: Resident, now: float) -> tuple[float, str]:
    """What keeping the model is worth: recent use x reload time / memory (lower is evicted
    first). Recency halves after a minute unused; a model never measured counts as 10 s to load."""
    idle = max(0.0, now - resident.last_used_at)
    recency = 1.0 / (1.0 + idle / 60.0)
    reload = resident.load_seconds if resident.load_seconds else 10.0
    gib = max(resident.bytes * len(resident.devices), 1) / 2**30
    score = recency * reload / gib
    return score, f"idle {idle:.0f}s, reloads in {reload:.1f}s, holds {_gib(int(gib * 2**30))}: score {score:.3g}"


@dataclass
class _Option:
    """A place the model could go: devices of one node, and what it needs on each."""

    node: NodeInventory
    devices: list[DeviceInventory]
    runtime: str
    reason: str
    need: int

    @property
    def on_gpu(self) -> bool:
        return self.devices[0].device.startswith("cuda")

    def free(self, dev: DeviceInventory) -> int:
        return dev.total_bytes - dev.booked_bytes

    def fits(self) -> bool:
        return all(self.need <= self.free(d) for d in self.devices)

    def where(self) -> str:
        return f"{self.node.node}/{'+'.join(d.device for d in self.devices)}"


def place(
    analysis: ModelAnalysis,
    enabled_runtimes: Collection[str],
    nodes: Sequence[NodeInventory],
    runtime_override: str | None = None,
    *,
    overrides: ModelOverrides | None = None,
    residents: Sequence[Resident] = (),
    policy: EvictionPolicy | None = None,
) -> Decision:
    """Runtime, node and devices by best fit: of every device with room for what the chosen
    runtime needs there, a GPU before the CPU, then the one left with the least free memory
    (large holes stay open for large models). A model larger than any one GPU of a node spans
    several where its runtime is tensor parallel. When nothing has room, the idle models whose
    unloading costs least (retention score) are named for eviction. Raises NoRuntimeAvailable,
    NoCapacity, or ModelTooLarge when no device could ever hold it."""
    overrides = overrides or ModelOverrides()
    runtime_override = runtime_override or overrides.runtime
    options, shortfalls, no_runtime = _options(analysis, enabled_runtimes, nodes, runtime_override, overrides)
    fitting = [o for o in options if o.fits()]
    if fitting:
        best = min(
            fitting, key=lambda o: (not o.on_gpu, min(o.free(d) for d in o.devices) - o.need, o.node.node, o.where())
        )
        left = min(best.free(d) for d in best.devices) - best.need
        return _decision(
            best, f"{best.reason}; {best.where()} fits it best ({_gib(best.need)} needed, {_gib(left)} left after)"
        )
    if options and policy is not None and policy.enabled:
        chosen = _cheapest_eviction(options, residents, policy)
        if chosen is not None:
            option, victims = chosen
            names = ", ".join(v.model for v in victims)
            decision = _decision(
                option, f"{option.reason}; {option.where()} after evicting {names} (least worth keeping)"
            )
            decision.evict = victims
            return decision
    if shortfalls and not options:
        need = analysis.memory_estimate_bytes
        raise ModelTooLarge(
            f"{analysis.name} needs about {_gib(need)}, more than any device of a live node holds even "
            "when empty: " + "; ".join(shortfalls)
        )
    if shortfalls:
        evictable = " and nothing there may be evicted now" if policy is not None and policy.enabled else ""
        need = analysis.memory_estimate_bytes
        raise NoCapacity(
            f"no device has room for {analysis.name} (about {_gib(need)}){evictable}: " + "; ".join(shortfalls)
        )
    if no_runtime is not None:
        raise no_runtime
    if overrides.node:
        raise NoCapacity(f"node {overrides.node} ({overrides.source or 'per-model settings'}) is not alive")
    raise NoCapacity("no node agent is alive to take the model")


def _options(
    analysis: ModelAnalysis,
    enabled_runtimes: Collection[str],
    nodes: Sequence[NodeInventory],
    runtime_override: str | None,
    overrides: ModelOverrides,
) -> tuple[list[_Option], list[str], NoRuntimeAvailable | None]:
    options: list[_Option] = []
    shortfalls: list[str] = []
    no_runtime: NoRuntimeAvailable | None = None
    for node in sorted(nodes, key=lambda n: n.node):
        if overrides.node and node.node != overrides.node:
            continue
        devices = node.devices
        if overrides.devices:
            unknown = [d for d in overrides.devices if d not in {x.device for x in node.devices}]
            # Devices named with their node must exist there; without a node, any node's do.
            if unknown and overrides.node:
                raise NoRuntimeAvailable(
                    f"devices {', '.join(unknown)} ({overrides.source or 'per-model settings'}) are not on node "
                    f"{node.node} (it has {', '.join(d.device for d in node.devices)})"
                )
            devices = [d for d in node.devices if d.device in overrides.devices]
        available = set(enabled_runtimes) & set(node.runtimes)
        gpus: dict[str, list[DeviceInventory]] = {}
        for dev in devices:
            on_gpu = dev.device.startswith("cuda")
            try:
                runtime, reason = choose_runtime(analysis, available, on_gpu, runtime_override)
            except NoRuntimeAvailable as exc:
                no_runtime = exc
                continue
            need = analysis.memory_estimates.get(runtime, analysis.memory_estimate_bytes)
            if need <= dev.total_bytes:
                options.append(_Option(node, [dev], runtime, reason, need))
            elif on_gpu and runtime in TENSOR_PARALLEL:
                gpus.setdefault(runtime, []).append(dev)
            if need > dev.total_bytes - dev.booked_bytes:
                free = dev.total_bytes - dev.booked_bytes
                shortfalls.append(f"{node.node}/{dev.device} has {_gib(free)} free of {_gib(dev.total_bytes)}")
        for runtime, group in gpus.items():
            option = _tensor_parallel(analysis, node, group, runtime)
            if option is not None:
                options.append(option)
    return options, shortfalls, no_runtime


def _tensor_parallel(
    analysis: ModelAnalysis, node: NodeInventory, gpus: list[DeviceInventory], runtime: str
) -> _Option | None:
    """The fewest GPUs of this node that together hold the model: those with the least free
    memory that still fit a shard (best fit), else the emptiest (for eviction to clear)."""
    need = analysis.memory_estimates.get(runtime, analysis.memory_estimate_bytes)
    for size in TENSOR_PARALLEL_SIZES:
        if size > len(gpus):
            break
        shard = memory.per_shard(need, runtime, size)
        if shard > min(sorted(g.total_bytes for g in gpus)[-size:]):
            continue
        free = lambda g: g.total_bytes - g.booked_bytes  # noqa: E731
        fitting = sorted((g for g in gpus if free(g) >= shard), key=lambda g: (free(g), g.device))
        chosen = fitting[:size] if len(fitting) >= size else sorted(gpus, key=lambda g: (-free(g), g.device))[:size]
        chosen.sort(key=lambda g: g.device)
        reason = (
            f"{analysis.name} needs {_gib(need)}, more than one GPU holds: {runtime} splits it "
            f"tensor-parallel over {size} GPUs ({_gib(shard)} each)"
        )
        return _Option(node, chosen, runtime, reason, shard)
    return None


def _cheapest_eviction(
    options: Sequence[_Option], residents: Sequence[Resident], policy: EvictionPolicy
) -> tuple[_Option, list[Eviction]] | None:
    """The option that frees enough room by evicting the models least worth keeping, and them."""
    best: tuple[tuple[bool, float, int, str], _Option, list[Eviction]] | None = None
    for option in options:
        if any(option.need > d.total_bytes for d in option.devices):
            continue
        devices = {d.device for d in option.devices}
        short = {d.device: option.need - option.free(d) for d in option.devices if option.need > option.free(d)}
        candidates = []
        for r in residents:
            if r.node != option.node.node or not devices & set(r.devices) or not _evictable(r, policy):
                continue
            score, why = policy.rank(r)
            candidates.append((score, r, why))
        victims: list[Eviction] = []
        # A parked model is two residents (its GPU share, its host memory): evicting it frees both.
        taken: set[str] = set()
        for score, r, why in sorted(candidates, key=lambda c: (c[0], c[1].model)):
            if r.model not in taken and not any(short.get(d, 0) > 0 for d in r.devices):
                continue
            for d in r.devices:
                if d in short:
                    short[d] -= r.bytes
            if r.model not in taken:
                taken.add(r.model)
                victims.append(Eviction(r.model, r.node, r.devices[0], r.bytes, score, why, r.pid))
        if any(v > 0 for v in short.values()):
            continue
        # Retention scores add up (the cost of everything evicted); LRU ranks are idle times, so
        # the option whose most recently used victim is the longest idle goes first.
        cost = max(v.score for v in victims) if policy.policy == "lru" and victims else sum(v.score for v in victims)
        key = (not option.on_gpu, cost, sum(v.bytes for v in victims), option.where())
        if best is None or key < best[0]:
            best = (key, option, victims)
    return (best[1], best[2]) if best is not None else None


def _evictable(resident: Resident, policy: EvictionPolicy) -> bool:
    return (
        not resident.pinned
        and policy.now - resident.loaded_at >= policy.min_resident_seconds
        and policy.now - resident.last_used_at >= policy.min_idle_seconds
    )


def _decision(option: _Option, reason: str) -> Decision:
    devices = [d.device for d in option.devices]
    return Decision(
        option.runtime,
        option.node.node,
        devices[0],
        reason,
        memory_bytes=option.need,
        devices=devices if len(devices) > 1 else [],
    )


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"
