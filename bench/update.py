"""A new version of a loaded model while clients use it: time from the file change to the switch,
the serving gap a client sees, and the latency the switch adds.

Runs `modelium serve` as a user would (harness.py), loads the demo model, starts `--clients`
clients sending one-token completions without pause, then puts a new version's files in place
(each renamed in, as a deploy tool would). It prints, per run and strategy:

- time from the files' change to the switch (the model's `switched_at`; for recreate, to the
  second load);
- the serving gap: the longest time between two answered requests (for blue/green the old
  version answers until the new one does);
- route lag (blue/green): how long after the switch the gateway still sent a request to the old
  version (the last request the old version answered, by the answers' `system_fingerprint`,
  sent that long after `switched_at`; 0 or less: none was);
- requests that failed (must be 0);
- p50 / p99 latency before the change and from the change to the end of the drain, and the p99
  added.

    .venv/bin/python bench/update.py [--runs 3] [--clients 4] [--strategy blue_green,recreate]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import modelium_serve, wait_phase  # noqa: E402

from cli.demo import write_demo_model  # noqa: E402


def put_in_place(source: Path, target: Path) -> float:
    for path in sorted(source.iterdir()):
        tmp = target / f".{path.name}.new"
        shutil.copy2(path, tmp)
        os.replace(tmp, target / path.name)
    return time.time()


class Load:
    def __init__(self, url: str, model: str, clients: int) -> None:
        self.url, self.model = url, model
        self.samples: list[tuple[float, float, int, str]] = []  # (sent at, seconds, status, version)
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def _run(self) -> None:
        body = {"model": self.model, "prompt": "Hello", "max_tokens": 1}
        with httpx.Client(timeout=120) as http:
            while not self.stop.is_set():
                sent = time.time()
                t0 = time.perf_counter()
                version = ""
                try:
                    response = http.post(f"{self.url}/v1/completions", json=body)
                    status = response.status_code
                    if status == 200:
                        version = response.json().get("system_fingerprint") or ""
                except httpx.HTTPError:
                    status = 0
                self.samples.append((sent, time.perf_counter() - t0, status, version))

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else float("nan")


def one_run(workdir: Path, strategy: str, clients: int, run: int) -> dict[str, float]:
    tag = f"{strategy}-{run}"
    template = write_demo_model(workdir / f"v1-{tag}")
    v2 = write_demo_model(workdir / f"v2-{tag}", seed=1, layers=3)
    config = {
        "orchestration": {"updates": {"strategy": strategy}},
        "runtimes": {"embedded": {"cpu_threads": 1}},
    }
    with modelium_serve(workdir, tag, **config) as served:
        target = served.incoming / "bench-model"
        shutil.copytree(template, workdir / f".stage-{tag}")
        os.rename(workdir / f".stage-{tag}", target)
        before = wait_phase(served.url, "bench-model", "loaded")
        with Load(served.url, "bench-model", clients) as load:
            time.sleep(5)
            changed = put_in_place(v2, target)
            deadline = time.monotonic() + 300
            with httpx.Client(timeout=30) as http:
                while time.monotonic() < deadline:
                    state = http.get(f"{served.url}/models/bench-model").json()
                    done = state["update_state"] is None and (
                        state["switched_at"] if strategy == "blue_green" else state["load_count"] > before["load_count"]
                    )
                    if done and state["phase"] == "loaded":
                        break
                    time.sleep(0.1)
                else:
                    raise SystemExit(f"{strategy}: no switch within 300 s: {state}")
            switched = state["switched_at"] or state["loaded_at"]
            time.sleep(3)
        ok = sorted(s[0] + s[1] for s in load.samples if s[2] == 200)
        gap = max((b - a for a, b in zip(ok, ok[1:], strict=False) if b > changed - 1), default=0.0)
        before_lat = [s[1] for s in load.samples if s[0] < changed and s[2] == 200]
        during = [s[1] for s in load.samples if changed <= s[0] <= switched + 5 and s[2] == 200]
        old = {s[3] for s in load.samples if s[0] < changed and s[2] == 200}
        to_old_after = [s[0] - switched for s in load.samples if s[3] in old and s[0] >= switched]
        return {
            "to_switch_s": switched - changed,
            "route_lag_ms": (max(to_old_after) * 1000 if to_old_after else 0.0)
            if strategy == "blue_green"
            else float("nan"),
            "gap_s": gap,
            "failed": sum(1 for s in load.samples if s[2] != 200),
            "requests": len(load.samples),
            "p50_before_ms": pct(before_lat, 0.5),
            "p99_before_ms": pct(before_lat, 0.99),
            "p50_during_ms": pct(during, 0.5),
            "p99_during_ms": pct(during, 0.99),
        }


def lag(ms: float) -> str:
    return f"{ms:>7.0f}ms" if ms == ms else f"{'-':>9}"  # NaN: no old version serves beside the new


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--strategy", default="blue_green,recreate")
    args = parser.parse_args()
    columns = ("strategy   ", "run", "to switch", "route lag", "serving gap", "failed/requests", "p50 before")
    columns = (*columns, "p99 before")
    print("  ".join((*columns, "p50 during", "p99 during", "p99 added")))
    with tempfile.TemporaryDirectory(prefix="modelium-update-") as tmp:
        for strategy in args.strategy.split(","):
            rows = []
            for run in range(1, args.runs + 1):
                r = one_run(Path(tmp), strategy, args.clients, run)
                rows.append(r)
                print(
                    f"{strategy:<11} {run:>3}  {r['to_switch_s']:>8.2f}s  {lag(r['route_lag_ms'])}  "
                    f"{r['gap_s']:>10.3f}s  "
                    f"{r['failed']:>6}/{r['requests']:<8}  {r['p50_before_ms']:>8.1f}ms  {r['p99_before_ms']:>8.1f}ms  "
                    f"{r['p50_during_ms']:>8.1f}ms  {r['p99_during_ms']:>8.1f}ms  "
                    f"{r['p99_during_ms'] - r['p99_before_ms']:>+8.1f}ms",
                    flush=True,
                )
            med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
            print(
                f"{strategy:<11} med  {med['to_switch_s']:>8.2f}s  {lag(med['route_lag_ms'])}  "
                f"{med['gap_s']:>10.3f}s  "
                f"{med['failed']:>6.0f}          p99 added {med['p99_during_ms'] - med['p99_before_ms']:+.1f} ms",
                flush=True,
            )


if __name__ == "__main__":
    main()
