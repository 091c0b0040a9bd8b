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
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

from modelium.demo import write_demo_model
from modelium.runtimes.process import free_port


def one_run(settle: float, staged: Path, workdir: Path, run: int) -> dict[str, float]:
    gw, tp, ui, mp = (free_port() for _ in range(4))
    config = workdir / f"modelium-{run}.yaml"
    incoming = workdir / f"incoming-{run}"
    config.write_text(yaml.safe_dump({
        "state_dir": str(workdir / f"state-{run}"),
        "temporal": {"port": tp, "ui_port": ui, "ui": False},
        "gateway": {"port": gw}, "metrics": {"port": mp},
        "orchestration": {"model_discovery": {"watch_directories": [str(incoming)],
                                              "settle_seconds": settle}},
    }))  # fmt: skip
    log = (workdir / f"serve-{run}.log").open("wb")
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "modelium.cli", "--config", str(config), "serve"],
        stdout=log, stderr=subprocess.STDOUT, cwd=workdir,
    )  # fmt: skip
    base = f"http://127.0.0.1:{gw}"
    try:
        with httpx.Client(timeout=30) as http:
            while True:
                try:
                    if http.get(f"{base}/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if proc.poll() is not None:
                    raise SystemExit(f"modelium serve exited; see {log.name}")
                time.sleep(0.05)
            startup = time.monotonic() - started
            incoming.mkdir(exist_ok=True)
            target = incoming / "bench-model"
            shutil.copytree(staged, workdir / ".tmp-copy")
            t0 = time.monotonic()
            os.rename(workdir / ".tmp-copy", target)
            while True:
                r = http.post(f"{base}/predict/bench-model",
                              json={"prompt": "Hello", "max_tokens": 8})  # fmt: skip
                if r.status_code == 200:
                    break
                time.sleep(0.05)
            total = time.monotonic() - t0
            info = http.get(f"{base}/models/bench-model").json()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    load = float(info["load_seconds"])
    return {"startup": startup, "total": total, "settle": settle, "load": load,
            "overhead": total - settle - load}  # fmt: skip


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
        print(f"{i:>4} {r['startup']:>8.2f}s {r['total']:>7.2f}s {r['settle']:>7.2f}s "
              f"{r['load']:>7.2f}s {r['overhead']:>8.2f}s")  # fmt: skip
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    print(f"{'med':>4} {med['startup']:>8.2f}s {med['total']:>7.2f}s {med['settle']:>7.2f}s "
          f"{med['load']:>7.2f}s {med['overhead']:>8.2f}s")  # fmt: skip
    print(
        f"runtime load / total: {med['load'] / med['total']:.0%}; "
        f"Modelium overhead (excl. settle) / total: {med['overhead'] / med['total']:.0%}"
    )


if __name__ == "__main__":
    main()
