"""What every format's analysis shares: the error a broken directory raises, JSON reading that
names the file, and the analysis of a model the analyzer knows only as files (ONNX, Triton)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from modelium import memory
from modelium.types import Modality, ModelAnalysis, ModelFormat, Task


class ModelDirectoryError(ValueError):
    """The directory cannot be served as it is; the message says why and what to fix."""


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelDirectoryError(
            f"{path.name} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
            "the copy may be incomplete"
        ) from None
    except UnicodeDecodeError:
        raise ModelDirectoryError(f"{path.name} is not UTF-8 text") from None


def card_str(value: Any) -> str | None:
    if isinstance(value, list):
        value = ", ".join(str(v) for v in value)
    return str(value) if value not in (None, "") else None


def custom_analysis(
    directory: Path, name: str, fmt: ModelFormat, kind: str, main_file: str, weight_bytes: int, details: dict[str, str]
) -> ModelAnalysis:
    estimates = {
        runtime: int(weight_bytes * (1 + p.weight_slack)) + p.overhead_bytes for runtime, p in memory.PROFILES.items()
    }
    return ModelAnalysis(
        name=name,
        path=str(directory.resolve()),
        format=fmt,
        architecture=kind,
        model_type=fmt,
        task=Task.CUSTOM,
        modality=Modality.UNKNOWN,
        weight_files=[main_file],
        weight_bytes=weight_bytes,
        memory_estimate_bytes=estimates["embedded"],
        memory_estimates=estimates,
        details=details,
    )
