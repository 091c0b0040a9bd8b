"""The brain: pure functions from facts (a model's analysis, the runtimes, the nodes' inventories)
to a decision with its reason in words. No I/O, so every rule is unit-tested without a server."""

from __future__ import annotations

from collections.abc import Collection, Sequence

from modelium.types import Decision, DeviceInventory, Modality, ModelAnalysis, ModelFormat, NodeInventory, Task

EMBEDDED = "embedded"
VLLM = "vllm"
TRITON = "triton"
RAY_SERVE = "ray_serve"
# What the embedded runtime serves (modelium.runtimes.embedded_server).
EMBEDDED_TASKS = frozenset({Task.TEXT_GENERATION, Task.TEXT_CLASSIFICATION, Task.FEATURE_EXTRACTION})


class NoRuntimeAvailable(ValueError):
    """No enabled runtime can serve this model."""


class NoCapacity(RuntimeError):
    """Runtimes could serve the model, but no node has room for it now."""


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


def place(
    analysis: ModelAnalysis,
    enabled_runtimes: Collection[str],
    nodes: Sequence[NodeInventory],
    runtime_override: str | None = None,
) -> Decision:
    """Runtime, node and device by best fit: of every device with room for what the chosen
    runtime needs there, a GPU before the CPU, then the one left with the least free memory
    (large holes stay open for large models). Raises NoRuntimeAvailable or NoCapacity."""
    fits: list[tuple[int, int, str, DeviceInventory, str, str, int]] = []
    shortfalls: list[str] = []
    no_runtime: NoRuntimeAvailable | None = None
    for node in sorted(nodes, key=lambda n: n.node):
        available = set(enabled_runtimes) & set(node.runtimes)
        for dev in node.devices:
            on_gpu = dev.device.startswith("cuda")
            try:
                runtime, reason = choose_runtime(analysis, available, on_gpu, runtime_override)
            except NoRuntimeAvailable as exc:
                no_runtime = exc
                continue
            need = analysis.memory_estimates.get(runtime, analysis.memory_estimate_bytes)
            free = dev.total_bytes - dev.booked_bytes
            if need <= free:
                fits.append((0 if on_gpu else 1, free - need, node.node, dev, runtime, reason, need))
            else:
                shortfalls.append(f"{node.node}/{dev.device} has {_gib(free)} free of {_gib(dev.total_bytes)}")
    if fits:
        _, left, node_id, dev, runtime, reason, need = min(fits, key=lambda f: (f[0], f[1], f[2], f[3].device))
        where = f"{node_id}/{dev.device}"
        return Decision(
            runtime, node_id, dev.device,
            f"{reason}; {where} fits it best ({_gib(need)} needed, {_gib(left)} left after)",
            memory_bytes=need,
        )  # fmt: skip
    if shortfalls:
        need = analysis.memory_estimate_bytes
        raise NoCapacity(f"no device has room for {analysis.name} (about {_gib(need)}): " + "; ".join(shortfalls))
    if no_runtime is not None:
        raise no_runtime
    raise NoCapacity("no node agent is alive to take the model")


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"
