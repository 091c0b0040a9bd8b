"""Runtime processes: own process group, free port, log file, health polling, clean stop."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import certifi
import httpx

from modelium.runtimes.base import RuntimeStartError

log = logging.getLogger(__name__)


_TLS: ssl.SSLContext | None = None


def runtime_http(timeout: float) -> httpx.AsyncClient:
    """A client for a runtime's HTTP API. A new client builds a TLS context by reading the CA
    bundle (25-45 ms here, several times a load, even for plain http); they all share one."""
    global _TLS
    if _TLS is None:
        _TLS = ssl.create_default_context(cafile=certifi.where())
    return httpx.AsyncClient(timeout=timeout, verify=_TLS)


def loopback_for(host: str) -> str:
    """The address to reach a server on this machine that listens on `host`."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); it is gone for every purpose that matters here.
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class ManagedProcess:
    """One child process in its own process group, its output in a log file."""

    def __init__(
        self,
        argv: Sequence[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        self._env = dict(env) if env is not None else None
        self._cwd = cwd
        # What it serves, as the command that would start it for that: its own argv, unless it
        # was started as a warm spare and handed the model later.
        self.serves = list(argv)
        self._proc: subprocess.Popen[bytes] | None = None
        # Set instead of `_proc` for a process started by an earlier node agent (adopted).
        self._adopted: int | None = None
        self.started_at: float | None = None
        # Where this run's output starts in the log (earlier runs' output comes before it).
        self._log_start = 0

    @classmethod
    def adopt(cls, pid: int, argv: Sequence[str], log_path: Path, started_at: float | None = None) -> ManagedProcess:
        """Take over a process an earlier node agent started (it was killed; its runtime lived on)."""
        proc = cls(argv, log_path)
        proc._adopted = pid
        proc.started_at = started_at
        return proc

    def rebind_log(self, log_path: Path) -> None:
        """A warm spare handed a model writes to the model's log from now on (it reopens its
        output there): this run's output is what that file gets from here."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.touch()
        self.log_path = log_path
        self._log_start = log_path.stat().st_size

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else self._adopted

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as logfile:
            self._log_start = logfile.tell()
            self._proc = subprocess.Popen(
                self.argv,
                stdout=logfile,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self._env,
                cwd=self._cwd,
                start_new_session=True,  # its own process group: stopped as a whole
            )
        self.started_at = time.time()
        log.info("started pid %s: %s (log %s)", self._proc.pid, self.argv[0], self.log_path)

    def alive(self) -> bool:
        if self._adopted is not None:
            return pid_alive(self._adopted)
        return self._proc is not None and self._proc.poll() is None

    def exit_code(self) -> int | None:
        # An adopted process is not this process's child: its exit code is not ours to read.
        return self._proc.poll() if self._proc else None

    def exited(self) -> RuntimeStartError:
        """The error of a runtime that exited before it became healthy, with its last lines."""
        return RuntimeStartError(
            f"process exited with code {self.exit_code()} before it became healthy; "
            f"last lines of {self.log_path}:\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def last_line(self, limit: int = 200) -> str | None:
        """The last line this run printed (a progress bar's latest state: lines redrawn with a
        carriage return count as lines), at most `limit` characters; None before any."""
        try:
            with self.log_path.open("rb") as f:
                end = f.seek(0, 2)
                start = max(self._log_start, end - 4096)
                if end <= start:
                    return None
                f.seek(start)
                text = f.read(end - start).decode("utf-8", errors="replace")
        except OSError:
            return None
        for line in reversed(re.split(r"[\r\n]", text)):
            line = line.strip()
            if line:
                return line if len(line) <= limit else line[: limit - 1] + "…"
        return None

    async def wait_healthy(
        self,
        url: str,
        timeout: float,
        tick: Callable[[str | None], None] | None = None,
        interval: float = 0.25,
    ) -> None:
        """Poll `url` until it answers 200, the process exits, or `timeout` passes."""
        deadline = time.monotonic() + timeout
        async with runtime_http(2.0) as client:
            while True:
                if not self.alive():
                    raise self.exited()
                try:
                    response = await client.get(url)
                    if response.status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeStartError(
                        f"not healthy after {timeout:.0f}s at {url}; last lines of {self.log_path}:\n{self.log_tail()}"
                    )
                if tick is not None:
                    tick(self.last_line())
                await asyncio.sleep(interval)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the process group, SIGKILL it after `grace` seconds; reap the child."""
        if self._adopted is not None:
            self._stop_adopted(self._adopted, grace)
            return
        if self._proc is None:
            return
        pgid = self._proc.pid
        _signal_group(pgid, signal.SIGTERM)
        try:
            self._proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            log.warning("pid %s ignored SIGTERM for %.0fs; sending SIGKILL", pgid, grace)
        # Whatever the leader did, nothing of its group may outlive it.
        _signal_group(pgid, signal.SIGKILL)
        self._proc.wait()

    @staticmethod
    def _stop_adopted(pgid: int, grace: float) -> None:
        _signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while pid_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)
        _signal_group(pgid, signal.SIGKILL)
        while pid_alive(pgid):
            time.sleep(0.02)


def process_start_ticks(pid: int) -> int | None:
    """When the process started (clock ticks since boot, /proc/<pid>/stat field 22): with the pid,
    it names one process even after the pid is reused."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def process_argv(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return [part.decode("utf-8", "replace") for part in fh.read().split(b"\0") if part]
    except OSError:
        return None


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
