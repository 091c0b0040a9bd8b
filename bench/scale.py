"""How the control plane scales with the number of models: 1 (baseline) and then each N of
`--models`, each on a fresh `modelium serve` whose node has room for 5 models.

Model directories are the demo GPT-2, hard-linked (every directory shares the same weight files,
so 10,000 models take no more disk than one). For each N it prints:

- time until every model is registered and at rest (listed, each `loaded` or `unloaded`);
- resident memory of Temporal and of `serve` (control worker, node agent, watcher, gateway);
- Temporal's database size per model;
- `GET /models` p50, the full list and one page of 100;
- `/v1/completions` p50 to one hot model, against N = 1 in the same run;
- control-plane CPU-seconds per idle minute (Temporal + `serve`, nobody asking);
- loads and evictions during that idle minute.

    .venv/bin/python bench/scale.py --models 100,1000,10000 [--idle-seconds 60]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import Served, modelium_serve  # noqa: E402
from cli.demo import write_demo_model  # noqa: E402
from modelium.analyzer import analyze_directory  # noqa: E402
from modelium.gpu import resident_bytes  # noqa: E402

ROOM_FOR = 5
_TICKS = os.sysconf("SC_CLK_TCK")


def link_models(template: Path, incoming: Path, n: int) -> None:
    """n model directories whose files are hard links to the template's."""
    files = [p for p in template.rglob("*") if p.is_file()]
    for i in range(n):
        # Written under a dot name and renamed, as a copy tool would: the watcher sees it whole.
        tmp = incoming / f".m{i:05d}"
        for f in files:
            dest = tmp / f.relative_to(template)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.link(f, dest)
        tmp.rename(incoming / f"m{i:05d}")


