"""A HuggingFace checkout: config.json, safetensors headers (exact parameter count and dtype),
tokenizer, chat template, model card, quantization; the task from transformers' own tables."""

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

import yaml

from modelium import memory
from modelium.analyzer.common import ModelDirectoryError, card_str, read_json
from modelium.types import Modality, ModelAnalysis, ModelFormat, Task

log = logging.getLogger(__name__)

_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}  # fmt: skip
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "feature_extractor_config.json")
_TORCH_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
MAX_HEADER_BYTES = 100 * 1024 * 1024


TABLES_SCHEMA = 2

# Keyed by task name (a `Task`, or a name read from the cached transformers tables).
MODALITY: dict[str, Modality] = {
    Task.TEXT_GENERATION: Modality.TEXT,
    Task.TEXT2TEXT_GENERATION: Modality.TEXT,
    Task.TEXT_CLASSIFICATION: Modality.TEXT,
    Task.TOKEN_CLASSIFICATION: Modality.TEXT,
    Task.FILL_MASK: Modality.TEXT,
    Task.FEATURE_EXTRACTION: Modality.TEXT,
    Task.IMAGE_CLASSIFICATION: Modality.VISION,
    Task.AUTOMATIC_SPEECH_RECOGNITION: Modality.AUDIO,
    Task.AUDIO_CLASSIFICATION: Modality.AUDIO,
    Task.ZERO_SHOT_IMAGE_CLASSIFICATION: Modality.MULTIMODAL,
    Task.IMAGE_TEXT_TO_TEXT: Modality.MULTIMODAL,
}
# Tasks that generate token by token, and so keep a KV cache.
GENERATIVE = {
    Task.TEXT_GENERATION,
    Task.TEXT2TEXT_GENERATION,
    Task.AUTOMATIC_SPEECH_RECOGNITION,
    Task.IMAGE_TEXT_TO_TEXT,
}


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
    cache = _cache_dir() / f"transformers-{version}-tables-v{TABLES_SCHEMA}.json"
    try:
        return json.loads(cache.read_text(encoding="utf-8"))  # type: ignore[no-any-return]
    except (OSError, ValueError):
        pass
    done = subprocess.run(
        [sys.executable, "-m", "modelium.analyzer.transformers_tables"],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
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
        weight_map = read_json(index).get("weight_map")
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


def _task_for(architecture: str) -> Task | None:
    known = _known_architectures()
    if architecture in known:
        # A bare backbone (BertModel) serves embeddings; heads say their own task.
        return Task(known[architecture])
    return None


def analyze_huggingface(directory: Path, name: str, max_context_tokens: int) -> ModelAnalysis:
    config = read_json(directory / "config.json")
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
    modality = MODALITY.get(task, Modality.TEXT)
    files, params, dtype = _weights(directory)
    weight_bytes = sum(p.stat().st_size for p in files)
    has_tokenizer = any((directory / f).is_file() for f in _TOKENIZER_FILES)
    has_processor = any((directory / f).is_file() for f in _PROCESSOR_FILES)
    if modality in (Modality.TEXT, Modality.AUDIO, Modality.MULTIMODAL) and not has_tokenizer:
        raise ModelDirectoryError(
            f"{task} needs a tokenizer, and none was found (looked for {', '.join(_TOKENIZER_FILES)})"
        )
    if modality in (Modality.VISION, Modality.AUDIO, Modality.MULTIMODAL) and not has_processor:
        raise ModelDirectoryError(
            f"{task} needs its input processor, and none was found (looked for {', '.join(_PROCESSOR_FILES)})"
        )
    text = _text_config(config)
    context = _first_int(
        text, "max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "max_target_positions"
    )
    if context is None and text is not config:
        context = _first_int(config, "max_position_embeddings", "max_target_positions")
    kv = _kv_shape(config, dtype) if task in GENERATIVE else None
    card = _model_card(directory)
    estimates = {
        runtime: memory.estimate(weight_bytes, kv, context, runtime, max_context_tokens=max_context_tokens)
        for runtime in memory.PROFILES
    }
    quantization = _quantization(config)
    details = {}
    if quantization and params is not None:
        # Packed integer tensors: their element count is not the model's parameter count.
        details["stored_elements"] = str(params)
        params = None
    return ModelAnalysis(
        name=name,
        path=str(directory.resolve()),
        format=ModelFormat.HUGGINGFACE,
        architecture=architecture,
        model_type=model_type,
        task=task,
        modality=modality,
        weight_files=[p.name for p in files],
        weight_bytes=weight_bytes,
        parameter_count=params,
        dtype=dtype or _torch_dtype_name(config),
        has_tokenizer=has_tokenizer,
        context_length=context,
        memory_estimate_bytes=estimates["embedded"],
        has_chat_template=_has_chat_template(directory),
        quantization=quantization,
        kv_bytes_per_token=kv.bytes_per_token() if kv else None,
        memory_estimates=estimates,
        license=card_str(card.get("license")),
        pipeline_tag=card_str(card.get("pipeline_tag")),
        base_model=card_str(card.get("base_model")),
        details=details,
    )


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    """Multimodal configs nest the language model's numbers under text_config."""
    nested = config.get("text_config")
    return nested if isinstance(nested, dict) else config


def _first_int(config: dict[str, Any], *keys: str) -> int | None:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _kv_shape(config: dict[str, Any], dtype: str | None) -> memory.KvShape | None:
    """Per-token KV cache of the (decoder) layers, from config.json's own numbers."""
    text = _text_config(config)
    layers = _first_int(text, "num_hidden_layers", "n_layer", "num_decoder_layers", "decoder_layers", "num_layers")
    heads = _first_int(text, "num_attention_heads", "n_head", "num_heads", "decoder_attention_heads")
    hidden = _first_int(text, "hidden_size", "n_embd", "d_model")
    if not layers or not heads:
        return None
    kv_heads = _first_int(text, "num_key_value_heads", "num_kv_heads") or heads
    head_dim = _first_int(text, "head_dim", "d_kv") or (hidden // heads if hidden else None)
    if not head_dim:
        return None
    # Quantized weights still keep keys and values in the compute dtype (16-bit).
    value_bytes = _TORCH_DTYPE_BYTES.get(str(text.get("torch_dtype") or config.get("torch_dtype")), 0)
    if not value_bytes:
        value_bytes = 4 if dtype == "F32" else 2
    return memory.KvShape(layers, kv_heads, head_dim, value_bytes)


def _torch_dtype_name(config: dict[str, Any]) -> str | None:
    dtype = config.get("torch_dtype") or config.get("dtype")
    return {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}.get(str(dtype)) if dtype else None


def _quantization(config: dict[str, Any]) -> str | None:
    quant = config.get("quantization_config")
    if not isinstance(quant, dict):
        return None
    method = str(quant.get("quant_method") or "quantized")
    bits = quant.get("bits") or quant.get("w_bit")
    if quant.get("load_in_4bit"):
        bits = 4
    elif quant.get("load_in_8bit"):
        bits = 8
    return f"{method} {bits}-bit" if bits else method


def _has_chat_template(directory: Path) -> bool:
    if (directory / "chat_template.jinja").is_file() or (directory / "chat_template.json").is_file():
        return True
    tokenizer_config = directory / "tokenizer_config.json"
    if tokenizer_config.is_file():
        try:
            return bool(json.loads(tokenizer_config.read_text(encoding="utf-8")).get("chat_template"))
        except (ValueError, UnicodeDecodeError, AttributeError):
            return False
    return False


def _model_card(directory: Path) -> dict[str, Any]:
    """The YAML front matter of README.md (license, pipeline_tag, base_model, ...), if any."""
    readme = directory / "README.md"
    if not readme.is_file():
        return {}
    text = readme.read_text(encoding="utf-8", errors="replace")[:64_000]
    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    if end < 0:
        return {}
    try:
        data = yaml.safe_load(text[3:end])
    except yaml.YAMLError:
        log.info("README.md of %s has front matter that is not valid YAML; ignored", directory.name)
        return {}
    return data if isinstance(data, dict) else {}
