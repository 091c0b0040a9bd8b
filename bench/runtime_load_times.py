"""Load and unload times of each runtime adapter on this machine, for a tiny locally made model.

Each adapter loads the model, answers one request, and unloads it, `--repeats` times; the first
load of Triton and Ray Serve includes starting their server or cluster and is shown apart.
vLLM cannot run without a GPU: on such a machine its row is the stand-in (the embedded server
behind vLLM's command line, tests/standins/vllm_serve.py) and says so.

    .venv/bin/python bench/runtime_load_times.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cli.demo import write_demo_model  # noqa: E402
from modelium.config import RayServe, Triton, Vllm  # noqa: E402
from modelium.runtimes.embedded import EmbeddedRuntimeAdapter  # noqa: E402
from modelium.runtimes.process import free_port  # noqa: E402
from modelium.runtimes.ray_serve import RayServeRuntimeAdapter  # noqa: E402
from modelium.runtimes.triton import TritonRuntimeAdapter, find_binary  # noqa: E402
from modelium.runtimes.vllm import VllmRuntimeAdapter  # noqa: E402
from modelium.types import Booking, Endpoint, LoadRequest  # noqa: E402

GIB = 2**30


async def _ask(endpoint: Endpoint, model: str) -> None:
    async with httpx.AsyncClient(timeout=120) as http:
        if endpoint.protocol == "openai":
            r = await http.post(
                f"{endpoint.url}/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 2}
            )
        elif endpoint.protocol == "kserve-v2":
            body = {"inputs": [{"name": "TEXT", "shape": [1], "datatype": "BYTES", "data": ["good"]}]}
            r = await http.post(f"{endpoint.url}/v2/models/{model}/infer", json=body)
        else:
            r = await http.post(f"{endpoint.url}/predict", json={"inputs": "good"})
        r.raise_for_status()


async def measure(name: str, adapter: Any, request: Callable[[int], LoadRequest], repeats: int) -> list[str]:
    loads, unloads = [], []
    try:
        for i in range(repeats):
            req = request(i)
            started = time.monotonic()
            endpoint = await adapter.start(req, progress=lambda *_: None)
            loads.append(time.monotonic() - started)
            await _ask(endpoint, req.model)
            started = time.monotonic()
            await adapter.stop(req.model)
            unloads.append(time.monotonic() - started)
    finally:
        await adapter.stop_all()
    first = f"{loads[0]:.2f}s"
    rest = f"{statistics.median(loads[1:]):.2f}s" if len(loads) > 1 else "-"
    return [name, first, rest, f"{statistics.median(unloads):.2f}s"]


async def main(repeats: int) -> None:
    root = Path(tempfile.mkdtemp(prefix="modelium-bench-"))
    gen = write_demo_model(root / "gpt2")
    cls = write_demo_model(root / "bert", task="text-classification")
    rows: list[list[str]] = []
    runs: list[tuple[str, Any, Callable[[int], LoadRequest]]] = []

    def req(model: Path, task: str, runtime: str, device: str = "cpu") -> Callable[[int], LoadRequest]:
        return lambda i: LoadRequest(f"m{i}", str(model), runtime, task, Booking(f"m{i}", "n", device, 20 * GIB))

    runs.append(
        ("embedded (GPT-2, CPU)", EmbeddedRuntimeAdapter("n", root / "logs"), req(gen, "text-generation", "embedded"))
    )
    standin = [sys.executable, str(ROOT / "tests" / "standins" / "vllm_serve.py"), "serve", "{model_dir}"]
    first = free_port()
    vllm = VllmRuntimeAdapter(
        "n", root / "logs", Vllm(enabled=True, command=standin, port_range=(first, first + 10)), {"cuda:0": 80 * GIB}
    )
    runs.append(("vllm STAND-IN (no GPU here)", vllm, req(gen, "text-generation", "vllm", "cuda:0")))
    if find_binary("auto") is not None:
        triton = TritonRuntimeAdapter("n", root / "triton", root / "logs", Triton(enabled=True))
        runs.append(("triton (BERT, python backend)", triton, req(cls, "text-classification", "triton")))
    try:
        import ray  # noqa: F401

        ray_adapter = RayServeRuntimeAdapter(
            "n", root / "ray", root / "logs", RayServe(enabled=True, http_port=free_port(), num_cpus=2)
        )
        runs.append(("ray serve (BERT, local Ray)", ray_adapter, req(cls, "text-classification", "ray_serve")))
    except ImportError:
        print("ray is not installed: skipping Ray Serve")
    for name, adapter, make in runs:
        print(f"measuring {name} ...", flush=True)
        rows.append(await measure(name, adapter, make, repeats))
    shutil.rmtree(root, ignore_errors=True)
    print(f"\n{'runtime':<32} {'first load':>12} {'later loads':>12} {'unload':>8}   (median of {repeats})")
    for row in rows:
        print(f"{row[0]:<32} {row[1]:>12} {row[2]:>12} {row[3]:>8}")
    print("\nfirst load: Triton and Ray Serve include starting tritonserver / the Ray cluster")


def run(coro: Awaitable[None]) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    run(main(parser.parse_args().repeats))
