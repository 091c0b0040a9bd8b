"""Eviction policies under churn: 50 models on a node with room for 5, requests drawn from a Zipf
distribution (s = 1.1) over them, the same sequence for each policy, in one run.

For each of `score` (retention score: recent use x reload time / memory held) and `lru`:
hit rate (the model was serving when asked), cold-wait p50/p99 (latency of the requests that had
to wait for a load), evictions per minute, and failed requests (which must be 0).

A request counts as a miss when it took over `--miss-seconds` (default 0.5 s): an answer from a
loaded model takes milliseconds, a load takes seconds. The gateway's own count of requests that
waited for a load (modelium_cold_start_wait_seconds_count) is printed beside it as a check.

    .venv/bin/python bench/churn.py [--requests 400] [--clients 4] [--policies score,lru]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import modelium_serve  # noqa: E402
from bench.scale import link_models, metric_total  # noqa: E402
from cli.demo import write_demo_model  # noqa: E402
from modelium.analyzer import analyze_directory  # noqa: E402

MODELS = 50
ROOM_FOR = 5
ZIPF_S = 1.1


def zipf_sequence(n: int, seed: int) -> list[str]:
    weights = [1 / k**ZIPF_S for k in range(1, MODELS + 1)]
    names = [f"m{i:05d}" for i in range(MODELS)]
    return random.Random(seed).choices(names, weights=weights, k=n)


def percentile(samples: list[float], q: float) -> float:
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def drive(url: str, sequence: list[str], clients: int) -> list[tuple[float, int]]:
    """Send the sequence with `clients` concurrent clients; (latency, status) per request."""
    queue: asyncio.Queue[str] = asyncio.Queue()
    for name in sequence:
        queue.put_nowait(name)
    results: list[tuple[float, int]] = []

    async def client() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=600) as http:
            while not queue.empty():
                name = queue.get_nowait()
                started = time.perf_counter()
                response = await http.post("/v1/completions", json={"model": name, "prompt": "Hi", "max_tokens": 1})
                results.append((time.perf_counter() - started, response.status_code))

    await asyncio.gather(*(client() for _ in range(clients)))
    return results


def run(
    policy: str, workdir: Path, template: Path, capacity: int, sequence: list[str], args: argparse.Namespace
) -> dict[str, float]:
    config = {
        "node": {"cpu_memory_budget_bytes": capacity},
        "runtimes": {"embedded": {"cpu_threads": 1}},
        "gateway": {"cold_start_timeout_seconds": 600, "max_waiting_requests": 1000},
        "orchestration": {
            "model_discovery": {"watch_directories": [str(workdir / f"incoming-{policy}")], "settle_seconds": 0.5},
            "eviction": {"policy": policy, "min_resident_seconds": 1, "min_idle_seconds": 1},
            "policies": {"evict_after_idle_seconds": 3600},
        },
    }
    with modelium_serve(workdir, policy, **config) as served, httpx.Client(timeout=120) as http:
        link_models(template, served.incoming, MODELS)
        while True:
            models = http.get(f"{served.url}/models").json()["models"]
            phases = [m["phase"] for m in models]
            if len(models) == MODELS and set(phases) <= {"loaded", "unloaded"} and phases.count("loaded") == ROOM_FOR:
                break
            time.sleep(1)
        before = http.get(served.metrics_url).text
        started = time.monotonic()
        results = asyncio.run(drive(served.url, sequence, args.clients))
        minutes = (time.monotonic() - started) / 60
        after = http.get(served.metrics_url).text
    misses = [latency for latency, status in results if status == 200 and latency > args.miss_seconds]
    hits = [latency for latency, status in results if status == 200 and latency <= args.miss_seconds]
    failed = sum(1 for _, status in results if status != 200)
    waited = metric_total(after, "modelium_cold_start_wait_seconds_count") - metric_total(
        before, "modelium_cold_start_wait_seconds_count"
    )
    evictions = metric_total(after, "modelium_evictions_total") - metric_total(before, "modelium_evictions_total")
    return {
        "requests": len(results),
        "hit_rate": 1 - len(misses) / len(results),
        "waited_by_gateway": waited,
        "cold_p50": percentile(misses, 0.5),
        "cold_p99": percentile(misses, 0.99),
        "hit_p50_ms": statistics.median(hits or [0.0]) * 1000,
        "evictions_per_min": evictions / minutes,
        "failed": failed,
        "minutes": minutes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--policies", default="score,lru")
    parser.add_argument("--miss-seconds", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()
    sequence = zipf_sequence(args.requests, args.seed)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="modelium-churn-") as tmp:
        workdir = Path(tmp)
        template = write_demo_model(workdir / "template")
        booking = analyze_directory(template, "probe").memory_estimates["embedded"]
        capacity = ROOM_FOR * booking + booking // 2
        distinct = len(set(sequence))
        print(
            f"{MODELS} models, room for {ROOM_FOR}; {args.requests} requests (Zipf s={ZIPF_S}, {distinct} distinct "
            f"models asked), {args.clients} clients",
            flush=True,
        )
        for policy in args.policies.split(","):
            rows[policy] = run(policy, workdir, template, capacity, sequence, args)
            print(f"{policy}: {rows[policy]}", flush=True)
    print()
    print(
        f"{'policy':>7} {'hit rate':>9} {'waited':>7} {'cold p50':>9} {'cold p99':>9} {'hit p50':>8} "
        f"{'evict/min':>10} {'failed':>7} {'minutes':>8}"
    )
    for policy, r in rows.items():
        print(
            f"{policy:>7} {r['hit_rate']:>9.1%} {r['waited_by_gateway']:>7.0f} {r['cold_p50']:>8.2f}s "
            f"{r['cold_p99']:>8.2f}s {r['hit_p50_ms']:>6.1f}ms {r['evictions_per_min']:>10.1f} {r['failed']:>7} "
            f"{r['minutes']:>8.1f}"
        )


if __name__ == "__main__":
    main()
