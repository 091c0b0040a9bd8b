"""What a dead Temporal costs a running `modelium serve`: kill -9 its embedded Temporal while a
client sends requests to a loaded model, and measure how long until `/ready` answers 200 again
(serve starts Temporal again on the same database), and what the client saw meanwhile.

    .venv/bin/python bench/temporal_outage.py [--kills 3]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import modelium_serve, wait_phase  # noqa: E402
from cli.demo import write_demo_model  # noqa: E402


def _send(url: str, statuses: Counter[int], stop: threading.Event) -> None:
    with httpx.Client(timeout=30) as http:
        while not stop.is_set():
            statuses[http.post(f"{url}/predict/tiny", json={"prompt": "Hi", "max_tokens": 2}).status_code] += 1


def _temporal_pid(state: Path) -> int:
    return int(json.loads((state / "temporal" / "records" / "temporal-server.json").read_text())["pid"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with modelium_serve(work, "outage") as served:
            write_demo_model(served.incoming / "tiny")
            wait_phase(served.url, "tiny", "loaded")
            state = work / "state-outage"
            for kill in range(1, args.kills + 1):
                statuses: Counter[int] = Counter()
                stop = threading.Event()

                thread = threading.Thread(target=_send, args=(served.url, statuses, stop))
                thread.start()
                time.sleep(1.0)  # traffic before the kill
                pid = _temporal_pid(state)
                os.kill(pid, signal.SIGKILL)
                killed = time.monotonic()
                with httpx.Client(timeout=10) as http:
                    while True:
                        try:
                            if http.get(f"{served.url}/ready").status_code == 200 and _temporal_pid(state) != pid:
                                break
                        except (httpx.TransportError, OSError, ValueError):
                            pass
                        time.sleep(0.02)
                ready_after = time.monotonic() - killed
                time.sleep(1.0)  # traffic after
                stop.set()
                thread.join()
                print(
                    f"kill {kill}: /ready again after {ready_after:.2f}s; "
                    f"client answers during the 2 s around it: {dict(sorted(statuses.items()))}"
                )


if __name__ == "__main__":
    main()
