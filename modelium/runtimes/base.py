"""The interface every runtime adapter implements (see STYLE.md, "Runtime adapters")."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

from modelium.types import Endpoint, LoadRequest


class Progress(Protocol):
    """Called while a runtime comes up: what the adapter is waiting on, and the runtime's own
    last output line where it prints one ("Loading safetensors checkpoint shards: 40%")."""

    def __call__(self, message: str, line: str | None = None, /) -> None: ...


class RuntimeStartError(RuntimeError):
    """The runtime could not start the model; the message carries the runtime's own words."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class RuntimeUnhealthy(RuntimeError):
    """A started model no longer answers."""


@runtime_checkable
class RuntimeAdapter(Protocol):
    name: str

    async def start(self, request: LoadRequest, progress: Progress) -> Endpoint:
        """Start serving the model and return its endpoint once it answers its health check.

        Idempotent: if the model is already running and healthy, its endpoint is returned.
        `progress` is called while waiting (activities heartbeat from it).
        """
        ...

    async def check_health(self, model: str) -> None:
        """Raise RuntimeUnhealthy when the model does not answer."""
        ...

    async def stop(self, model: str) -> bool:
        """Stop serving the model and free its device. True if something was running."""
        ...

    async def stop_all(self) -> None:
        """Stop every model this adapter started (shutdown)."""
        ...

    def running(self) -> list[str]:
        """Models this adapter is serving now."""
        ...

    def dead(self) -> dict[str, int | None]:
        """Models whose process exited without being stopped (crashed, killed), with its pid."""
        ...

    def log_path(self, model: str) -> Path:
        """The file the runtime writes what it prints while serving `model` (one file per model,
        or the shared server's one file)."""
        ...

    async def adopt(self) -> list[str]:
        """Take over the healthy runtime processes an earlier node agent of this node left
        running (it was killed). Returns the models adopted."""
        ...


@runtime_checkable
class Parking(Protocol):
    """A runtime that can put an idle model to sleep and wake it (vLLM's sleep mode)."""

    @property
    def parks(self) -> bool:
        """Parking is turned on (its servers were started able to sleep)."""
        ...

    async def park(self, model: str) -> None:
        """Free the model's GPU memory, its weights kept in host memory. RuntimeUnhealthy if not."""
        ...

    async def wake(self, model: str) -> None:
        """Bring a parked model back to serving. RuntimeUnhealthy if it cannot."""
        ...


@runtime_checkable
class Switching(Protocol):
    """What an update needs of a runtime to switch to a new version loaded beside the serving one
    (every adapter has it): a smoke check and how much the old instance still has to answer."""

    async def smoke(self, endpoint: Endpoint, model: str) -> bool:
        """One real request to the instance `model`, checked; RuntimeUnhealthy with what went
        wrong. False when nothing could be sent blind (no request that needs no model-specific
        input): the instance was only found healthy."""
        ...

    async def in_flight(self, endpoint: Endpoint, model: str) -> int | None:
        """Requests the instance `model` is answering now; None when the runtime does not say.
        A runtime that answers what it holds on its own when a model is stopped (Triton
        finishes a model's in-flight inferences as it unloads it) says 0."""
        ...
