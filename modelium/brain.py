"""The brain: a pure function from facts about a model and a node to a placement decision."""

from __future__ import annotations

from collections.abc import Collection

from modelium.types import Decision, ModelAnalysis, Task

EMBEDDED = "embedded"


class NoRuntimeAvailable(ValueError):
    """No enabled runtime can serve this model."""


def decide_rules(
    analysis: ModelAnalysis,
    available_runtimes: Collection[str],
    node: str,
    device: str,
    runtime_override: str | None = None,
) -> Decision:
    """Pick a runtime by rules. Every branch states its reason in words."""
    if runtime_override:
        if runtime_override not in available_runtimes:
            raise NoRuntimeAvailable(
                f"runtime {runtime_override!r} was asked for this model but is not available "
                f"(available: {', '.join(sorted(available_runtimes))})"
            )
        return Decision(runtime_override, node, device, f"{runtime_override} asked for by config")
    on_gpu = device.startswith("cuda")
    if analysis.task == Task.TEXT_GENERATION and on_gpu and "vllm" in available_runtimes:
        return Decision("vllm", node, device, "decoder LLM on a GPU and vLLM is enabled")
    if EMBEDDED in available_runtimes:
        return Decision(
            EMBEDDED,
            node,
            device,
            f"{analysis.task} model served by the embedded transformers runtime on {device}"
            + ("" if on_gpu else " (no GPU on this node)"),
        )
    raise NoRuntimeAvailable(f"no enabled runtime serves {analysis.task} (available: {', '.join(available_runtimes)})")
