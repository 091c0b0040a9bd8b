"""The checks that need an NVIDIA GPU, in one run: NVML's inventory, and for generated models of
real sizes (random weights, written with transformers' `save_pretrained`) the analyzer's memory
estimate against what the embedded runtime really holds on the GPU, and how fast weights load.

Per size it prints and records:
- parameters and weight bytes as the analyzer reads them from the safetensors headers;
- the time to write the checkpoint, and to read every shard straight onto the GPU with
  safetensors (page cache warm: the files were just written), as GB/s;
- the embedded runtime's load on the GPU: seconds from start to a healthy endpoint, the same as
  GB/s of weights, and the GPU memory NVML sees its process tree hold after a one-token warm-up
  request, against the analyzer's estimate (the ratio the node's booking relies on);
- the same load handed to a warm spare of the pool, until one token is answered;
- that the memory is given back once the runtime stops.

    python bench/gpu_check.py [--sizes 0.5b,7b] [--out DIR]

On a machine without a GPU, `--device cpu --sizes tiny` runs the same steps (resident memory
instead of NVML), which is how this script is kept working between GPU runs. It needs torch,
transformers, nvidia-ml-py, httpx, pydantic, PyYAML, starlette and uvicorn; no Temporal.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# The runtime process is `python -m modelium.runtimes.embedded_server`: it must find the repo too.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)

from cli.demo import _tokenizer  # noqa: E402
from modelium.analyzer import analyze_directory  # noqa: E402
from modelium.config import EmbeddedRuntime  # noqa: E402
from modelium.gpu import NvmlReader, gpu_memory_held, process_tree, resident_bytes  # noqa: E402
from modelium.runtimes.embedded import EmbeddedRuntimeAdapter  # noqa: E402
from modelium.types import Booking, LoadRequest, Task  # noqa: E402

GB = 1e9
GIB = 2**30
# Llama-architecture shapes: "0.5b" has Qwen2-0.5B's dimensions (494 M parameters with tied
# embeddings), "7b" Llama-2-7B's (6.74 B); "tiny" is for machines without a GPU.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=400, tie_word_embeddings=True),
    "0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True),
    "7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
               intermediate_size=11008, vocab_size=32000, tie_word_embeddings=False),
}  # fmt: skip


@dataclass
class Row:
    size: str
    parameters: int
    weight_bytes: int
    write_seconds: float
    direct_load_seconds: float
    direct_load_gb_s: float
    runtime_load_seconds: float
    runtime_load_gb_s: float
    warm_spare_seconds: float
    estimate_bytes: int
    measured_bytes: int
    measured_over_estimate: float
    freed: bool


def write_model(directory: Path, size: str, device: str) -> float:
    """A Llama-architecture checkpoint of `size` with random bf16 weights (initialized on the
    device, which is fast), sharded safetensors; the seconds it took."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    started = time.perf_counter()
    tokenizer: Any = _tokenizer(vocab_size=400)
    shape = SIZES[size]
    config = LlamaConfig(
        **shape,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        torch_dtype="bfloat16",
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(directory, max_shard_size="4GB")
    tokenizer.save_pretrained(directory)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return time.perf_counter() - started


def direct_load(directory: Path, device: str) -> float:
    """Seconds to read every shard onto the device with safetensors, synchronized."""
    import torch
    from safetensors.torch import load_file

    started = time.perf_counter()
    tensors = [load_file(str(shard), device=device) for shard in sorted(directory.glob("*.safetensors"))]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    del tensors
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return seconds


async def one_token(url: str, name: str) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        answer = await http.post("/v1/completions", json={"model": name, "prompt": "Hello", "max_tokens": 1})
        answer.raise_for_status()


def held_bytes(reader: NvmlReader, pid: int, device: str) -> int:
    pids = process_tree(pid)
    if device.startswith("cuda"):
        return sum(gpu_memory_held(reader, pids).values())
    return resident_bytes(pids)


async def check_size(size: str, root: Path, device: str, reader: NvmlReader) -> Row:
    directory = root / f"llama-{size}"
    write_seconds = write_model(directory, size, device)
    analysis = analyze_directory(directory, f"llama-{size}")
    assert analysis.parameter_count is not None
    estimate = analysis.memory_estimates["embedded"]
    print(
        f"{size}: {analysis.parameter_count / 1e9:.3f} B parameters, {analysis.weight_bytes / GIB:.2f} GiB of "
        f"weights written in {write_seconds:.1f}s; estimate {estimate / GIB:.2f} GiB",
        flush=True,
    )
    direct = direct_load(directory, device)
    adapter = EmbeddedRuntimeAdapter("gpu-check", root / "logs", EmbeddedRuntime(load_timeout_seconds=1200))
    name = f"llama-{size}"
    request = LoadRequest(
        name, str(directory), "embedded", Task.TEXT_GENERATION, Booking(name, "gpu-check", device, estimate)
    )
    started = time.perf_counter()
    endpoint = await adapter.start(request, lambda *_: None)
    load_seconds = time.perf_counter() - started
    try:
        await one_token(endpoint.url, name)
        assert endpoint.pid is not None
        measured = held_bytes(reader, endpoint.pid, device)
        pid = endpoint.pid
    finally:
        await adapter.stop_all()
    freed = not device.startswith("cuda") or not gpu_memory_held(reader, process_tree(pid))
    # The same load handed to a warm spare (imports done, CUDA not initialised until it is told
    # its GPU), until one token is answered: the cold start the warm pool gives on a GPU.
    pooled = EmbeddedRuntimeAdapter(
        "gpu-check", root / "logs-pool", EmbeddedRuntime(load_timeout_seconds=1200, warm_pool=1)
    )
    pooled.start_pool()
    try:
        while not pooled.pool.ready():
            await asyncio.sleep(0.05)
        started = time.perf_counter()
        endpoint = await pooled.start(request, lambda *_: None)
        await one_token(endpoint.url, name)
        spare_seconds = time.perf_counter() - started
    finally:
        await pooled.stop_all()
    shutil.rmtree(directory, ignore_errors=True)
    weights = analysis.weight_bytes
    return Row(
        size=size,
        parameters=analysis.parameter_count,
        weight_bytes=weights,
        write_seconds=round(write_seconds, 2),
        direct_load_seconds=round(direct, 3),
        direct_load_gb_s=round(weights / GB / direct, 2),
        runtime_load_seconds=round(load_seconds, 2),
        runtime_load_gb_s=round(weights / GB / load_seconds, 2),
        warm_spare_seconds=round(spare_seconds, 2),
        estimate_bytes=estimate,
        measured_bytes=measured,
        measured_over_estimate=round(measured / estimate, 3),
        freed=freed,
    )


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="0.5b,7b", help=f"comma-separated, of {', '.join(SIZES)}")
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--out", type=Path, default=None, help="write gpu_check.json there")
    parser.add_argument("--work", type=Path, default=None, help="where checkpoints are written (default: a temp dir)")
    args = parser.parse_args()
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        parser.error(f"unknown sizes {unknown}; known: {', '.join(SIZES)}")

    reader = NvmlReader()
    gpus = reader.gpus()
    print(f"NVML: {len(gpus)} GPU(s)")
    for g in gpus:
        print(f"  {g.device} {g.name} {g.uuid}: {g.total_bytes / GIB:.1f} GiB, {g.used_bytes / GIB:.2f} GiB used")
    if args.device.startswith("cuda") and not gpus:
        print("no GPU found through NVML; use --device cpu --sizes tiny on a machine without one", file=sys.stderr)
        return 1

    root = Path(tempfile.mkdtemp(prefix="gpu-check-", dir=args.work))
    rows = []
    try:
        for size in sizes:
            row = await check_size(size, root, args.device, reader)
            rows.append(row)
            print(json.dumps(asdict(row)), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    kind = "GPU (NVML)" if args.device.startswith("cuda") else "resident (RSS)"
    print(
        f"\n{'size':>5} {'params':>9} {'weights':>9} {'direct':>9} {'runtime load':>16} "
        f"{'warm spare':>11} {'estimate':>9} {'measured':>9} {'ratio':>6} freed"
    )
    for r in rows:
        print(
            f"{r.size:>5} {r.parameters / 1e9:>8.3f}B {r.weight_bytes / GIB:>7.2f}Gi {r.direct_load_gb_s:>6.2f}GB/s "
            f"{r.runtime_load_seconds:>7.1f}s {r.runtime_load_gb_s:>5.2f}GB/s {r.warm_spare_seconds:>10.2f}s "
            f"{r.estimate_bytes / GIB:>7.2f}Gi "
            f"{r.measured_bytes / GIB:>7.2f}Gi {r.measured_over_estimate:>6.3f} {r.freed}"
        )
    print(f"(measured: {kind} memory of the runtime's process tree after a one-token request)")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        record = {"device": args.device, "gpus": [asdict(g) for g in gpus], "rows": [asdict(r) for r in rows]}
        (args.out / "gpu_check.json").write_text(json.dumps(record, indent=2))
    return 0 if all(r.freed for r in rows) else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
