"""What a node has and what a model really took: GPUs through NVML, resident memory on CPU.

NVML is reached through one narrow seam, `GpuReader`: `NvmlReader` is the real one
(nvidia-ml-py); tests on machines without a GPU hand the node agent a reader that returns
real-looking readings, and everything above the seam runs unchanged.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuInfo:
    index: int
    uuid: str
    name: str
    total_bytes: int
    used_bytes: int

    @property
    def device(self) -> str:
        return f"cuda:{self.index}"


class GpuReader(Protocol):
    def gpus(self) -> list[GpuInfo]:
        """Every GPU of this machine, with its memory now."""
        ...

    def process_memory(self, pids: set[int]) -> dict[int, int]:
        """GPU index -> bytes used by these processes."""
        ...


class NvmlReader:
    """The real NVML, through nvidia-ml-py. Without a driver it reports no GPUs."""

    def __init__(self) -> None:
        self._ok = False
        self._lock = threading.Lock()
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._ok = True
        except Exception as exc:  # no driver / no library: a CPU-only node, which is fine
            log.info("NVML not available (%s): no GPUs on this node", exc)

    def gpus(self) -> list[GpuInfo]:
        if not self._ok:
            return []
        nv = self._nvml
        out = []
        with self._lock:
            for index in range(nv.nvmlDeviceGetCount()):
                handle = nv.nvmlDeviceGetHandleByIndex(index)
                mem = nv.nvmlDeviceGetMemoryInfo(handle)
                name = nv.nvmlDeviceGetName(handle)
                uuid = nv.nvmlDeviceGetUUID(handle)
                out.append(GpuInfo(index, _text(uuid), _text(name), int(mem.total), int(mem.used)))
        return out

    def process_memory(self, pids: set[int]) -> dict[int, int]:
        if not self._ok:
            return {}
        nv = self._nvml
        used: dict[int, int] = {}
        with self._lock:
            for index in range(nv.nvmlDeviceGetCount()):
                handle = nv.nvmlDeviceGetHandleByIndex(index)
                for proc in nv.nvmlDeviceGetComputeRunningProcesses(handle):
                    if proc.pid in pids and proc.usedGpuMemory:
                        used[index] = used.get(index, 0) + int(proc.usedGpuMemory)
        return used


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def process_tree(pid: int) -> set[int]:
    """`pid` and every process in its process group (runtimes start their own group)."""
    pids = {pid}
    try:
        pgid = os.getpgid(pid)
    except OSError:
        return pids
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == pgid:
                    pids.add(int(entry.name))
            except OSError:
                continue
    return pids


def gpu_memory_held(reader: GpuReader, pids: set[int]) -> dict[int, int]:
    """GPU index -> bytes these processes still hold, leaving out GPUs where they hold none."""
    return {gpu: n for gpu, n in reader.process_memory(pids).items() if n > 0}


def resident_bytes(pids: set[int]) -> int:
    """Resident memory (RSS) of these processes, from /proc."""
    page = os.sysconf("SC_PAGE_SIZE")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/statm").read_text().split()
        except OSError:
            continue
        total += int(fields[1]) * page
    return total


@dataclass
class MemoryProfile:
    """What a model really took on a runtime, measured after a load."""

    model: str
    runtime: str
    device: str
    measured_bytes: int
    estimated_bytes: int
    measured_at: float


class MemoryProfiles:
    """Measured profiles, kept in a JSON file under the node's state directory so the next load
    of the same model and runtime books what it really takes."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._profiles: dict[str, MemoryProfile] = {}
        if path.is_file():
            try:
                raw = json.loads(path.read_text(encoding="utf-8"))
                self._profiles = {k: MemoryProfile(**v) for k, v in raw.items()}
            except (ValueError, TypeError) as exc:
                log.warning("memory profiles in %s unreadable (%s); starting afresh", path, exc)

    @staticmethod
    def _key(model: str, runtime: str) -> str:
        return f"{model}@{runtime}"

    def get(self, model: str, runtime: str) -> MemoryProfile | None:
        with self._lock:
            return self._profiles.get(self._key(model, runtime))

    def put(self, profile: MemoryProfile) -> None:
        with self._lock:
            self._profiles[self._key(profile.model, profile.runtime)] = profile
            self._path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self._path.with_suffix(".tmp")
            tmp.write_text(json.dumps({k: asdict(v) for k, v in self._profiles.items()}, indent=2))
            os.replace(tmp, self._path)