def cpu_seconds(pids: set[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / _TICKS


def control_plane(served: Served, state_dir: Path) -> tuple[int, set[int]]:
    """(pid of Temporal, pids of Temporal and serve): runtime processes are not counted. The
    embedded Temporal runs in its own session (it outlives a killed serve), so it is found by
    its database file rather than as serve's child."""
    db = str(state_dir / "temporal" / "temporal.db").encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"start-dev" in cmd and db in cmd:
            return int(entry.name), {served.proc.pid, int(entry.name)}
    raise SystemExit(f"no Temporal dev server with {db.decode()}")


def metric_total(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def p50(samples: list[float]) -> float:
    return statistics.median(samples)


def timed_get(http: httpx.Client, url: str, **params: Any) -> tuple[float, httpx.Response]:
    started = time.perf_counter()
    response = http.get(url, params=params)
    took = time.perf_counter() - started
    if response.status_code != 200:
        raise SystemExit(f"GET {url} answered {response.status_code}: {response.text[:300]}")
    return took, response


def run(n: int, workdir: Path, template: Path, capacity: int, idle_seconds: float) -> dict[str, float]:
    tag = f"n{n}"
    config = {
        "node": {"cpu_memory_budget_bytes": capacity},
        "runtimes": {"embedded": {"cpu_threads": 1}},
        "orchestration": {
            "model_discovery": {"watch_directories": [str(workdir / f"incoming-{tag}")], "settle_seconds": 1.0}
        },
    }
    with modelium_serve(workdir, tag, **config) as served, httpx.Client(timeout=600) as http:
        started = time.monotonic()
        link_models(template, served.incoming, n)
        linked = time.monotonic() - started
        refused = 0
        while True:
            response = http.get(f"{served.url}/models")
            if response.status_code != 200:
                # Counted and printed: a busy control plane may answer 503 (retry) meanwhile.
                refused += 1
                print(
                    f"N={n}: GET /models answered {response.status_code} while registering: {response.text[:200]}",
                    flush=True,
                )
                time.sleep(5.0)
                continue
            models = response.json()["models"]
            phases = [m["phase"] for m in models]
            # At rest: every model listed, none on its way anywhere. (Those preloaded first may
            # have been unloaded for idleness already when registration takes over 5 minutes.)
            if len(models) == n and set(phases) <= {"loaded", "unloaded"}:
                break
            if time.monotonic() - started > 3600:
                raise SystemExit(f"N={n}: not at rest after an hour ({len(models)} listed)")
            time.sleep(1.0 if n < 1000 else 5.0)
        registered = time.monotonic() - started
        loaded = [m["name"] for m in models if m["phase"] == "loaded"]
        hot = loaded[0] if loaded else models[0]["name"]  # a request loads it, if need be

        full = [timed_get(http, f"{served.url}/models")[0] for _ in range(7)]
        page = [timed_get(http, f"{served.url}/models", limit=100)[0] for _ in range(15)]
        body = {"model": hot, "prompt": "Hello", "max_tokens": 1}
        for _ in range(20):
            http.post(f"{served.url}/v1/completions", json=body)
        latencies = []
        for _ in range(200):
            t0 = time.perf_counter()
            answer = http.post(f"{served.url}/v1/completions", json=body)
            latencies.append(time.perf_counter() - t0)
            if answer.status_code != 200:
                raise SystemExit(f"completion answered {answer.status_code}: {answer.text[:300]}")

        temporal, pids = control_plane(served, workdir / f"state-{tag}")
        # Idle: settle a moment after the last request, then measure a quiet stretch.
        time.sleep(5)
        before_metrics = http.get(served.metrics_url).text
        cpu_before, temporal_before = cpu_seconds(pids), cpu_seconds({temporal})
        time.sleep(idle_seconds)
        cpu_idle = cpu_seconds(pids) - cpu_before
        temporal_idle = cpu_seconds({temporal}) - temporal_before
        after_metrics = http.get(served.metrics_url).text
        loads = metric_total(after_metrics, "modelium_model_load_duration_seconds_count") - metric_total(
            before_metrics, "modelium_model_load_duration_seconds_count"
        )
        evictions = metric_total(after_metrics, "modelium_evictions_total") - metric_total(
            before_metrics, "modelium_evictions_total"
        )
        db = Path(workdir / f"state-{tag}" / "temporal")
        db_bytes = sum(p.stat().st_size for p in db.glob("temporal.db*"))
        return {
            "n": n,
            "linked_s": linked,
            "registered_s": registered,
            "temporal_rss_mib": resident_bytes({temporal}) / 2**20,
            "serve_rss_mib": resident_bytes({served.proc.pid}) / 2**20,
            "db_kib_per_model": db_bytes / 1024 / n,
            "list_full_p50_s": p50(full),
            "list_page_p50_ms": p50(page) * 1000,
            "hot_p50_ms": p50(latencies) * 1000,
            "idle_cpu_s_per_min": cpu_idle * 60 / idle_seconds,
            "idle_cpu_temporal_s_per_min": temporal_idle * 60 / idle_seconds,
            "idle_loads_per_min": loads * 60 / idle_seconds,
            "idle_evictions_per_min": evictions * 60 / idle_seconds,
            "list_refused_while_registering": refused,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="100,1000", help="comma-separated model counts (default 100,1000)")
    parser.add_argument("--idle-seconds", type=float, default=60.0, help="length of the idle measurement")
    args = parser.parse_args()
    counts = [int(c) for c in args.models.split(",") if c]
    with tempfile.TemporaryDirectory(prefix="modelium-scale-") as tmp:
        workdir = Path(tmp)
        template = write_demo_model(workdir / "template")
        booking = analyze_directory(template, "probe").memory_estimates["embedded"]
        capacity = ROOM_FOR * booking + booking // 2
        print(
            f"node: room for {ROOM_FOR} models ({capacity / 2**20:.0f} MiB, {booking / 2**20:.0f} MiB each); "
            f"{os.cpu_count()} cores",
            flush=True,
        )
        rows = [run(1, workdir, template, capacity, args.idle_seconds)]
        print(f"N=1 done: {rows[0]}", flush=True)
        for n in counts:
            rows.append(run(n, workdir, template, capacity, args.idle_seconds))
            print(f"N={n} done: {rows[-1]}", flush=True)
    base = rows[0]["hot_p50_ms"]
    header = (
        f"{'N':>6} {'at rest':>9} {'Temporal':>9} {'serve':>8} {'DB/model':>9} {'list all':>9} "
        f"{'page 100':>9} {'hot p50':>8} {'vs N=1':>7} {'idle CPU':>9} {'loads':>6} {'evicts':>6}"
    )
    print()
    print(header)
    print(
        f"{'':>6} {'s':>9} {'MiB':>9} {'MiB':>8} {'KiB':>9} {'s p50':>9} {'ms p50':>9} {'ms':>8} {'':>7} "
        f"{'% core':>9} {'/min':>6} {'/min':>6}"
    )
    for r in rows:
        print(
            f"{r['n']:>6} {r['registered_s']:>9.1f} {r['temporal_rss_mib']:>9.0f} {r['serve_rss_mib']:>8.0f} "
            f"{r['db_kib_per_model']:>9.1f} {r['list_full_p50_s']:>9.3f} {r['list_page_p50_ms']:>9.1f} "
            f"{r['hot_p50_ms']:>8.2f} {r['hot_p50_ms'] / base:>7.2f} {r['idle_cpu_s_per_min'] / 60 * 100:>8.2f}% "
            f"{r['idle_loads_per_min']:>6.1f} {r['idle_evictions_per_min']:>6.1f}"
        )


if __name__ == "__main__":
    main()
