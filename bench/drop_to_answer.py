"""Time from dropping a model into the watched folder to its first answer, measured end to end.

Runs `modelium serve` as a user would (subprocess, embedded Temporal, free ports), writes the demo
model to a staging folder, moves it into the watched folder (one rename, as a finished copy
would land), and polls POST /predict until it answers. The split comes from the model's own
state: `load_seconds` is the runtime's load (process start to healthy endpoint), the settle wait
is the configured quiet period, and the rest is Modelium's overhead (watcher, Temporal workflow
and activity scheduling, analysis, booking, routing).

    .venv/bin/python bench/drop_to_answer.py [--runs 3] [--settle 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import modelium_serve  # noqa: E402

from cli.demo import write_demo_model  # noqa: E402


def one_run(settle: float, staged: Path, workdir: Path, run: int) -> dict[str, float]:
    discovery = {"model_discovery": {"watch_directories": [str(workdir / f"incoming-{run}")], "settle_seconds": settle}}
    with modelium_serve(workdir, str(run), orchestration=discovery) as served:
        base = served.url
        with httpx.Client(timeout=120) as http:
            shutil.copytree(staged, workdir / ".tmp-copy")
            t0 = time.monotonic()
            os.rename(workdir / ".tmp-copy", served.incoming / "bench-model")
            # Until the watcher hands the model over it is unknown (404); from then on the request
            # waits for the load and is answered.
            while True:
                r = http.post(f"{base}/predict/bench-model", json={"prompt": "Hello", "max_tokens": 8})
                if r.status_code == 200:
                    break
                time.sleep(0.05)
            total = time.monotonic() - t0
            info = http.get(f"{base}/models/bench-model").json()
    load = float(info["load_seconds"])
    return {
        "startup": served.startup_seconds,
        "total": total,
        "settle": settle,
        "load": load,
        "overhead": total - settle - load,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--settle", type=float, default=3.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        staged = write_demo_model(workdir / "staged")
        rows = [one_run(args.settle, staged, workdir, i) for i in range(args.runs)]
    print(f"drop -> first answer, tiny GPT-2 on CPU, settle {args.settle:g}s, {args.runs} runs")
    print(f"{'run':>4} {'startup':>9} {'total':>8} {'settle':>8} {'load':>8} {'overhead':>9}")
    for i, r in enumerate(rows):
        print(
            f"{i:>4} {r['startup']:>8.2f}s {r['total']:>7.2f}s {r['settle']:>7.2f}s "
            f"{r['load']:>7.2f}s {r['overhead']:>8.2f}s"
        )
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    print(
        f"{'med':>4} {med['startup']:>8.2f}s {med['total']:>7.2f}s {med['settle']:>7.2f}s "
        f"{med['load']:>7.2f}s {med['overhead']:>8.2f}s"
    )
    print(
        f"runtime load / total: {med['load'] / med['total']:.0%}; "
        f"Modelium overhead (excl. settle) / total: {med['overhead'] / med['total']:.0%}"
    )


if __name__ == "__main__":
    main()
