"""Where a cold start's time goes, and what the warm pool takes off it.

For the demo model and locally generated GPT-2s of ~100 MB and ~1 GB of fp32 weights (random
weights, no download), on this machine:

1. **Phases**, each in a fresh interpreter (`--probe`): process start, imports (torch, transformers
   and the modelling code every load needs), the model built on the `meta` device (no memory),
   the whole `from_pretrained` (weights read, model built and filled), and the first token.
   Caches are dropped for the model's files first (fsync, then POSIX_FADV_DONTNEED: no root
   needed), so the read is from the disk; the same load is then repeated from the page cache.
2. **Weight-read bandwidth**: the weights' bytes over the time `from_pretrained` and the first
   token took, against a plain sequential read of the same files (cold and from the page cache).
3. **The runtime**: the embedded runtime adapter's load until it answers one token, started cold
   (`warm_pool: 0`) and handed to a warm spare (`warm_pool: 1`); the spare's resident memory (what
   the pool books); the analyzer's estimate against the model's warmed footprint.
4. **Through the gateway** (`modelium serve`, warm pool on): a client's request to the unloaded
   demo model against the load time the workflow recorded for that load.

    .venv/bin/python bench/cold_start.py [--sizes demo,100mb,1gb] [--runs 3]

`--runtime vllm` measures vLLM instead, on a GPU (`vllm serve`, or `--vllm-command`): a cold start
until one token is answered, then per run a park (level 1 sleep), the GPU memory NVML sees held
awake and asleep, and a wake until one token. Without a GPU, `--vllm-command "python
tests/standins/vllm_serve.py serve {model_dir}"` runs the same steps against the stand-in (on the
CPU: its timings say nothing about vLLM, only that the script works).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

MIB = 2**20
# (label, layers, width): GPT-2s of ~190 KB, ~100 MB and ~1 GB of fp32 weights.
SIZES = {"demo": (2, 32), "100mb": (8, 512), "1gb": (16, 1152)}


def weight_files(model_dir: Path) -> list[Path]:
    return sorted(p for p in model_dir.iterdir() if p.suffix == ".safetensors")


def drop_cache(paths: list[Path]) -> None:
    """Evict these files from the page cache (their next read comes from the disk)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def plain_read(paths: list[Path]) -> float:
    """Seconds to read these files sequentially, 16 MiB at a time, into nothing."""
    started = time.perf_counter()
    for path in paths:
        with path.open("rb", buffering=0) as fh:
            while fh.read(16 * MIB):
                pass
    return time.perf_counter() - started


# -- 1. the phases, in a fresh interpreter ---------------------------------------------------------
def probe(model_dir: str, spawned_at: float) -> None:
    """Runs in the child (`--probe`): prints one JSON line of phase timings."""
    entered = time.time()
    t0 = time.perf_counter()
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from modelium.runtimes.embedded_server.engine import warm_imports

    warm_imports()
    t1 = time.perf_counter()
    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        AutoModelForCausalLM.from_config(config)
    t2 = time.perf_counter()
    paths = weight_files(Path(model_dir))
    drop_cache(paths)
    t3 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto").eval()
    t4 = time.perf_counter()
    inputs = tokenizer("Hello", return_tensors="pt")
    with torch.inference_mode():
        model.generate(**inputs, max_new_tokens=1, pad_token_id=tokenizer.eos_token_id)
    t5 = time.perf_counter()
    del model
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto").eval()
    t6 = time.perf_counter()
    with torch.inference_mode():
        model.generate(**inputs, max_new_tokens=1, pad_token_id=tokenizer.eos_token_id)
    t7 = time.perf_counter()
    print(
        json.dumps(
            {
                "process_start": entered - spawned_at,
                "imports": t1 - t0,
                "build_meta": t2 - t1,
                "load_cold": t4 - t3,
                "first_token_cold": t5 - t4,
                "load_cached": t6 - t5,
                "first_token_cached": t7 - t6,
            }
        ),
        flush=True,
    )


