"""A Triton model repository entry: config.pbtxt and numbered version folders."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from modelium.analyzer.common import ModelDirectoryError, custom_analysis
from modelium.types import ModelAnalysis, ModelFormat


@dataclass
class TritonEntry:
    name: str | None
    platform: str | None
    backend: str | None
    max_batch_size: int | None
    versions: list[str]
    weight_bytes: int


def _pbtxt_scalar(text: str, key: str) -> str | None:
    match = re.search(rf"^\s*{key}\s*:\s*\"?([^\"\n]+?)\"?\s*$", text, re.MULTILINE)
    return match.group(1) if match else None


def read_triton_entry(directory: Path) -> TritonEntry:
    """A Triton model repository entry: `config.pbtxt` and numbered version folders."""
    text = (directory / "config.pbtxt").read_text(encoding="utf-8", errors="replace")
    versions = sorted((p.name for p in directory.iterdir() if p.is_dir() and p.name.isdigit()), key=int)
    if not versions:
        raise ModelDirectoryError(
            "config.pbtxt is here but no numbered version folder (1/, 2/, ...) holds the model files"
        )
    platform, backend = _pbtxt_scalar(text, "platform"), _pbtxt_scalar(text, "backend")
    if not platform and not backend and "ensemble_scheduling" not in text:
        raise ModelDirectoryError("config.pbtxt names neither a platform nor a backend")
    batch = _pbtxt_scalar(text, "max_batch_size")
    weight_bytes = sum(f.stat().st_size for v in versions for f in (directory / v).rglob("*") if f.is_file())
    return TritonEntry(
        name=_pbtxt_scalar(text, "name"),
        platform=platform,
        backend=backend,
        max_batch_size=int(batch) if batch and batch.isdigit() else None,
        versions=versions,
        weight_bytes=weight_bytes,
    )


def analyze_triton(directory: Path, name: str) -> ModelAnalysis:
    entry = read_triton_entry(directory)
    kind = entry.platform or entry.backend or "ensemble"
    return custom_analysis(
        directory,
        name,
        ModelFormat.TRITON,
        kind,
        "config.pbtxt",
        entry.weight_bytes,
        {
            "platform": entry.platform or "",
            "backend": entry.backend or "",
            "versions": ", ".join(entry.versions),
            "max_batch_size": str(entry.max_batch_size),
            "triton_name": entry.name or "",
        },
    )
