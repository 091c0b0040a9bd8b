"""The brain's rules and best-fit placement: pure functions, no server."""

from __future__ import annotations

import re
import typing

import pytest

from modelium import llm_brain, memory
from modelium.brain import EvictionPolicy, NoCapacity, NoRuntimeAvailable, choose_runtime, place, retention_score
from modelium.config import RuntimeName, Settings
from modelium.runtimes import RUNTIMES, TENSOR_PARALLEL, enabled_runtimes, load_timeouts
from modelium.types import (
    DeviceInventory,
    Modality,
    ModelAnalysis,
    ModelFormat,
    ModelOverrides,
    NodeInventory,
    Resident,
    Task,
)

GIB = 2**30


def analysis(
    task: str = Task.TEXT_GENERATION,
    modality: str = Modality.TEXT,
    fmt: str = ModelFormat.HUGGINGFACE,
    need: int = 2 * GIB,
) -> ModelAnalysis:
    estimates = {"embedded": need, "vllm": need + GIB, "triton": need, "ray_serve": need}
    return ModelAnalysis(
        "m", "/m", fmt, "Arch", "type", task, modality, memory_estimate_bytes=need, memory_estimates=estimates
    )


def node(name: str, *devices: tuple[str, int, int], runtimes: tuple[str, ...] = ("embedded",)) -> NodeInventory:
    return NodeInventory(
        name, [DeviceInventory(d, d, total, None, booked) for d, total, booked in devices], list(runtimes), 0.0
    )


@pytest.mark.parametrize(
    ("kind", "available", "on_gpu", "expected"),
    [
        ((Task.TEXT_GENERATION, Modality.TEXT, ModelFormat.HUGGINGFACE), {"embedded", "vllm"}, True, "vllm"),
        ((Task.TEXT_GENERATION, Modality.TEXT, ModelFormat.HUGGINGFACE), {"embedded", "vllm"}, False, "embedded"),
        ((Task.TEXT_GENERATION, Modality.TEXT, ModelFormat.HUGGINGFACE), {"embedded"}, True, "embedded"),
        ((Task.CUSTOM, Modality.UNKNOWN, ModelFormat.ONNX), {"embedded", "triton"}, True, "triton"),
        ((Task.CUSTOM, Modality.UNKNOWN, ModelFormat.TRITON), {"triton"}, False, "triton"),
        (
            (Task.IMAGE_CLASSIFICATION, Modality.VISION, ModelFormat.HUGGINGFACE),
            {"embedded", "ray_serve"},
            True,
            "ray_serve",
        ),
        (
            (Task.AUTOMATIC_SPEECH_RECOGNITION, Modality.AUDIO, ModelFormat.HUGGINGFACE),
            {"ray_serve"},
            False,
            "ray_serve",
        ),
        ((Task.TEXT_GENERATION, Modality.TEXT, ModelFormat.GGUF), {"vllm"}, True, "vllm"),
        ((Task.FEATURE_EXTRACTION, Modality.TEXT, ModelFormat.HUGGINGFACE), {"embedded", "vllm"}, True, "embedded"),
    ],
)
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
)
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


def resident(
    model: str,
    node_id: str = "a",
    device: str = "cpu",
    nbytes: int = 2 * GIB,
    *,
    pinned: bool = False,
    loaded_ago: float = 3600,
    used_ago: float = 600,
    load_seconds: float = 5.0,
) -> Resident:
    now = 10_000.0
    return Resident(model, node_id, [device], nbytes, pinned, now - loaded_ago, now - used_ago, load_seconds, pid=1)


POLICY = EvictionPolicy(now=10_000.0, min_resident_seconds=120, min_idle_seconds=30)


def test_nothing_fits_evicts_what_is_least_worth_keeping() -> None:
    full = [node("a", ("cpu", 6 * GIB, 6 * GIB))]
    residents = [
        resident("hot", used_ago=40),  # idle long enough, but used recently: worth more
        resident("cold-slow", used_ago=3000, load_seconds=60),  # long unused, but costly to reload
        resident("cold-quick", used_ago=3000, load_seconds=2),
    ]
    d = place(analysis(need=2 * GIB), ["embedded"], full, residents=residents, policy=POLICY)
    assert [v.model for v in d.evict] == ["cold-quick"]
    assert "after evicting cold-quick" in d.reason
    assert "idle 3000s, reloads in 2.0s" in d.evict[0].reason
    # Needing two models' room evicts the two cheapest, cheapest first.
    d = place(analysis(need=4 * GIB), ["embedded"], full, residents=residents, policy=POLICY)
    assert [v.model for v in d.evict] == ["cold-quick", "cold-slow"]
    scores = {r.model: retention_score(r, POLICY.now)[0] for r in residents}
    assert scores["cold-quick"] < scores["cold-slow"] < scores["hot"]


