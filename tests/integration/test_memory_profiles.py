"""What a model really takes is measured after its load, kept, and booked the next time; GPU
inventory and memory come through the NVML seam (fed real-looking readings here: no GPU)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from temporalio.testing import ActivityEnvironment, WorkflowEnvironment

from activities.node import MEASURED_MARGIN, NodeActivities
from modelium.gpu import GpuInfo, MemoryProfiles, NvmlReader
from modelium.ledger import Ledger
from modelium.metrics import Metrics
from modelium.runtimes.embedded import EmbeddedRuntimeAdapter
from modelium.types import LoadRequest
from tests.helpers import has_gpu, make_settings, metric_value, running_modelium, serving_model, unique

pytestmark = pytest.mark.slow

H100 = 85_520_809_984  # what NVML reports as total for an 80 GB H100


class RecordedNvml:
    """The NVML seam, answering as two H100s with some memory in use would."""

    def gpus(self) -> list[GpuInfo]:
        return [
            GpuInfo(0, "GPU-6a1f0c2e-2b7d-4c39-9d34-1c3e5f7a9b01", "NVIDIA H100 80GB HBM3", H100, 1_203_765_248),
            GpuInfo(1, "GPU-0b9e8d7c-6a5f-4e3d-8c2b-1a0f9e8d7c6b", "NVIDIA H100 80GB HBM3", H100, 584_056_832),
        ]

    def process_memory(self, pids: set[int]) -> dict[int, int]:
        return {}


async def test_measured_memory_is_kept_and_booked_next_time(
    temporal_env: WorkflowEnvironment, demo_models: dict[str, Path], tmp_path: Path
) -> None:
    name = unique("measured")
    settings = make_settings(tmp_path)
    async with serving_model(settings, temporal_env.client, demo_models["text-generation"], name) as (running, http):
        first = (await http.get(f"/models/{name}")).json()
        estimate, measured = first["memory_estimate_bytes"], first["measured_memory_bytes"]
        assert measured and measured > 50 * 2**20, "a Python process with torch holds far more than 50 MiB"
        # The first load books the estimate; past it, what the model holds after its warm-up.
        assert first["booked_bytes"] == max(estimate, first["peak_memory_bytes"])
        print(
            f"\ntiny GPT-2, embedded on CPU: estimated {estimate / 2**20:.0f} MiB, measured "
            f"{measured / 2**20:.0f} MiB ({(estimate - measured) / measured:+.0%})"
        )
        metrics = (await http.get(f"http://127.0.0.1:{running.metrics_port}/metrics")).text
        assert metric_value(metrics, "modelium_model_memory_bytes", model=name, kind="estimated") == estimate
        assert metric_value(metrics, "modelium_model_memory_bytes", model=name, kind="measured") == measured
        profiles = settings.state_dir / "nodes" / settings.node.id / "memory-profiles.json"
        assert f"{name}@embedded" in profiles.read_text()

        assert (await http.post(f"/models/{name}/unload")).json()["phase"] == "unloaded"
        again = (await http.post(f"/models/{name}/load")).json()
        assert again["booked_bytes"] == int(measured * MEASURED_MARGIN), "the reload books what it took"


async def test_gpu_inventory_through_the_nvml_seam(temporal_env: WorkflowEnvironment, tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    async with running_modelium(settings, temporal_env.client, gpu=RecordedNvml(), watch=False) as running:
        assert running.node is not None
        capacities = running.node.ledger.capacities
        assert capacities["cuda:0"] == H100 and capacities["cuda:1"] == H100 and "cpu" in capacities
        async with httpx.AsyncClient() as http:
            metrics = (await http.get(f"http://127.0.0.1:{running.metrics_port}/metrics")).text
        node = settings.node.id
        assert metric_value(metrics, "modelium_gpu_memory_bytes", node=node, gpu="cuda:0", kind="total") == H100
        assert metric_value(metrics, "modelium_gpu_memory_bytes", node=node, gpu="cuda:1", kind="used") == 584_056_832
        assert metric_value(metrics, "modelium_gpu_memory_bytes", node=node, gpu="cuda:0", kind="booked") == 0


@pytest.mark.skipif(has_gpu(), reason="this machine has a GPU")
def test_real_nvml_without_a_driver_reports_no_gpus() -> None:
    # No NVIDIA driver here: the real reader must say "no GPUs", not fail.
    assert NvmlReader().gpus() == []


async def test_peak_after_warm_up_is_booked_even_past_a_booking_that_was_too_small(
    demo_models: dict[str, Path], tmp_path: Path
) -> None:
    """The node measures after one real request and keeps tracking the peak; a booking smaller
    than what the model holds grows to it, and a device booked past capacity is reported."""
    name, node = unique("peak"), unique("node")
    capacity = 64 * 2**20  # far less than a Python process with torch holds
    ledger = Ledger(tmp_path / "bookings.json", node, {"cpu": capacity})
    adapter = EmbeddedRuntimeAdapter(node, tmp_path / "logs")
    metrics = Metrics()
    profiles = MemoryProfiles(tmp_path / "profiles.json")
    acts = NodeActivities(node, ledger, {"embedded": adapter}, metrics, profiles=profiles)
    booking = ledger.reserve(name, "cpu", 2**20)
    request = LoadRequest(name, str(demo_models["text-generation"]), "embedded", "text-generation", booking)
    try:
        result = await ActivityEnvironment().run(acts.load_model, request)
        measured = result.measured_bytes
        assert measured is not None and measured > capacity
        # The booking follows what the model really holds, past the device's capacity: reported.
        assert result.booked_bytes == measured == ledger.get(name).bytes  # type: ignore[union-attr]
        assert ledger.booked("cpu") > capacity
        peak = metrics.registry.get_sample_value("modelium_model_memory_bytes", {"model": name, "kind": "peak"})
        assert peak == measured
        assert profiles.get(name, "embedded").measured_bytes == measured  # type: ignore[union-attr]

        # Longer requests than the one-token warm-up; whatever they add is the new peak.
        async with httpx.AsyncClient(base_url=result.endpoint.url, timeout=60) as http:
            for _ in range(3):
                body = {"model": name, "prompt": "Hello there " * 4, "max_tokens": 8}
                assert (await http.post("/v1/completions", json=body)).status_code == 200
        peaks = acts.track_peaks()
        highest = max([measured] + [p.bytes for p in peaks])
        assert all(p.bytes > measured and p.over_capacity == ["cpu"] for p in peaks)
        assert (
            metrics.registry.get_sample_value("modelium_model_memory_bytes", {"model": name, "kind": "peak"}) == highest
        )
        assert ledger.get(name).bytes == highest  # type: ignore[union-attr]
        assert profiles.get(name, "embedded").measured_bytes == highest  # type: ignore[union-attr]
        print(
            f"\ntiny GPT-2 on CPU: {measured / 2**20:.0f} MiB after the warm-up request, peak "
            f"{highest / 2**20:.0f} MiB after 3 longer requests"
        )
    finally:
        await adapter.stop_all()
