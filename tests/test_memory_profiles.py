"""What a model really takes is measured after its load, kept, and booked the next time; GPU
inventory and memory come through the NVML seam (fed real-looking readings here: no GPU)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from temporalio.testing import WorkflowEnvironment

from activities.node import MEASURED_MARGIN
from modelium.gpu import GpuInfo, NvmlReader
from tests.conftest import has_gpu, make_settings, metric_value, running_modelium, serving_model, unique

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
        assert first["booked_bytes"] == estimate, "the first load books the estimate"
        print(f"\ntiny GPT-2, embedded on CPU: estimated {estimate / 2**20:.0f} MiB, measured "
              f"{measured / 2**20:.0f} MiB ({(estimate - measured) / measured:+.0%})")  # fmt: skip
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


@pytest.mark.gpu
def test_real_nvml_reads_this_machines_gpus() -> None:
    gpus = NvmlReader().gpus()
    assert gpus and all(g.total_bytes > 2**30 and g.uuid.startswith("GPU-") for g in gpus)
    assert all(0 <= g.used_bytes <= g.total_bytes for g in gpus)
