"""The node's ledger under concurrency, across restarts and for tensor-parallel bookings; and the
node's check that evicted models' memory came back (through the NVML seam)."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.node import NodeActivities
from modelium.gpu import GpuInfo
from modelium.ledger import InsufficientCapacity, Ledger
from modelium.metrics import Metrics
from workflows.steps import ConfirmFreedRequest

GIB = 2**30


def test_concurrent_bookings_never_pass_capacity(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "bookings.json", "n", {"cuda:0": 10 * GIB})
    granted: list[str] = []
    # The most each thread saw booked after each of its attempts, and anything it raised besides
    # a refusal: an assert inside a thread would only be a warning, so the test asserts here.
    seen: list[int] = []
    errors: list[BaseException] = []
    start = threading.Barrier(16)

    def book(i: int) -> None:
        start.wait()
        try:
            for j in range(20):
                try:
                    ledger.reserve(f"m{i}-{j}", "cuda:0", GIB)
                    granted.append(f"m{i}-{j}")
                except InsufficientCapacity:
                    pass
                seen.append(ledger.booked("cuda:0"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=book, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(seen) == 16 * 20 and max(seen) <= 10 * GIB
    assert len(granted) == 10 and ledger.booked("cuda:0") == 10 * GIB
    # What was granted is what a restarted node agent reads back.
    again = Ledger(tmp_path / "bookings.json", "n", {"cuda:0": 10 * GIB})
    assert sorted(b.model for b in again.bookings()) == sorted(granted)


def test_every_change_is_journaled_with_the_totals_after_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ledger = Ledger(tmp_path / "bookings.json", "n", {"cuda:0": 10 * GIB, "cpu": 4 * GIB})
    ledger.reserve("a", "cuda:0", 4 * GIB)
    ledger.reserve("a", "cuda:0", 4 * GIB)  # a retried activity: nothing changes, nothing recorded
    ledger.reserve("b", "cuda:0", 5 * GIB)
    with pytest.raises(InsufficientCapacity):
        ledger.reserve("c", "cuda:0", 2 * GIB)  # refused: not a change
    ledger.resize("b", 6 * GIB)
    ledger.release("a")
    entries = ledger.journal()
    assert [(e["op"], e["model"], e["bytes"]) for e in entries] == [
        ("reserve", "a", 4 * GIB),
        ("reserve", "b", 5 * GIB),
        ("resize", "b", 6 * GIB),
        ("release", "a", 4 * GIB),
    ]
    assert [e["booked"]["cuda:0"] for e in entries] == [4 * GIB, 9 * GIB, 10 * GIB, 6 * GIB]
    assert all(e["booked"]["cpu"] == 0 and e["capacity"]["cuda:0"] == 10 * GIB for e in entries)
    assert entries == sorted(entries, key=lambda e: e["at"])
    # A restarted node agent appends to the same journal; a full one is rotated, not lost.
    again = Ledger(tmp_path / "bookings.json", "n", {"cuda:0": 10 * GIB, "cpu": 4 * GIB})
    monkeypatch.setattr("modelium.ledger.JOURNAL_MAX_BYTES", 0)
    again.release("b")
    assert [e["op"] for e in again.journal()] == ["release"]
    rotated = again.journal_path.with_name(again.journal_path.name + ".1").read_text().splitlines()
    assert len(rotated) == 4


def test_retried_reserve_returns_the_same_booking_and_tensor_parallel_is_all_or_nothing(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "bookings.json", "n", {"cuda:0": 10 * GIB, "cuda:1": 10 * GIB})
    first = ledger.reserve("a", "cuda:0", 4 * GIB)
    assert ledger.reserve("a", "cuda:0", 4 * GIB) == first and ledger.booked("cuda:0") == 4 * GIB
    split = ledger.reserve("big", "cuda:0", 6 * GIB, ["cuda:0", "cuda:1"])
    assert split.all_devices == ["cuda:0", "cuda:1"]
    assert (ledger.booked("cuda:0"), ledger.booked("cuda:1")) == (10 * GIB, 6 * GIB)
    # cuda:1 has room, cuda:0 has none: nothing is booked on either.
    with pytest.raises(InsufficientCapacity, match="n/cuda:0"):
        ledger.reserve("other", "cuda:0", 1 * GIB, ["cuda:0", "cuda:1"])
    assert ledger.booked("cuda:1") == 6 * GIB
    ledger.release("big")
    assert (ledger.booked("cuda:0"), ledger.booked("cuda:1")) == (4 * GIB, 0)


class ReleasingGpu:
    """The NVML seam as a GPU whose memory for the evicted processes drains after a few reads."""

    def __init__(self, reads_until_free: int) -> None:
        self.left = reads_until_free

    def gpus(self) -> list[GpuInfo]:
        return [GpuInfo(0, "GPU-0", "NVIDIA H100 80GB HBM3", 80 * GIB, 30 * GIB)]

    def process_memory(self, pids: set[int]) -> dict[int, int]:
        self.left -= 1
        return {0: 20 * GIB} if self.left > 0 else {}


def _exited_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


async def test_memory_freed_is_confirmed_through_nvml(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "bookings.json", "n", {"cuda:0": 80 * GIB})
    gpu = ReleasingGpu(reads_until_free=3)
    acts = NodeActivities("n", ledger, {}, Metrics(), gpu)
    pid = _exited_pid()
    await ActivityEnvironment().run(acts.confirm_memory_freed, ConfirmFreedRequest("cuda:0", [pid]))
    assert gpu.left == 0, "it returned only once NVML stopped counting the evicted process"

    stuck = NodeActivities("n", ledger, {}, Metrics(), ReleasingGpu(reads_until_free=10**6))
    with pytest.raises(ApplicationError, match=r"did not come back within 0.5s.*still holding GPU memory"):
        await ActivityEnvironment().run(stuck.confirm_memory_freed, ConfirmFreedRequest("cuda:0", [pid], 0.5))
    # A process that is still running is waited for too.
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        with pytest.raises(ApplicationError, match=rf"still running \[{sleeper.pid}\]"):
            await ActivityEnvironment().run(acts.confirm_memory_freed, ConfirmFreedRequest("cpu", [sleeper.pid], 0.5))
    finally:
        sleeper.kill()
        sleeper.wait()
