"""A runtime's last output line, as a load's progress reports it (GET /events, the dashboard)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from modelium.runtimes.process import ManagedProcess


def run(tmp_path: Path, code: str, log: Path) -> ManagedProcess:
    proc = ManagedProcess([sys.executable, "-c", code], log)
    proc.start()
    deadline = time.monotonic() + 30
    while proc.alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not proc.alive()
    return proc


def test_last_line_of_this_run_with_progress_bars_redrawn(tmp_path: Path) -> None:
    log = tmp_path / "model.log"
    log.write_text("an earlier run's last words\n")
    proc = ManagedProcess([sys.executable, "-c", "pass"], log)
    assert proc.last_line() == "an earlier run's last words"  # not started: the log as it is
    proc = run(tmp_path, "pass", log)
    assert proc.last_line() is None  # this run printed nothing: an earlier run's line is not its
    bar = "import sys; sys.stderr.write('Loading weights:  10%\\rLoading weights:  60%\\r  \\n\\n')"
    proc = run(tmp_path, bar, log)
    assert proc.last_line() == "Loading weights:  60%"
    proc = run(tmp_path, "print('x' * 500)", log)
    line = proc.last_line(limit=50)
    assert line is not None and len(line) == 50 and line.endswith("…")
