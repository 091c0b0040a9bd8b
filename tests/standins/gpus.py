"""NVML seams (the one fake this machine needs: it has no GPU) shared by tests and the recorder."""

from __future__ import annotations

from pathlib import Path

from modelium.gpu import GpuInfo
from modelium.runtimes.process import pid_alive

GIB = 2**30
H100 = 80 * GIB


class GpusFreedWhileAsleep:
    """The NVML seam for one H100 on which a vLLM process holds 6 GiB, and 512 MiB while it
    sleeps (the stand-in marks that with a file beside its record, as real vLLM frees its
    weights and KV cache from the GPU)."""

    def __init__(self, record: Path) -> None:
        self.record = record

    def gpus(self) -> list[GpuInfo]:
        return [GpuInfo(0, "GPU-0", "NVIDIA H100 80GB HBM3", H100, 0)]

    def process_memory(self, pids: set[int]) -> dict[int, int]:
        alive = [p for p in pids if pid_alive(p)]
        if not alive:
            return {}
        asleep = any(Path(f"{self.record}.{p}.asleep").exists() for p in alive)
        return {0: 512 * 2**20 if asleep else 6 * GIB}
