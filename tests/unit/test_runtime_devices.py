"""Which device a runtime process is told to use, and which GPUs it is let see."""

from __future__ import annotations

from pathlib import Path

from modelium.config import EmbeddedRuntime
from modelium.runtimes.embedded import EmbeddedRuntimeAdapter
from modelium.types import Booking, LoadRequest, Task


def _request(device: str) -> LoadRequest:
    return LoadRequest("m", "/models/m", "embedded", Task.TEXT_GENERATION, Booking("m", "n", device, 2**30))


def _device(argv: list[str]) -> str:
    return argv[argv.index("--device") + 1]


def test_a_booked_gpu_is_the_only_one_the_embedded_runtime_sees(tmp_path: Path) -> None:
    adapter = EmbeddedRuntimeAdapter("n", tmp_path)
    request = _request("cuda:3")
    # CUDA_VISIBLE_DEVICES=3 leaves the process one GPU, which it calls cuda:0.
    assert adapter.env(request) == {"CUDA_VISIBLE_DEVICES": "3"}
    assert _device(adapter.argv(request, 9000)) == "cuda:0"
    cpu = _request("cpu")
    assert adapter.env(cpu) == {} and _device(adapter.argv(cpu, 9000)) == "cpu"


def test_a_configured_device_is_used_as_given(tmp_path: Path) -> None:
    adapter = EmbeddedRuntimeAdapter("n", tmp_path, EmbeddedRuntime(device="cuda:1"))
    request = _request("cuda:1")
    assert adapter.env(request) == {}
    assert _device(adapter.argv(request, 9000)) == "cuda:1"
