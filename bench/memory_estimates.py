"""How far the analyzer's memory estimate is from what a loaded model really takes.

Writes small models locally (random weights, several sizes), analyzes each (no weights read),
serves each with the embedded runtime, sends it one request, and measures the resident memory of
its process tree (on CPU; on a GPU node the node agent reads NVML instead). Prints estimate,
measured and the error per model.

    .venv/bin/python bench/memory_estimates.py [--device cpu]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from modelium.analyzer import analyze_directory  # noqa: E402
from modelium.demo import write_demo_model  # noqa: E402
from modelium.gpu import process_tree, resident_bytes  # noqa: E402
from modelium.runtimes.embedded import EmbeddedRuntimeAdapter  # noqa: E402
from modelium.types import Booking, LoadRequest, Protocol  # noqa: E402

MIB = 2**20
# (name, task, layers, width): from the demo's 2-layer GPT-2 to a ~100 M-parameter one.
MODELS = [
    ("gpt2-tiny", "text-generation", 2, 32),
    ("gpt2-small-ish", "text-generation", 4, 256),
    ("gpt2-wide", "text-generation", 12, 768),
    ("bert-cls-tiny", "text-classification", 2, 32),
    ("bert-cls-wide", "text-classification", 6, 512),
]


async def measure(root: Path, device: str) -> list[tuple[str, int, int, int | None]]:
    adapter = EmbeddedRuntimeAdapter("bench", root / "logs")
    rows = []
    for name, task, layers, width in MODELS:
        path = write_demo_model(root / name, task=task, layers=layers, width=width)
        analysis = analyze_directory(path, name)
        estimate = analysis.memory_estimates["embedded"]
        request = LoadRequest(name, str(path), "embedded", task, Booking(name, "bench", device, estimate))
        endpoint = await adapter.start(request, progress=lambda _msg: None)
        try:
            async with httpx.AsyncClient(base_url=endpoint.url, timeout=120) as http:
                if endpoint.protocol == Protocol.OPENAI:
                    body = {"model": name, "prompt": "Hello there", "max_tokens": 16}
                    (await http.post("/v1/completions", json=body)).raise_for_status()
                else:
                    (await http.post("/predict", json={"inputs": "Hello there"})).raise_for_status()
            assert endpoint.pid is not None
            measured = resident_bytes(process_tree(endpoint.pid))
        finally:
            await adapter.stop(name)
        rows.append((name, analysis.parameter_count or 0, estimate, measured))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = asyncio.run(measure(Path(tmp), args.device))
    print(f"\n{'model':<16} {'params':>12} {'estimate':>10} {'measured':>10} {'error':>8}")
    errors = []
    for name, params, estimate, measured in rows:
        if not measured:
            print(f"{name:<16} {params:>12,} {estimate / MIB:>8.0f}Mi {'n/a':>10}")
            continue
        error = (estimate - measured) / measured
        errors.append(abs(error))
        print(f"{name:<16} {params:>12,} {estimate / MIB:>8.0f}Mi {measured / MIB:>8.0f}Mi {error:>+7.0%}")
    if errors:
        print(f"\nmean absolute error {sum(errors) / len(errors):.0%}, worst {max(errors):.0%} "
              "(positive: estimate above measured)")  # fmt: skip


if __name__ == "__main__":
    main()
