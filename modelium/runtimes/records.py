"""What a node agent's runtimes are running, on disk: the next node agent adopts it.

One JSON file per running model, written atomically when its runtime becomes healthy and removed
when it is stopped. A node agent killed with SIGKILL leaves its runtime processes running (each is
in its own process group); the records let the agent that starts next take them over instead of
loading every model again.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from modelium.runtimes.process import ManagedProcess, process_argv, process_start_ticks
from modelium.types import Endpoint

log = logging.getLogger(__name__)


@dataclass
class RuntimeRecord:
    model: str
    pid: int
    # /proc start time of the process: tells it apart from a later process given the same pid.
    start_ticks: int | None
    argv: list[str]
    endpoint: Endpoint
    started_at: float | None
    # The command that would start what it serves, when not its own argv (a warm spare's).
    serves: list[str] | None = None

    def same_process(self) -> bool:
        """The recorded process still runs: that pid, started then, with that command line (not
        a later process given the same pid)."""
        return process_start_ticks(self.pid) == self.start_ticks and process_argv(self.pid) == self.argv


class RuntimeRecords:
    def __init__(self, directory: Path) -> None:
        self._dir = directory

    def save(self, model: str, proc: ManagedProcess, endpoint: Endpoint) -> None:
        assert proc.pid is not None
        record = RuntimeRecord(
            model,
            proc.pid,
            process_start_ticks(proc.pid),
            proc.argv,
            endpoint,
            proc.started_at,
            proc.serves if proc.serves != proc.argv else None,
        )
        self._dir.mkdir(parents=True, exist_ok=True)
        path = self._dir / f"{model}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(record), indent=2), encoding="utf-8")
        os.replace(tmp, path)

    def remove(self, model: str) -> None:
        (self._dir / f"{model}.json").unlink(missing_ok=True)

    def load(self) -> dict[str, RuntimeRecord]:
        records = {}
        for path in sorted(self._dir.glob("*.json")) if self._dir.is_dir() else []:
            try:
                raw = json.loads(path.read_text(encoding="utf-8"))
                raw["endpoint"] = Endpoint(**raw["endpoint"])
                record = RuntimeRecord(**raw)
            except (OSError, ValueError, TypeError, KeyError) as exc:
                log.warning("ignoring unreadable runtime record %s: %s", path, exc)
                path.unlink(missing_ok=True)
                continue
            records[record.model] = record
        return records
