"""The embedded runtime: one process per model, serving it with transformers + PyTorch.

Always available; works on the CPU. Text generation speaks the OpenAI protocol; classification and
embedding models speak Modelium's JSON (`POST /predict {"inputs": ...}`).
"""

from __future__ import annotations

import sys
from pathlib import Path

from modelium.config import EmbeddedRuntime as EmbeddedConfig
from modelium.names import model_of
from modelium.runtimes import EMBEDDED
from modelium.runtimes.managed import ProcessRuntime
from modelium.types import EndpointProtocol, LoadRequest, Task

NAME = EMBEDDED


def protocol_for(task: str) -> EndpointProtocol:
    return EndpointProtocol.OPENAI if task == Task.TEXT_GENERATION else EndpointProtocol.MODELIUM_JSON


class EmbeddedRuntimeAdapter(ProcessRuntime):
    name = NAME

    def __init__(
        self,
        node: str,
        log_dir: Path,
        config: EmbeddedConfig | None = None,
        host: str = "127.0.0.1",
        python: str = sys.executable,
        state_dir: Path | None = None,
        advertise: str | None = None,
    ) -> None:
        self._config = config or EmbeddedConfig()
        super().__init__(
            node,
            log_dir,
            host=host,
            advertise=advertise,
            load_timeout_seconds=self._config.load_timeout_seconds,
            state_dir=state_dir,
        )
        self._python = python

    def _device(self, booked: str) -> str:
        """The device as the runtime process names it. A booked GPU is the only one the process
        sees (CUDA_VISIBLE_DEVICES, see `env`), so inside it is always cuda:0."""
        configured = self._config.device
        if configured != "auto":
            return configured
        return "cuda:0" if booked.startswith("cuda:") else booked

    def argv(self, request: LoadRequest, port: int) -> list[str]:
        argv = [
            self._python,
            "-m",
            "modelium.runtimes.embedded_server",
            "--model-dir",
            request.path,
            "--name",
            model_of(request.model),
            "--task",
            request.task,
            "--host",
            self._host,
            "--port",
            str(port),
            "--device",
            self._device(request.booking.device),
        ]
        if self._config.cpu_threads:
            argv += ["--threads", str(self._config.cpu_threads)]
        return argv

    def env(self, request: LoadRequest) -> dict[str, str]:
        if self._config.device == "auto" and request.booking.device.startswith("cuda:"):
            return {"CUDA_VISIBLE_DEVICES": request.booking.device.split(":", 1)[1]}
        return {}

    def protocol(self, request: LoadRequest) -> EndpointProtocol:
        return protocol_for(request.task)
