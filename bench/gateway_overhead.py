"""What the gateway costs: the same requests straight to a runtime endpoint and through the
gateway, at 1, 16, 64 and 256 concurrent clients.

Runs `modelium serve` (subprocess) with the demo GPT-2 on the embedded runtime, reads the
model's endpoint from `GET /models`, then drives both URLs with the same OpenAI completion
request (`max_tokens` 1 by default, so the runtime's own work is small and the gateway's share
shows). The load generator is a minimal keep-alive HTTP/1.1 client on asyncio streams, so that
the client's own cost stays small next to what is measured. Each level runs `--seconds` after a
warm-up, direct and gateway in turn on the same warm runtime, `--repeats` times; the table shows
the run with the median throughput ratio of each level (the machine's noise shows in the spread
line under it). Everything (client, gateway, runtime, Temporal) shares this machine's cores.

It then measures scale from zero: the model is unloaded, one request is sent, and the time it
waited is set against the load time the workflow recorded for that load.

    .venv/bin/python bench/gateway_overhead.py [--seconds 5] [--levels 1,16,64,256]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import modelium_serve, wait_phase  # noqa: E402

from cli.demo import write_demo_model  # noqa: E402

MODEL = "bench-gpt2"


class Connection:
    """One keep-alive HTTP/1.1 connection; enough protocol for JSON POSTs."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        self.writer.write(head + body)
        status = int((await self.reader.readline()).split()[1])
        length, chunked = 0, False
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() == "content-length":
                length = int(value)
            elif name.lower() == "transfer-encoding" and "chunked" in value.lower():
                chunked = True
        if not chunked:
            return status, await self.reader.readexactly(length)
        data = b""
        while size := int((await self.reader.readline()).strip(), 16):
            data += await self.reader.readexactly(size + 2)
        await self.reader.readline()
        return status, data

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


@dataclass
class Result:
    latencies: list[float]
    seconds: float
    errors: int

    @property
    def throughput(self) -> float:
        return len(self.latencies) / self.seconds

    def pct(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def drive(url: str, path: str, body: bytes, clients: int, seconds: float, warmup: float) -> Result:
    latencies: list[float] = []
    errors = 0
    start = time.perf_counter()
    measure_from = start + warmup
    stop_at = measure_from + seconds

    async def client() -> None:
        nonlocal errors
        conn = Connection(url)
        try:
            while (now := time.perf_counter()) < stop_at:
                status, _ = await conn.post(path, body)
                done = time.perf_counter()
                if now >= measure_from:
                    if status == 200:
                        latencies.append(done - now)
                    else:
                        errors += 1
        finally:
            conn.close()

    await asyncio.gather(*(client() for _ in range(clients)))
    return Result(latencies, seconds, errors)


def cold_start(url: str, runs: int) -> list[tuple[float, float]]:
    """(seconds the request waited, seconds the runtime took to load) per run."""
    out = []
    with httpx.Client(base_url=url, timeout=300) as http:
        for _ in range(runs):
            assert http.post(f"/models/{MODEL}/unload").json()["phase"] == "unloaded"
            t0 = time.perf_counter()
            r = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 1})
            waited = time.perf_counter() - t0
            assert r.status_code == 200, r.text
            out.append((waited, float(http.get(f"/models/{MODEL}").json()["load_seconds"])))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--levels", default="1,16,64,256")
    parser.add_argument("--max-tokens", type=int, default=1)
    parser.add_argument("--cold-runs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    body = json.dumps({"model": MODEL, "prompt": "Hello", "max_tokens": args.max_tokens, "temperature": 0}).encode()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        with modelium_serve(workdir, "gw", orchestration={"policies": {"evict_after_idle_seconds": 3600}}) as served:
            write_demo_model(served.incoming / MODEL)
            info = wait_phase(served.url, MODEL, "loaded")
            direct_url = info["endpoint"]["url"]
            rows = []
            for clients in levels:
                runs = []
                for _ in range(args.repeats):
                    d = asyncio.run(drive(direct_url, "/v1/completions", body, clients, args.seconds, args.warmup))
                    g = asyncio.run(drive(served.url, "/v1/completions", body, clients, args.seconds, args.warmup))
                    runs.append((d, g))
                runs.sort(key=lambda r: r[1].throughput / r[0].throughput)
                rows.append((clients, runs))
            colds = cold_start(served.url, args.cold_runs)

    print(
        f"gateway overhead: POST /v1/completions, tiny GPT-2 on CPU, max_tokens {args.max_tokens}, "
        f"{args.seconds:g}s per level"
    )
    print(
        f"{'clients':>7} | {'direct p50':>10} {'p99':>8} {'req/s':>7} | {'gateway p50':>11} {'p99':>8} "
        f"{'req/s':>7} | {'added p50':>9} {'added p99':>9} {'throughput':>10} {'errors':>6}"
    )
    for clients, runs in rows:
        d, g = runs[len(runs) // 2]
        print(
            f"{clients:>7} | {d.pct(0.5) * 1e3:>8.2f}ms {d.pct(0.99) * 1e3:>6.2f}ms {d.throughput:>7.0f} | "
            f"{g.pct(0.5) * 1e3:>9.2f}ms {g.pct(0.99) * 1e3:>6.2f}ms {g.throughput:>7.0f} | "
            f"{(g.pct(0.5) - d.pct(0.5)) * 1e3:>7.2f}ms {(g.pct(0.99) - d.pct(0.99)) * 1e3:>7.2f}ms "
            f"{g.throughput / d.throughput:>10.0%} {d.errors + g.errors:>6}"
        )
    print("\nspread over the repeats (every run): added p50 in ms / throughput ratio")
    for clients, runs in rows:
        spread = ", ".join(f"{(g.pct(0.5) - d.pct(0.5)) * 1e3:.2f}/{g.throughput / d.throughput:.0%}" for d, g in runs)
        print(f"{clients:>7}: {spread}")
    print("\nscale from zero (request to an unloaded model, answered once loaded):")
    for i, (waited, load) in enumerate(colds):
        print(f"  run {i}: waited {waited:.2f}s, runtime load {load:.2f}s, gateway+workflow {waited - load:.2f}s")
    med_wait = statistics.median(w for w, _ in colds)
    med_load = statistics.median(ld for _, ld in colds)
    print(f"  median: waited {med_wait:.2f}s for a {med_load:.2f}s load ({med_wait / med_load:.2f}x)")


if __name__ == "__main__":
    main()
