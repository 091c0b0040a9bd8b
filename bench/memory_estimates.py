"""How far the analyzer's memory estimate is from what a loaded model really takes.

Writes models locally (random weights, 1 M to 1 B parameters), analyzes each (no weights read),
serves each with the embedded runtime and measures the resident memory of its process tree three
times: right after the load, after the node agent's one-token warm-up request (what a load
reports), and the peak over three longer requests (what the node then tracks and books). On a
GPU node the node agent reads NVML instead. Prints the estimate's error against the warmed peak.

    .venv/bin/python bench/memory_estimates.py [--device cpu] [--only gpt2-1m,gpt2-10m]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cli.demo import write_demo_model  # noqa: E402
from modelium.analyzer import analyze_directory  # noqa: E402
from modelium.gpu import process_tree, resident_bytes  # noqa: E402
from modelium.runtimes.embedded import EmbeddedRuntimeAdapter  # noqa: E402
from modelium.types import Booking, EndpointProtocol, LoadRequest  # noqa: E402

MIB = 2**20
# (name, task, layers, width): GPT-2s of about 1 M, 10 M, 100 M and 1 B parameters
# (12 x layers x width^2), and two BERT classifiers.
MODELS = [
    ("gpt2-1m", "text-generation", 2, 200),
    ("gpt2-10m", "text-generation", 4, 456),
    ("gpt2-100m", "text-generation", 12, 832),
    ("gpt2-1b", "text-generation", 24, 1856),
    ("bert-cls-tiny", "text-classification", 2, 32),
    ("bert-cls-wide", "text-classification", 6, 512),
]


def rss(pid: int | None) -> int:
    assert pid is not None
    return resident_bytes(process_tree(pid))


async def measure(root: Path, device: str, only: set[str]) -> list[tuple[str, int, int, int, int, int]]:
    """Per model: (name, parameters, estimate, resident after the load, after one warm-up
    request, and the peak over three longer requests)."""
    adapter = EmbeddedRuntimeAdapter("bench", root / "logs")
    rows = []
    for name, task, layers, width in MODELS:
        if only and name not in only:
            continue
        path = write_demo_model(root / name, task=task, layers=layers, width=width)
        analysis = analyze_directory(path, name)
        estimate = analysis.memory_estimates["embedded"]
        request = LoadRequest(name, str(path), "embedded", task, Booking(name, "bench", device, estimate))
        endpoint = await adapter.start(request, progress=lambda *_: None)
        try:
            loaded = rss(endpoint.pid)
            # The node agent's warm-up: one token (or one short input), then its first measure.
            assert await adapter.warm_up(endpoint, name)
            warmed = rss(endpoint.pid)
            peak = warmed
            async with httpx.AsyncClient(base_url=endpoint.url, timeout=600) as http:
                for _ in range(3):
                    if endpoint.protocol == EndpointProtocol.OPENAI:
                        body = {"model": name, "prompt": "Hello there, how are you", "max_tokens": 16}
                        (await http.post("/v1/completions", json=body)).raise_for_status()
                    else:
                        (await http.post("/predict", json={"inputs": ["Hello there"] * 8})).raise_for_status()
                    peak = max(peak, rss(endpoint.pid))
        finally:
            await adapter.stop(name)
            shutil.rmtree(path, ignore_errors=True)
        rows.append((name, analysis.parameter_count or 0, estimate, loaded, warmed, peak))
        print(
            f"{name}: estimate {estimate / MIB:.0f} MiB, loaded {loaded / MIB:.0f}, warmed {warmed / MIB:.0f}, "
            f"peak {peak / MIB:.0f}",
            flush=True,
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", default="", help="comma-separated model names from the table")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = asyncio.run(measure(Path(tmp), args.device, set(filter(None, args.only.split(",")))))
    print(
        f"\n{'model':<14} {'params':>13} {'estimate':>9} {'loaded':>8} {'warmed':>8} {'peak':>8} "
        f"{'est. vs peak':>12} {'loaded vs peak':>14}"
    )
    errors = []
    for name, params, estimate, loaded, warmed, peak in rows:
        error = (estimate - peak) / peak
        errors.append(abs(error))
        print(
            f"{name:<14} {params:>13,} {estimate / MIB:>7.0f}Mi {loaded / MIB:>6.0f}Mi {warmed / MIB:>6.0f}Mi "
            f"{peak / MIB:>6.0f}Mi {error:>+12.0%} {(loaded - peak) / peak:>+14.0%}"
        )
    if errors:
        print(
            f"\nestimate against the warmed peak: mean absolute error {sum(errors) / len(errors):.0%}, worst "
            f"{max(errors):.0%} (positive: estimate above the peak)"
        )


if __name__ == "__main__":
    main()
