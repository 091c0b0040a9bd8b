"""On a machine with an NVIDIA GPU: the real NVML reader, and the embedded runtime serving a model
on a booked GPU (the last one, so that a booking past cuda:0 is exercised) while NVML sees the
runtime process hold memory there. `bench/gpu_check.py` measures sizes and bandwidth."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from modelium.gpu import NvmlReader, gpu_memory_held, process_tree
from modelium.runtimes.embedded import EmbeddedRuntimeAdapter
from modelium.types import Booking, LoadRequest, Task
from tests.helpers import unique

pytestmark = pytest.mark.gpu


def test_real_nvml_reads_this_machines_gpus() -> None:
    gpus = NvmlReader().gpus()
    assert gpus and all(g.total_bytes > 2**30 and g.uuid.startswith("GPU-") for g in gpus)
    assert all(0 <= g.used_bytes <= g.total_bytes for g in gpus)


async def test_embedded_runtime_serves_on_the_booked_gpu(demo_models: dict[str, Path], tmp_path: Path) -> None:
    reader = NvmlReader()
    last = reader.gpus()[-1]
    name, node = unique("cuda"), unique("node")
    adapter = EmbeddedRuntimeAdapter(node, tmp_path / "logs")
    booking = Booking(name, node, last.device, 2**30)
    request = LoadRequest(name, str(demo_models["text-generation"]), "embedded", Task.TEXT_GENERATION, booking)
    try:
        endpoint = await adapter.start(request, lambda line: None)
        async with httpx.AsyncClient(base_url=endpoint.url, timeout=60) as http:
            answer = await http.post("/v1/completions", json={"model": name, "prompt": "Hello", "max_tokens": 4})
        assert answer.status_code == 200, answer.text
        assert endpoint.pid is not None
        held = gpu_memory_held(reader, process_tree(endpoint.pid))
        assert set(held) == {last.index}, f"the runtime holds memory on {held}, booked {last.device}"
    finally:
        await adapter.stop_all()
