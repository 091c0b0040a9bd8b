"""The brain's rules and best-fit placement: pure functions, no server."""

from __future__ import annotations

import pytest

from modelium.brain import NoCapacity, NoRuntimeAvailable, choose_runtime, place
from modelium.types import DeviceInventory, Modality, ModelAnalysis, ModelFormat, NodeInventory, Task

GIB = 2**30


def analysis(task: str = Task.TEXT_GENERATION, modality: str = Modality.TEXT, fmt: str = ModelFormat.HUGGINGFACE,
             need: int = 2 * GIB) -> ModelAnalysis:  # fmt: skip
    estimates = {"embedded": need, "vllm": need + GIB, "triton": need, "ray_serve": need}
    return ModelAnalysis("m", "/m", fmt, "Arch", "type", task, modality, memory_estimate_bytes=need,
                         memory_estimates=estimates)  # fmt: skip


def node(name: str, *devices: tuple[str, int, int], runtimes: tuple[str, ...] = ("embedded",)) -> NodeInventory:
    return NodeInventory(name, [DeviceInventory(d, d, total, None, booked) for d, total, booked in devices],
                         list(runtimes), 0.0)  # fmt: skip


@pytest.mark.parametrize(
    ("kind", "available", "on_gpu", "expected"),
    [
        ((Task.TEXT_GENERATION, Modality.TEXT, ModelFormat.HUGGINGFACE), {"embedded", "vllm"}, True, "vllm"),
        ((Task.TEXT_GENERATION, Modality.TEXT, ModelFormat.HUGGINGFACE), {"embedded", "vllm"}, False, "embedded"),
        ((Task.TEXT_GENERATION, Modality.TEXT, ModelFormat.HUGGINGFACE), {"embedded"}, True, "embedded"),
        ((Task.CUSTOM, Modality.UNKNOWN, ModelFormat.ONNX), {"embedded", "triton"}, True, "triton"),
        ((Task.CUSTOM, Modality.UNKNOWN, ModelFormat.TRITON), {"triton"}, False, "triton"),
        ((Task.IMAGE_CLASSIFICATION, Modality.VISION, ModelFormat.HUGGINGFACE), {"embedded", "ray_serve"}, True,
         "ray_serve"),
        ((Task.AUTOMATIC_SPEECH_RECOGNITION, Modality.AUDIO, ModelFormat.HUGGINGFACE), {"ray_serve"}, False,
         "ray_serve"),
        ((Task.TEXT_GENERATION, Modality.TEXT, ModelFormat.GGUF), {"vllm"}, True, "vllm"),
        ((Task.FEATURE_EXTRACTION, Modality.TEXT, ModelFormat.HUGGINGFACE), {"embedded", "vllm"}, True, "embedded"),
    ],
)  # fmt: skip
def test_each_rule(kind: tuple[str, str, str], available: set[str], on_gpu: bool, expected: str) -> None:
    runtime, reason = choose_runtime(analysis(*kind), available, on_gpu)
    assert runtime == expected and reason


@pytest.mark.parametrize(
    ("kind", "available", "words"),
    [
        ((Task.CUSTOM, Modality.UNKNOWN, ModelFormat.ONNX), {"embedded"}, "needs Triton"),
        ((Task.IMAGE_CLASSIFICATION, Modality.VISION, ModelFormat.HUGGINGFACE), {"embedded"}, "vision"),
        ((Task.TEXT_GENERATION, Modality.TEXT, ModelFormat.GGUF), {"embedded"}, "GGUF model needs vLLM"),
    ],
)  # fmt: skip
def test_no_runtime_says_what_to_enable(kind: tuple[str, str, str], available: set[str], words: str) -> None:
    with pytest.raises(NoRuntimeAvailable, match=words):
        choose_runtime(analysis(*kind), available, on_gpu=False)


def test_override_must_be_available() -> None:
    assert choose_runtime(analysis(), {"embedded", "vllm"}, True, override="embedded")[0] == "embedded"
    with pytest.raises(NoRuntimeAvailable, match="'triton' was asked for"):
        choose_runtime(analysis(), {"embedded"}, True, override="triton")


def test_best_fit_prefers_gpu_then_the_tightest_hole() -> None:
    nodes = [
        node("big", ("cpu", 64 * GIB, 0), ("cuda:0", 80 * GIB, 10 * GIB)),
        node("small", ("cpu", 16 * GIB, 0), ("cuda:0", 24 * GIB, 20 * GIB), ("cuda:1", 24 * GIB, 0)),
    ]
    d = place(analysis(need=3 * GIB), ["embedded"], nodes)
    # small/cuda:0 has 4 GiB free: 3 fit with 1 left, the tightest hole on a GPU.
    assert (d.node, d.device, d.runtime, d.memory_bytes) == ("small", "cuda:0", "embedded", 3 * GIB)
    assert "small/cuda:0 fits it best" in d.reason
    d = place(analysis(need=30 * GIB), ["embedded"], nodes)
    assert (d.node, d.device) == ("big", "cuda:0")
    # The chosen runtime's estimate is what must fit: vLLM's (3 + 1 GiB here) on a GPU.
    gpu_node = node("g", ("cuda:0", 24 * GIB, 20 * GIB), runtimes=("embedded", "vllm"))
    d = place(analysis(need=3 * GIB), ["embedded", "vllm"], [gpu_node])
    assert (d.runtime, d.memory_bytes) == ("vllm", 4 * GIB)
    with pytest.raises(NoCapacity, match="g/cuda:0 has 4.00 GiB free"):
        place(analysis(need=3 * GIB + 1), ["embedded", "vllm"], [gpu_node])


def test_cpu_only_nodes_and_no_room() -> None:
    nodes = [node("a", ("cpu", 4 * GIB, 3 * GIB)), node("b", ("cpu", 8 * GIB, 1 * GIB))]
    d = place(analysis(need=2 * GIB), ["embedded"], nodes)
    assert (d.node, d.device) == ("b", "cpu")
    with pytest.raises(NoCapacity, match=r"a/cpu has 1.00 GiB free of 4.00 GiB; b/cpu has 7.00 GiB free"):
        place(analysis(need=9 * GIB), ["embedded"], nodes)
    with pytest.raises(NoCapacity, match="no node agent is alive"):
        place(analysis(), ["embedded"], [])
    # A node without the runtime the model needs is not a place for it.
    with pytest.raises(NoRuntimeAvailable):
        place(analysis(Task.CUSTOM, Modality.UNKNOWN, ModelFormat.ONNX), ["embedded"], nodes)
