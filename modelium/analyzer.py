"""Reads a model directory and says what it is, without loading its weights.

Only metadata is read: config.json, safetensors headers (their first few KB), the tokenizer files'
presence. A directory that cannot be served raises `ModelDirectoryError` with a reason a user can
act on.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import math
import os
import struct
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

from modelium.types import ModelAnalysis, Task

log = logging.getLogger(__name__)

# What a Python process with torch and transformers costs before any weights are loaded.
RUNTIME_OVERHEAD_BYTES = 400 * 1024 * 1024
# Activations, allocator slack and temporary buffers, as a share of the weights.
WEIGHT_SLACK = 0.2

_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}  # fmt: skip
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
# Files that mean a copy or download is still in progress.
PARTIAL_SUFFIXES = (".part", ".partial", ".tmp", ".incomplete", ".crdownload", ".lock")
MAX_HEADER_BYTES = 100 * 1024 * 1024


class ModelDirectoryError(ValueError):
    """The directory cannot be served as it is; the message says why and what to fix."""


def _tables_from_transformers() -> dict[str, Any]:
    """Architecture class name -> task, and the known model types, from transformers' own auto
    mappings. Importing them pulls in torch (seconds), so this runs in a child process."""
    from transformers.models.auto import modeling_auto as auto
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    by_task = (
        (Task.TEXT_GENERATION, auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
        (Task.TEXT_CLASSIFICATION, auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES),
        (Task.FEATURE_EXTRACTION, auto.MODEL_MAPPING_NAMES),
    )
    known: dict[str, str] = {}
    for task, mapping in by_task:
        for names in mapping.values():
            for name in names if isinstance(names, tuple | list) else (names,):
                known.setdefault(name, task)
    return {"architectures": known, "model_types": sorted(CONFIG_MAPPING_NAMES)}


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "modelium"


@lru_cache(maxsize=1)
def _tables() -> dict[str, Any]:
    """The transformers tables, computed once per installed transformers version.

    A child process computes them, so this process neither imports torch nor holds its GIL for
    seconds (which would stall Temporal workflow activations running beside it).
    """
    version = importlib.metadata.version("transformers")
    cache = _cache_dir() / f"transformers-{version}-architectures.json"
    try:
        return json.loads(cache.read_text(encoding="utf-8"))  # type: ignore[no-any-return]
    except (OSError, ValueError):
        pass
    done = subprocess.run(
        [sys.executable, "-m", "modelium.analyzer", "--dump-transformers-tables"],
        capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"could not read transformers' architecture tables:\n{done.stderr}")
    tables: dict[str, Any] = json.loads(done.stdout)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(done.stdout, encoding="utf-8")
        os.replace(tmp, cache)
    except OSError as exc:
        log.warning("could not cache transformers' tables at %s: %s", cache, exc)
    return tables


def _known_architectures() -> dict[str, str]:
    return _tables()["architectures"]  # type: ignore[no-any-return]


@lru_cache(maxsize=1)
def _known_model_types() -> frozenset[str]:
    return frozenset(_tables()["model_types"])


def warm_up() -> None:
    """Load transformers' architecture tables now rather than on the first model."""
    _known_architectures()
    _known_model_types()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelDirectoryError(
            f"{path.name} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
            "the copy may be incomplete"
        ) from None
    except UnicodeDecodeError:
        raise ModelDirectoryError(f"{path.name} is not UTF-8 text") from None


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file: tensor names -> dtype, shape, offsets."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        raw_len = fh.read(8)
        if len(raw_len) < 8:
            raise ModelDirectoryError(f"{path.name} is too short to be a safetensors file")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise ModelDirectoryError(
                f"{path.name} has a corrupt safetensors header (length {header_len} in a file of "
                f"{size} bytes); the copy may be incomplete"
            )
        try:
            header = json.loads(fh.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ModelDirectoryError(f"{path.name} has a corrupt safetensors header") from None
    if not isinstance(header, dict):
        raise ModelDirectoryError(f"{path.name} has a corrupt safetensors header")
    data_end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + data_end > size:
        raise ModelDirectoryError(
            f"{path.name} is truncated: its header describes {8 + header_len + data_end} bytes "
            f"but the file has {size}; the copy may be incomplete"
        )
    return header


def _weights(directory: Path) -> tuple[list[Path], int | None, str | None]:
    """Weight files, exact parameter count (safetensors only) and the dominant dtype."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelDirectoryError(f"{index.name} has no weight_map")
        shards = sorted({directory / name for name in weight_map.values()})
        missing = [p.name for p in shards if not p.is_file()]
        if missing:
            raise ModelDirectoryError(f"{index.name} lists shards that are missing: {', '.join(missing[:5])}")
        files = shards
    else:
        files = sorted(directory.glob("*.safetensors"))
    if files:
        params = 0
        dtype_bytes: dict[str, int] = {}
        for file in files:
            for key, tensor in read_safetensors_header(file).items():
                if key == "__metadata__":
                    continue
                count = math.prod(tensor.get("shape") or [1])
                params += count
                dt = str(tensor.get("dtype"))
                dtype_bytes[dt] = dtype_bytes.get(dt, 0) + count * _DTYPE_BYTES.get(dt, 4)
        dominant = max(dtype_bytes, key=lambda k: dtype_bytes[k]) if dtype_bytes else None
        return files, params, dominant
    bins = sorted(directory.glob("pytorch_model*.bin"))
    if bins:
        return bins, None, None
    raise ModelDirectoryError(
        "no weights found: expected model.safetensors, a sharded safetensors index, or pytorch_model.bin"
    )


def _task_for(architecture: str) -> str | None:
    known = _known_architectures()
    if architecture in known:
        # A bare backbone (BertModel) serves embeddings; heads say their own task.
        return known[architecture]
    return None


def analyze_directory(path: str | Path, name: str) -> ModelAnalysis:
    directory = Path(path)
    if not directory.is_dir():
        raise ModelDirectoryError(f"{directory} is not a directory (or it was removed)")
    partial = [p.name for p in directory.rglob("*") if p.name.endswith(PARTIAL_SUFFIXES)]
    if partial:
        raise ModelDirectoryError(f"a copy is still in progress: {', '.join(partial[:5])}")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ModelDirectoryError("no config.json: this does not look like a HuggingFace model directory")
    config = _read_json(config_path)
    if not isinstance(config, dict):
        raise ModelDirectoryError("config.json must hold a JSON object")
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    if not isinstance(model_type, str) or not model_type:
        raise ModelDirectoryError("config.json has no model_type")
    if model_type not in _known_model_types():
        raise ModelDirectoryError(f"unknown model_type {model_type!r}: the installed transformers does not support it")
    if not isinstance(architectures, list) or not architectures:
        raise ModelDirectoryError("config.json has no architectures list")
    architecture = str(architectures[0])
    task = _task_for(architecture)
    if task is None:
        raise ModelDirectoryError(
            f"unknown architecture {architecture!r}: the installed transformers has no such class"
        )
    files, params, dtype = _weights(directory)
    weight_bytes = sum(p.stat().st_size for p in files)
    has_tokenizer = any((directory / f).is_file() for f in _TOKENIZER_FILES)
    if not has_tokenizer:
        # Every task served here reads text; vision and audio models come with their processors.
        raise ModelDirectoryError(
            f"{task} needs a tokenizer, and none was found (looked for {', '.join(_TOKENIZER_FILES)})"
        )
    context = next(
        (
            int(config[k])
            for k in ("max_position_embeddings", "n_positions", "max_sequence_length")
            if isinstance(config.get(k), int)
        ),
        None,
    )
    return ModelAnalysis(
        name=name,
        path=str(directory.resolve()),
        format="huggingface",
        architecture=architecture,
        model_type=model_type,
        task=task,
        modality="text",
        weight_files=[p.name for p in files],
        weight_bytes=weight_bytes,
        parameter_count=params,
        dtype=dtype,
        has_tokenizer=has_tokenizer,
        context_length=context,
        memory_estimate_bytes=int(weight_bytes * (1 + WEIGHT_SLACK)) + RUNTIME_OVERHEAD_BYTES,
    )


if __name__ == "__main__":
    if sys.argv[1:] == ["--dump-transformers-tables"]:
        print(json.dumps(_tables_from_transformers()))
    else:
        print("usage: python -m modelium.analyzer --dump-transformers-tables", file=sys.stderr)
        sys.exit(2)