def test_pinned_fresh_and_busy_models_are_never_evicted() -> None:
    full = [node("a", ("cpu", 6 * GIB, 6 * GIB))]
    keep = [
        resident("pinned", pinned=True),
        resident("fresh", loaded_ago=60),  # resident less than min_resident_seconds
        resident("busy", used_ago=5),  # used less than min_idle_seconds ago
    ]
    with pytest.raises(NoCapacity, match="nothing there may be evicted now"):
        place(analysis(need=2 * GIB), ["embedded"], full, residents=keep, policy=POLICY)
    # Eviction turned off: the model waits instead.
    off = EvictionPolicy(now=POLICY.now, enabled=False)
    with pytest.raises(NoCapacity):
        place(analysis(need=2 * GIB), ["embedded"], full, residents=[resident("idle")], policy=off)
    # A model larger than the device is never made room for.
    with pytest.raises(NoCapacity):
        place(analysis(need=7 * GIB), ["embedded"], full, residents=[resident("idle")], policy=POLICY)


def test_eviction_prefers_a_gpu_and_the_cheapest_device() -> None:
    nodes = [node("a", ("cpu", 8 * GIB, 8 * GIB), ("cuda:0", 8 * GIB, 8 * GIB), ("cuda:1", 8 * GIB, 8 * GIB))]
    residents = [
        resident("on-cpu", device="cpu", used_ago=5000, load_seconds=1),
        resident("gpu0", device="cuda:0", used_ago=100, load_seconds=30),
        resident("gpu1", device="cuda:1", used_ago=2000, load_seconds=30),
    ]
    d = place(analysis(need=2 * GIB), ["embedded"], nodes, residents=residents, policy=POLICY)
    assert (d.device, [v.model for v in d.evict]) == ("cuda:1", ["gpu1"])
    # Room without evicting always wins over evicting.
    nodes[0].devices[0].booked_bytes = 0
    assert place(analysis(need=2 * GIB), ["embedded"], nodes, residents=residents, policy=POLICY).evict == []


def test_too_large_for_one_gpu_goes_tensor_parallel_where_the_runtime_can() -> None:
    gpus = node("g", *[(f"cuda:{i}", 24 * GIB, 0) for i in range(4)], runtimes=("embedded", "vllm"))
    big = analysis(need=40 * GIB)  # vLLM: 41 GiB, more than one 24 GiB GPU holds
    d = place(big, ["embedded", "vllm"], [gpus])
    assert d.runtime == "vllm" and d.all_devices == ["cuda:0", "cuda:1"]
    # Weights and cache split in two; each shard carries vLLM's whole overhead (1.5 GiB).
    assert d.memory_bytes == memory.per_shard(41 * GIB, "vllm", 2) == int(21.25 * GIB)
    assert "tensor-parallel over 2 GPUs" in d.reason
    # Two GPUs partly booked: a shard fits neither, so the pair with room is taken.
    gpus.devices[0].booked_bytes = gpus.devices[1].booked_bytes = 10 * GIB
    assert place(big, ["embedded", "vllm"], [gpus]).all_devices == ["cuda:2", "cuda:3"]
    # Four GPUs when two are not enough.
    huge = analysis(need=70 * GIB)
    gpus.devices[0].booked_bytes = gpus.devices[1].booked_bytes = 0
    assert place(huge, ["embedded", "vllm"], [gpus]).all_devices == [f"cuda:{i}" for i in range(4)]
    # The embedded runtime does not split models: no place for it.
    with pytest.raises(NoCapacity):
        place(big, ["embedded"], [node("g", *[(f"cuda:{i}", 24 * GIB, 0) for i in range(4)])])


