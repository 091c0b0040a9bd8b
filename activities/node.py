"""Activities of a node agent's own task queue: book memory, start and stop runtimes."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities import expected_failure
from modelium.gpu import GpuReader, MemoryProfile, MemoryProfiles, gpu_memory_held, process_tree, resident_bytes
from modelium.ledger import InsufficientCapacity, Ledger
from modelium.metrics import Metrics
from modelium.names import model_of, parked_key
from modelium.runtimes.base import Parking, RuntimeAdapter, RuntimeStartError, RuntimeUnhealthy, Switching
from modelium.runtimes.managed import post_expecting
from modelium.runtimes.process import pid_alive
from modelium.types import Booking, Endpoint, LoadRequest
from workflows.contracts import ActivityName, ErrorType, MemoryPeak
from workflows.steps import (
    ConfirmFreedRequest,
    DrainRequest,
    HealthRequest,
    LoadResult,
    LogRequest,
    LogTail,
    ParkRequest,
    ParkResult,
    ReserveRequest,
    SmokeRequest,
    UnloadRequest,
    WakeRequest,
)

log = logging.getLogger(__name__)

# A measured model is booked at what it took plus this share, for allocator variation.
MEASURED_MARGIN = 1.1
# A measurement is a new peak only when it passes the last one by this factor.
PEAK_STEP = 1.01


@dataclass
class _Held:
    pid: int
    device: str
    runtime: str
    peak: int


def _mib(value: int | None) -> str:
    return "unmeasured" if value is None else f"{value / 2**20:.0f} MiB"


class NodeActivities:
    def __init__(
        self,
        node: str,
        ledger: Ledger,
        adapters: Mapping[str, RuntimeAdapter],
        metrics: Metrics,
        gpu: GpuReader | None = None,
        profiles: MemoryProfiles | None = None,
    ) -> None:
        self._node = node
        self._ledger = ledger
        self._adapters = dict(adapters)
        self._metrics = metrics
        self._gpu = gpu
        self._profiles = profiles
        self._estimates: dict[str, int] = {}
        # Runtime processes of the models loaded on the CPU: their resident memory is "used".
        self._cpu_pids: dict[str, int] = {}
        # Every loaded model's runtime process, device, runtime and the most it has held.
        self._held: dict[str, _Held] = {}
        # Set whenever a booking is made, resized or released: the node announces early.
        self.bookings_changed = asyncio.Event()

    def _adapter(self, runtime: str) -> RuntimeAdapter:
        adapter = self._adapters.get(runtime)
        if adapter is None:
            raise ApplicationError(
                f"runtime {runtime!r} is not available on node {self._node} (available: {', '.join(self._adapters)})",
                type=ErrorType.NO_RUNTIME,
                non_retryable=True,
            )
        return adapter

    def _parking(self, runtime: str, *, waking: bool = False) -> Parking:
        """The runtime's adapter, if it parks models (one that was parked is woken even if
        parking was turned off since)."""
        adapter = self._adapter(runtime)
        if not isinstance(adapter, Parking) or not (waking or adapter.parks):
            raise ApplicationError(
                f"runtime {runtime} on node {self._node} does not park models",
                type=ErrorType.RUNTIME_UNHEALTHY,
                non_retryable=True,
            )
        return adapter

    def _refresh_loaded_gauge(self) -> None:
        for name, adapter in self._adapters.items():
            self._metrics.models_loaded.labels(runtime=name, node=self._node).set(len(adapter.running()))

    @activity.defn(name=ActivityName.RESERVE_GPU)
    async def reserve_gpu(self, request: ReserveRequest) -> Booking:
        nbytes = self.booking_size(request)
        try:
            booking = self._ledger.reserve(request.model, request.device, nbytes, request.devices or None)
        except InsufficientCapacity as exc:
            # Two decisions raced for the same room; the workflow waits and decides again.
            raise expected_failure(str(exc), ErrorType.INSUFFICIENT_CAPACITY) from None
        self.refresh_device_gauges()
        self.bookings_changed.set()
        return booking

    def booking_size(self, request: ReserveRequest) -> int:
        """The estimate, or what this model took on this runtime last time (plus a margin)."""
        self._estimates[request.model] = request.bytes
        self._metrics.model_memory.labels(model=request.model, kind="estimated").set(request.bytes)
        profile = self._profiles.get(request.model, request.runtime) if self._profiles and request.runtime else None
        if profile is None:
            return request.bytes
        # A measured tensor-parallel model is spread evenly over its devices.
        return int(profile.measured_bytes * MEASURED_MARGIN / max(1, len(request.devices)))

    def refresh_device_gauges(self) -> None:
        gauge = self._metrics.gpu_memory
        for device, capacity in self._ledger.capacities.items():
            gauge.labels(node=self._node, gpu=device, kind="total").set(capacity)
            gauge.labels(node=self._node, gpu=device, kind="booked").set(self._ledger.booked(device))
        for gpu in self._gpu.gpus() if self._gpu else []:
            gauge.labels(node=self._node, gpu=gpu.device, kind="used").set(gpu.used_bytes)
        if "cpu" in self._ledger.capacities:
            # On the CPU, "used" is what the models' runtime processes hold resident now. This
            # runs in the peak tracker's thread too, while loads and unloads change the map on
            # the event loop: it reads a copy (list() of a dict is one step under the GIL).
            alive = [pid for pid in list(self._cpu_pids.values()) if pid_alive(pid)]
            # The warm pool's spares hold memory of the CPU budget too (and are booked in it).
            for adapter in self._adapters.values():
                alive += getattr(adapter, "spare_pids", list)()
            used = sum(resident_bytes(process_tree(pid)) for pid in alive)
            gauge.labels(node=self._node, gpu="cpu", kind="used").set(used)

    def measure(self, request: LoadRequest, pid: int | None) -> int | None:
        """What the loaded model really takes (see `_holds`). The load's first peak keeps it as
        the model's profile for its next load."""
        if pid is None:
            return None
        measured = self._holds(pid, request.booking.device)
        if not measured:
            return None
        self._metrics.model_memory.labels(model=request.model, kind="measured").set(measured)
        return measured

    def _holds(self, pid: int, device: str) -> int:
        """Memory a runtime's process tree holds: its GPU memory (NVML) on a GPU, its resident
        memory (mapped weights included) on the CPU."""
        pids = process_tree(pid)
        if device.startswith("cuda") and self._gpu is not None:
            return sum(self._gpu.process_memory(pids).values())
        return resident_bytes(pids)

    def track_peaks(self) -> list[MemoryPeak]:
        """Measure every loaded model again and keep its peak: memory grows after the first
        requests (pages touched, caches, allocator pools). A new peak updates the model's
        profile (its next load books it); one past the booking resizes the booking, even past
        the device's capacity, which is then reported rather than hidden. Returns new peaks."""
        changes = []
        for model, held in list(self._held.items()):
            if not pid_alive(held.pid):
                continue
            peak = self._new_peak(model, held, self._holds(held.pid, held.device))
            if peak is not None:
                changes.append(peak)
        return changes

    def _new_peak(self, model: str, held: _Held, now: int) -> MemoryPeak | None:
        """Record `now` as the model's peak if it is one (see track_peaks); None if not. Growth
        under 1% is not a new peak: resident memory creeps by pages, and each peak is a signal."""
        if now <= held.peak * PEAK_STEP:
            return None
        held.peak = now
        self._metrics.model_memory.labels(model=model, kind="peak").set(now)
        if self._profiles is not None:
            estimate = self._estimates.get(model, now)
            self._profiles.put(MemoryProfile(model, held.runtime, held.device, now, estimate, time.time()))
        booking = self._ledger.get(model)
        over: list[str] = []
        if booking is not None and now > booking.bytes:
            booking, over = self._ledger.resize(model, now)
            for device in over:
                log.error(
                    "%s now holds %s, more than its booking: %s/%s is booked past its capacity; nothing more "
                    "is placed there until memory is freed",
                    model,
                    _mib(now),
                    self._node,
                    device,
                )
            self.refresh_device_gauges()
        return MemoryPeak(model, now, booking.bytes if booking else None, over)

    @activity.defn(name=ActivityName.CONFIRM_FREED)
    async def confirm_memory_freed(self, request: ConfirmFreedRequest) -> None:
        """Return once the evicted models' processes are gone and, on a GPU, NVML no longer
        counts memory for them: only then may the next model book what they held."""
        deadline = time.monotonic() + request.timeout_seconds
        while True:
            alive = [pid for pid in request.pids if pid_alive(pid)]
            holding: dict[int, int] = {}
            if request.device.startswith("cuda") and self._gpu is not None:
                holding = gpu_memory_held(self._gpu, set(request.pids))
            if not alive and not holding:
                self.refresh_device_gauges()
                return
            if time.monotonic() > deadline:
                raise ApplicationError(
                    f"memory of evicted processes on {self._node}/{request.device} did not come back within "
                    f"{request.timeout_seconds:g}s: still running {alive}, still holding GPU memory {holding}",
                    type=ErrorType.MEMORY_NOT_FREED,
                )
            activity.heartbeat(f"waiting for pids {alive or list(holding)}")
            await asyncio.sleep(0.2)

    @activity.defn(name=ActivityName.RELEASE_GPU)
    async def release_gpu(self, model: str) -> None:
        self._ledger.release(model)
        self._ledger.release(parked_key(model))  # the host memory of a parked model, if any
        self.refresh_device_gauges()
        self.bookings_changed.set()

    @activity.defn(name=ActivityName.LOAD_MODEL)
    async def load_model(self, request: LoadRequest) -> LoadResult:
        adapter = self._adapter(request.runtime)
        started = time.monotonic()
        try:
            endpoint = await adapter.start(request, progress=lambda msg, line=None: activity.heartbeat(msg, line))
        except RuntimeStartError as exc:
            raise ApplicationError(
                f"{request.runtime} could not start {request.model}: {exc}",
                type=ErrorType.RUNTIME_START,
                non_retryable=not exc.retryable,
            ) from None
        finally:
            self._refresh_loaded_gauge()
        seconds = time.monotonic() - started
        self._metrics.load_duration.labels(model=request.model, runtime=request.runtime).observe(seconds)
        if request.booking.device == "cpu" and endpoint.pid is not None:
            self._cpu_pids[request.model] = endpoint.pid
        # Measured after one real request: before it, weights are not all paged in and the
        # first inference's buffers do not exist yet (a GPT-2 read 370 MB here, then held 865).
        warm_up = getattr(adapter, "warm_up", None)
        warmed = bool(warm_up is not None and await warm_up(endpoint, request.model))
        measured = self.measure(request, endpoint.pid)
        booked = request.booking.bytes
        if endpoint.pid is not None:
            held = self._held[request.model] = _Held(endpoint.pid, request.booking.device, request.runtime, 0)
            peak = self._new_peak(request.model, held, measured or 0)
            if peak is not None and peak.booked_bytes is not None:
                booked = peak.booked_bytes
                self.bookings_changed.set()
        activity.logger.info(
            "loaded %s in %.2fs at %s; it takes %s%s (booked %s)",
            request.model,
            seconds,
            endpoint.url,
            _mib(measured),
            " after a warm-up request" if warmed else "",
            _mib(request.booking.bytes),
        )
        return LoadResult(endpoint=endpoint, load_seconds=seconds, measured_bytes=measured, booked_bytes=booked)

    @activity.defn(name=ActivityName.UNLOAD_MODEL)
    async def unload_model(self, request: UnloadRequest) -> None:
        adapter = self._adapter(request.runtime)
        try:
            await adapter.stop(request.model)
        finally:
            self._cpu_pids.pop(request.model, None)
            self._held.pop(request.model, None)
            self._refresh_loaded_gauge()
        self._metrics.unloads.labels(reason=request.kind).inc()
        activity.logger.info("unloaded %s: %s", request.model, request.reason)

    @activity.defn(name=ActivityName.CHECK_HEALTH)
    async def check_health(self, request: HealthRequest) -> None:
        try:
            await self._adapter(request.runtime).check_health(request.model)
        except RuntimeUnhealthy as exc:
            raise expected_failure(str(exc), ErrorType.RUNTIME_UNHEALTHY) from None

    @activity.defn(name=ActivityName.SMOKE_CHECK)
    async def smoke_check(self, request: SmokeRequest) -> str:
        """A new version's first real request, before any client's: one token from a fixed prompt,
        or one short input. Fails (not retried) with what the runtime answered."""
        adapter = self._adapter(request.runtime)
        try:
            await adapter.check_health(request.model)
            if request.path:
                return await custom_smoke(request)
            sent = isinstance(adapter, Switching) and await adapter.smoke(request.endpoint, request.model)
        except RuntimeUnhealthy as exc:
            raise expected_failure(f"smoke check failed: {exc}", ErrorType.SMOKE_FAILED) from None
        return "answered one real request" if sent else "healthy (this protocol has no request to send blind)"

    @activity.defn(name=ActivityName.DRAIN_RUNTIME)
    async def drain_runtime(self, request: DrainRequest) -> str:
        """Wait until an instance that gateways no longer route to has answered what it had: at
        least `settle_seconds` (gateways reuse an endpoint for up to gateway.endpoint_cache_seconds),
        then until it reports nothing in flight twice in a row, at most `seconds`. A runtime that
        does not tell its in-flight requests is given all of `seconds`."""
        adapter = self._adapter(request.runtime)
        endpoint = _endpoint_of(adapter, request.model)
        if endpoint is None:
            return "nothing to drain: it no longer runs"
        counting = adapter.in_flight if isinstance(adapter, Switching) else None
        started = time.monotonic()
        deadline = started + max(request.seconds, 0.0)
        idle_checks = 0
        while time.monotonic() < deadline:
            activity.heartbeat(f"draining {request.model}")
            count = await counting(endpoint, request.model) if counting is not None else None
            settled = time.monotonic() - started >= request.settle_seconds
            idle_checks = idle_checks + 1 if count == 0 else 0
            if settled and idle_checks >= 2:
                return f"drained in {time.monotonic() - started:.1f}s"
            await asyncio.sleep(0.25)
        return f"drain time of {request.seconds:g}s over"

    @activity.defn(name=ActivityName.PARK_MODEL)
    async def park_model(self, request: ParkRequest) -> ParkResult:
        """Put an idle model to sleep: its weights' host memory is booked in the CPU budget
        first (refused when there is no room: the workflow unloads it instead), then its GPU
        booking shrinks to what NVML says it still holds."""
        adapter = self._parking(request.runtime)
        host = parked_key(request.model)
        try:
            self._ledger.reserve(host, "cpu", request.host_bytes)
        except InsufficientCapacity as exc:
            raise expected_failure(f"no room to park {request.model}: {exc}", ErrorType.INSUFFICIENT_CAPACITY) from None
        try:
            await adapter.park(request.model)
        except RuntimeUnhealthy as exc:
            self._ledger.release(host)
            raise ApplicationError(
                f"could not park {request.model}: {exc}", type=ErrorType.RUNTIME_UNHEALTHY, non_retryable=True
            ) from None
        booking = self._ledger.get(request.model)
        held = self._held.get(request.model)
        gpu_bytes = booking.bytes if booking else 0
        if booking is not None and held is not None and held.device.startswith("cuda"):
            still = self._holds(held.pid, held.device)
            # Spread over its devices as the booking is (tensor parallel), with the usual margin.
            share = int(still * MEASURED_MARGIN / max(1, len(booking.all_devices)))
            if share < booking.bytes:
                booking, _ = self._ledger.resize(request.model, share)
                gpu_bytes = booking.bytes if booking else share
        self.refresh_device_gauges()
        self.bookings_changed.set()
        activity.logger.info(
            "parked %s: %s of host memory booked for its weights, %s still booked on the GPU",
            request.model,
            _mib(request.host_bytes),
            _mib(gpu_bytes),
        )
        return ParkResult(gpu_bytes=gpu_bytes, host_bytes=request.host_bytes)

    @activity.defn(name=ActivityName.WAKE_MODEL)
    async def wake_model(self, request: WakeRequest) -> Booking:
        """Book the GPU memory a parked model gave up, then wake it; its host booking goes."""
        adapter = self._parking(request.runtime, waking=True)
        try:
            booking = self._ledger.reserve(request.model, request.device, request.bytes, request.devices or None)
        except InsufficientCapacity as exc:
            raise expected_failure(f"no room to wake {request.model}: {exc}", ErrorType.INSUFFICIENT_CAPACITY) from None
        try:
            await adapter.wake(request.model)
        except RuntimeUnhealthy as exc:
            raise ApplicationError(
                f"could not wake {request.model}: {exc}", type=ErrorType.RUNTIME_UNHEALTHY, non_retryable=True
            ) from None
        self._ledger.release(parked_key(request.model))
        self.refresh_device_gauges()
        self.bookings_changed.set()
        return booking

    @activity.defn(name=ActivityName.READ_RUNTIME_LOG)
    async def read_runtime_log(self, request: LogRequest) -> LogTail:
        """The last `tail` lines of the model's runtime log (at most the last MiB of it), or what
        was written since the offset `after`."""
        path = self._adapter(request.runtime).log_path(request.model)
        return await asyncio.to_thread(read_log_tail, path, request.tail, request.after)

    def all(self) -> list[Callable[..., Any]]:
        return [
            self.reserve_gpu,
            self.release_gpu,
            self.load_model,
            self.unload_model,
            self.check_health,
            self.confirm_memory_freed,
            self.read_runtime_log,
            self.smoke_check,
            self.drain_runtime,
            self.park_model,
            self.wake_model,
        ]