def run_probe(model_dir: Path) -> dict[str, float]:
    spawned = time.time()
    out = subprocess.run(
        [sys.executable, __file__, "--probe", str(model_dir), str(spawned)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1"},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


# -- 3. the runtime adapter, cold and from a warm spare --------------------------------------------
async def runtime_loads(model_dir: Path, runs: int, work: Path) -> dict[str, Any]:
    from modelium.analyzer import analyze_directory
    from modelium.config import EmbeddedRuntime
    from modelium.gpu import process_tree, resident_bytes
    from modelium.runtimes.embedded import EmbeddedRuntimeAdapter
    from modelium.types import Booking, LoadRequest

    name = model_dir.name
    estimate = analyze_directory(model_dir, name).memory_estimates["embedded"]
    request = LoadRequest(name, str(model_dir), "embedded", "text-generation", Booking(name, "bench", "cpu", estimate))
    body = {"model": name, "prompt": "Hello", "max_tokens": 1}
    out: dict[str, Any] = {"estimate": estimate}
    for pool in (0, 1):
        adapter = EmbeddedRuntimeAdapter("bench", work / f"logs-{pool}", EmbeddedRuntime(warm_pool=pool))
        adapter.start_pool()
        times, spare_rss, footprint = [], [], 0
        try:
            for _ in range(runs):
                if pool:
                    while not adapter.pool.ready():  # the spare's imports: not part of the load
                        await asyncio.sleep(0.05)
                    spare_rss.append(resident_bytes(process_tree(adapter.pool.ready()[0])))
                started = time.perf_counter()
                endpoint = await adapter.start(request, progress=lambda *_: None)
                async with httpx.AsyncClient(timeout=600) as http:
                    (await http.post(f"{endpoint.url}/v1/completions", json=body)).raise_for_status()
                times.append(time.perf_counter() - started)
                assert endpoint.pid is not None
                footprint = resident_bytes(process_tree(endpoint.pid))  # after one token: warmed
                await adapter.stop(name)
        finally:
            await adapter.stop_all()
        out[f"pool{pool}"] = statistics.median(times)
        if spare_rss:
            out["spare_rss"] = statistics.median(spare_rss)
        out["footprint"] = footprint
    return out


# -- 4. through the gateway ------------------------------------------------------------------------
def gateway_cold_requests(model_dir: Path, runs: int, work: Path) -> list[tuple[float, float]]:
    """(client's cold request, the load time the workflow recorded) per run."""
    from harness import modelium_serve, wait_phase

    rows = []
    with modelium_serve(work, "gateway", runtimes={"embedded": {"warm_pool": 1}}) as served:
        name = "cold"
        shutil.copytree(model_dir, served.incoming / name)
        wait_phase(served.url, name, "loaded")
        records = work / "state-gateway" / "nodes"
        body = {"model": name, "prompt": "Hello", "max_tokens": 1}
        with httpx.Client(base_url=served.url, timeout=120) as http:
            for _ in range(runs):
                http.post(f"/models/{name}/unload", json={"wait": True}).raise_for_status()
                wait_phase(served.url, name, "unloaded")
                wait_spare_ready(records)
                started = time.perf_counter()
                http.post("/v1/completions", json=body).raise_for_status()
                took = time.perf_counter() - started
                load = http.get(f"/models/{name}").json()["load_seconds"]
                rows.append((took, float(load)))
    return rows


def wait_spare_ready(nodes: Path, timeout: float = 120.0) -> None:
    """Until a spare's record exists and the spare answers that it waits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for record in nodes.glob("*/runtimes/embedded/~spare-*.json"):
            try:
                url = json.loads(record.read_text())["endpoint"]["url"]
                if httpx.get(f"{url}/spare", timeout=2).json().get("state") == "waiting":
                    return
            except (OSError, ValueError, KeyError, httpx.HTTPError):
                pass
        time.sleep(0.05)
    raise SystemExit(f"no warm spare became ready under {nodes} in {timeout:.0f}s")


# -- vLLM: cold start, park and wake ----------------------------------------------------------------
async def vllm_cycle(model_dir: Path, runs: int, command: list[str], work: Path) -> dict[str, Any]:
    from modelium.config import Vllm
    from modelium.gpu import NvmlReader, gpu_memory_held, process_tree
    from modelium.runtimes.process import free_port
    from modelium.runtimes.vllm import VllmRuntimeAdapter
    from modelium.types import Booking, LoadRequest

    reader = NvmlReader()
    gpus = reader.gpus()
    total = gpus[0].total_bytes if gpus else 80 * 2**30  # the stand-in on a machine without one
    first = free_port()
    config = Vllm(enabled=True, command=command, port_range=(first, first + 20), park="sleep")
    adapter = VllmRuntimeAdapter("bench", work / "vllm-logs", config, {"cuda:0": total}, reader if gpus else None)
    name = model_dir.name
    request = LoadRequest(name, str(model_dir), "vllm", "text-generation", Booking(name, "bench", "cuda:0", total // 4))

    def held(pid: int | None) -> int:
        return sum(gpu_memory_held(reader, process_tree(pid)).values()) if gpus and pid else 0

    body = {"model": name, "prompt": "Hello", "max_tokens": 1}
    parks, wakes, asleep = [], [], []
    try:
        started = time.perf_counter()
        endpoint = await adapter.start(request, lambda *_: None)
        async with httpx.AsyncClient(base_url=endpoint.url, timeout=600) as http:
            (await http.post("/v1/completions", json=body)).raise_for_status()
            cold = time.perf_counter() - started
            awake = held(endpoint.pid)
            for _ in range(runs):
                started = time.perf_counter()
                await adapter.park(name)
                parks.append(time.perf_counter() - started)
                asleep.append(held(endpoint.pid))
                started = time.perf_counter()
                await adapter.wake(name)
                (await http.post("/v1/completions", json=body)).raise_for_status()
                wakes.append(time.perf_counter() - started)
    finally:
        await adapter.stop_all()
    return {
        "cold": cold,
        "park": statistics.median(parks),
        "wake": statistics.median(wakes),
        "awake": awake,
        "asleep": statistics.median(asleep),
        "gpu": bool(gpus),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=",".join(SIZES))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--runtime", choices=("embedded", "vllm"), default="embedded")
    parser.add_argument("--vllm-command", default="vllm serve {model_dir}", help="with --runtime vllm")
    parser.add_argument("--probe", nargs=2, metavar=("MODEL_DIR", "SPAWNED_AT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        probe(args.probe[0], float(args.probe[1]))
        return
    from cli.demo import write_demo_model

    sizes = [s for s in args.sizes.split(",") if s]
    if args.runtime == "vllm":
        with tempfile.TemporaryDirectory() as tmp:
            rows = {}
            for label in sizes:
                layers, width = SIZES[label]
                model_dir = write_demo_model(Path(tmp) / f"gpt2-{label}", layers=layers, width=width)
                rows[label] = asyncio.run(vllm_cycle(model_dir, args.runs, args.vllm_command.split(), Path(tmp)))
        report_vllm(rows, args.vllm_command)
        return
    with tempfile.TemporaryDirectory(dir=ROOT / ".bench-tmp" if (ROOT / ".bench-tmp").is_dir() else None) as tmp:
        work = Path(tmp)
        phases, reads, loads = {}, {}, {}
        for label in sizes:
            layers, width = SIZES[label]
            model_dir = write_demo_model(work / f"gpt2-{label}", layers=layers, width=width)
            files = weight_files(model_dir)
            nbytes = sum(p.stat().st_size for p in files)
            probes = [run_probe(model_dir) for _ in range(args.runs)]
            phases[label] = {k: statistics.median(p[k] for p in probes) for k in probes[0]}
            drop_cache(files)
            cold = plain_read(files)
            cached = min(plain_read(files) for _ in range(3))
            reads[label] = (nbytes, cold, cached)
            loads[label] = asyncio.run(runtime_loads(model_dir, args.runs, work))
            print(f"measured {label}: {nbytes / MIB:.1f} MiB of weights", flush=True)
        gateway = gateway_cold_requests(work / "gpt2-demo", args.runs, work) if "demo" in sizes else []
    report(phases, reads, loads, gateway)


def report_vllm(rows: dict[str, dict[str, Any]], command: str) -> None:
    ms = lambda s: f"{s * 1000:,.0f} ms"  # noqa: E731
    print(f"\nvLLM ({command}): cold start, park (sleep level 1) and wake, medians")
    print(f"{'model':<7} {'cold → 1 token':>15} {'park':>8} {'wake → 1 token':>15} {'GPU awake':>10} {'asleep':>8}")
    for label, r in rows.items():
        mib = (lambda b: f"{b / MIB:,.0f}Mi") if r["gpu"] else (lambda b: "no GPU")
        print(
            f"{label:<7} {ms(r['cold']):>15} {ms(r['park']):>8} {ms(r['wake']):>15} {mib(r['awake']):>10} "
            f"{mib(r['asleep']):>8}"
        )


def _gbps(nbytes: int, seconds: float) -> str:
    return f"{nbytes / seconds / 2**30:.2f} GB/s"


def report(
    phases: dict[str, dict[str, float]],
    reads: dict[str, tuple[int, float, float]],
    loads: dict[str, dict[str, Any]],
    gateway: list[tuple[float, float]],
) -> None:
    ms = lambda s: f"{s * 1000:,.0f} ms"  # noqa: E731
    print("\n1. Phases of a cold load in a fresh process (medians; weights read from the disk)")
    print(
        f"{'model':<7} {'weights':>9} {'start':>7} {'imports':>9} {'build':>7} {'from_pretrained':>16} "
        f"{'first token':>12} {'  from cache:':>13} {'load':>8} {'token':>7}"
    )
    for label, p in phases.items():
        print(
            f"{label:<7} {reads[label][0] / MIB:>7.1f}Mi {ms(p['process_start']):>7} {ms(p['imports']):>9} "
            f"{ms(p['build_meta']):>7} {ms(p['load_cold']):>16} {ms(p['first_token_cold']):>12} {'':>13} "
            f"{ms(p['load_cached']):>8} {ms(p['first_token_cached']):>7}"
        )
    print("\n2. Weight-read bandwidth: from_pretrained + first token, against a plain read of the files")
    print(
        f"{'model':<7} {'plain cold':>11} {'load cold':>10} {'ratio':>6} {'plain cached':>13} "
        f"{'load cached':>12} {'ratio':>6}"
    )
    for label, (nbytes, cold, cached) in reads.items():
        p = phases[label]
        load_cold = p["load_cold"] + p["first_token_cold"]
        load_cached = p["load_cached"] + p["first_token_cached"]
        cold_gb, load_cold_gb = _gbps(nbytes, cold), _gbps(nbytes, load_cold)
        cached_gb, load_cached_gb = _gbps(nbytes, cached), _gbps(nbytes, load_cached)
        print(
            f"{label:<7} {cold_gb:>11} {load_cold_gb:>10} {cold / load_cold:>6.0%} {cached_gb:>13} "
            f"{load_cached_gb:>12} {cached / load_cached:>6.0%}"
        )
    print("\n3. The embedded runtime: load until one token answered (medians)")
    print(
        f"{'model':<7} {'cold process':>13} {'warm spare':>11} {'faster':>7} {'spare RSS':>10} "
        f"{'estimate':>9} {'footprint':>10} {'error':>6}"
    )
    for label, r in loads.items():
        error = (r["estimate"] - r["footprint"]) / r["footprint"]
        print(
            f"{label:<7} {ms(r['pool0']):>13} {ms(r['pool1']):>11} {r['pool0'] / r['pool1']:>6.1f}x "
            f"{r.get('spare_rss', 0) / MIB:>8.0f}Mi {r['estimate'] / MIB:>7.0f}Mi {r['footprint'] / MIB:>8.0f}Mi "
            f"{error:>+6.0%}"
        )
    if gateway:
        print("\n4. A client's request to the unloaded demo model through the gateway (warm pool on)")
        print(f"{'run':<4} {'cold request':>13} {'load (workflow)':>16} {'request - load':>15}")
        for i, (took, load) in enumerate(gateway, 1):
            print(f"{i:<4} {ms(took):>13} {ms(load):>16} {ms(took - load):>15}")


if __name__ == "__main__":
    main()