def test_overrides_restrict_runtime_node_and_devices() -> None:
    nodes = [
        node(
            "a",
            ("cpu", 64 * GIB, 0),
            ("cuda:0", 24 * GIB, 0),
            ("cuda:1", 24 * GIB, 20 * GIB),
            runtimes=("embedded", "vllm"),
        ),
        node("b", ("cpu", 64 * GIB, 0), runtimes=("embedded", "vllm")),
    ]
    d = place(analysis(need=2 * GIB), ["embedded", "vllm"], nodes, overrides=ModelOverrides(runtime="embedded"))
    assert (d.runtime, d.node, d.device) == ("embedded", "a", "cuda:1")
    d = place(analysis(need=2 * GIB), ["embedded", "vllm"], nodes, overrides=ModelOverrides(devices=["cuda:0"]))
    assert (d.runtime, d.device) == ("vllm", "cuda:0")
    d = place(analysis(need=2 * GIB), ["embedded", "vllm"], nodes, overrides=ModelOverrides(node="b"))
    assert (d.node, d.device, d.runtime) == ("b", "cpu", "embedded")
    with pytest.raises(NoRuntimeAvailable, match=r"devices cuda:7 \(models.m\) are not on node a"):
        strict = ModelOverrides(node="a", devices=["cuda:7"], source="models.m")
        place(analysis(), ["embedded"], nodes, overrides=strict)
    with pytest.raises(NoCapacity, match="node c .* is not alive"):
        place(analysis(), ["embedded"], nodes, overrides=ModelOverrides(node="c"))


def test_llm_answers_are_validated_against_what_is_available() -> None:
    nodes = [
        node(
            "a",
            ("cpu", 8 * GIB, 0),
            ("cuda:0", 24 * GIB, 23 * GIB),
            ("cuda:1", 24 * GIB, 0),
            runtimes=("embedded", "vllm"),
        )
    ]
    ok = llm_brain.validate(
        llm_brain.parse(
            'Sure:\n```json\n{"runtime": "vllm", "node": "a", "devices": ["cuda:1"], "reason": "room on cuda:1"}\n```'
        ),
        analysis(),
        ["embedded", "vllm"],
        nodes,
    )
    assert (ok.runtime, ok.device, ok.source, ok.memory_bytes) == ("vllm", "cuda:1", "llm", 3 * GIB)
    assert ok.reason == "LLM brain: room on cuda:1"
    bad = {
        '{"runtime": "triton", "node": "a", "devices": ["cuda:1"]}': "runtime 'triton' is not enabled",
        '{"runtime": "vllm", "node": "z", "devices": ["cuda:1"]}': "node 'z' is not a live node",
        '{"runtime": "vllm", "node": "a", "devices": ["cuda:9"]}': "a has no device cuda:9",
        '{"runtime": "vllm", "node": "a", "devices": ["cuda:0"]}': "a/cuda:0 has 1024 MiB free",
        '{"runtime": "vllm", "node": "a", "devices": ["cpu"]}': "vllm cannot serve",
        '{"runtime": "embedded", "node": "a", "devices": ["cuda:0", "cuda:1"]}': "only vllm splits",
        '{"node": "a"}': "lacks runtime, node or devices",
        "I would put it on the GPU.": "holds no JSON object",
        '{"runtime": vllm}': "not valid JSON",
    }
    for answer, words in bad.items():
        with pytest.raises(llm_brain.LlmAnswerRejected, match=re.escape(words)):
            llm_brain.validate(llm_brain.parse(answer), analysis(), ["embedded", "vllm"], nodes)
    classifier = analysis(Task.TEXT_CLASSIFICATION)
    with pytest.raises(llm_brain.LlmAnswerRejected, match="vllm cannot serve"):
        llm_brain.validate(
            {"runtime": "vllm", "node": "a", "devices": ["cuda:1"]}, classifier, ["embedded", "vllm"], nodes
        )


def test_one_table_of_runtimes() -> None:
    """The runtime table (modelium.runtimes) is what the config, the memory model, the brain and
    the workers read: a runtime added there is known everywhere."""
    assert set(typing.get_args(RuntimeName)) == set(RUNTIMES)
    assert set(memory.PROFILES) == set(RUNTIMES)
    everything = Settings.model_validate(
        {"vllm": {"enabled": True}, "triton": {"enabled": True}, "ray_serve": {"enabled": True}}
    )
    assert enabled_runtimes(everything) == list(RUNTIMES) and enabled_runtimes(Settings()) == ["embedded"]
    assert load_timeouts(everything) == {"embedded": 600.0, "vllm": 900.0, "ray_serve": 600.0}
    assert TENSOR_PARALLEL == {"vllm"}