async def custom_smoke(request: SmokeRequest) -> str:
    """The model's own smoke request (modelium.yaml `smoke:`): its body POSTed to its path."""
    assert request.path is not None
    body = dict(request.body or {})
    if request.path.startswith("/v1/"):
        body.setdefault("model", model_of(request.model))
    response = await post_expecting(request.endpoint.url + request.path, body, request.status)
    return f"answered the model's own check ({request.path}, {response.status_code})"


def _endpoint_of(adapter: RuntimeAdapter, key: str) -> Endpoint | None:
    """The endpoint of a running instance (every adapter tells it)."""
    find = getattr(adapter, "endpoint", None)
    return find(key) if callable(find) else None  # type: ignore[no-any-return]


LOG_READ_LIMIT = 2**20


def read_log_tail(path: Path, tail: int, after: int | None) -> LogTail:
    """Lines from the end of `path` (see `read_runtime_log`); an empty answer when the runtime
    wrote nothing yet. A file that shrank (rotated, rewritten) is read from its start."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return LogTail(str(path), [], 0)
    start = max(0, size - LOG_READ_LIMIT)
    if after is not None and after <= size:
        start = max(start, after)
    with path.open("rb") as fh:
        fh.seek(start)
        data = fh.read(size - start)
    # A line still being written is left for the next read (`size` points at its start).
    complete = data.rfind(b"\n") + 1
    size, data = start + complete, data[:complete]
    lines = data.decode("utf-8", "replace").splitlines()
    if start > 0 and after is None and lines:
        lines = lines[1:]  # the first line read is cut
    return LogTail(str(path), lines[-tail:] if after is None else lines, size)
