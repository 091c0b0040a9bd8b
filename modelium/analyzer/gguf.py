"""A GGUF file (llama.cpp's format): its header's metadata and tensor table, read without the
weights, give the architecture, context, KV shape and quantization."""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from modelium import memory
from modelium.analyzer.common import ModelDirectoryError, card_str
from modelium.types import Modality, ModelAnalysis, ModelFormat, Task

GGUF_MAGIC = b"GGUF"
# llama.cpp's `general.file_type` values (LLAMA_FTYPE_*), for the quantization name.
_GGUF_FILE_TYPES = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    7: "Q8_0",
    8: "Q5_0",
    9: "Q5_1",
    10: "Q2_K",
    11: "Q3_K_S",
    12: "Q3_K_M",
    13: "Q3_K_L",
    14: "Q4_K_S",
    15: "Q4_K_M",
    16: "Q5_K_S",
    17: "Q5_K_M",
    18: "Q6_K",
    32: "BF16",
}
_SCALARS: dict[int, tuple[str, int]] = {
    0: ("<B", 1),
    1: ("<b", 1),
    2: ("<H", 2),
    3: ("<h", 2),
    4: ("<I", 4),
    5: ("<i", 4),
    6: ("<f", 4),
    7: ("<?", 1),
    10: ("<Q", 8),
    11: ("<q", 8),
    12: ("<d", 8),
}
_MAX_GGUF_STRING = 16 * 1024 * 1024
_MAX_GGUF_COUNT = 1 << 24


@dataclass
class GgufHeader:
    version: int
    metadata: dict[str, Any]
    parameter_count: int
    tensor_count: int


def _exact(fh: BinaryIO, n: int, what: str) -> bytes:
    data = fh.read(n)
    if len(data) != n:
        raise ModelDirectoryError(f"{what} ends inside its header; the copy may be incomplete")
    return data


def read_gguf_header(path: Path) -> GgufHeader:
    """Metadata key/values and tensor shapes of a GGUF file (versions 2 and 3)."""
    what = path.name
    with path.open("rb") as fh:

        def unpack(fmt: str, size: int) -> Any:
            return struct.unpack(fmt, _exact(fh, size, what))[0]

        def string() -> str:
            length = unpack("<Q", 8)
            if length > _MAX_GGUF_STRING:
                raise ModelDirectoryError(f"{what} has a corrupt GGUF header (a string of {length} bytes)")
            return _exact(fh, length, what).decode("utf-8", "replace")

        def value(kind: int) -> Any:
            if kind in _SCALARS:
                return unpack(*_SCALARS[kind])
            if kind == 8:
                return string()
            if kind == 9:
                item_kind, count = unpack("<I", 4), unpack("<Q", 8)
                if count > _MAX_GGUF_COUNT:
                    raise ModelDirectoryError(f"{what} has a corrupt GGUF header (an array of {count})")
                return [value(item_kind) for _ in range(count)]
            raise ModelDirectoryError(f"{what} has a corrupt GGUF header (value type {kind})")

        if _exact(fh, 4, what) != GGUF_MAGIC:
            raise ModelDirectoryError(f"{what} is not a GGUF file (no GGUF magic)")
        version = unpack("<I", 4)
        if version not in (2, 3):
            raise ModelDirectoryError(f"{what} is GGUF version {version}; versions 2 and 3 are read")
        tensors, kvs = unpack("<Q", 8), unpack("<Q", 8)
        if tensors > _MAX_GGUF_COUNT or kvs > _MAX_GGUF_COUNT:
            raise ModelDirectoryError(f"{what} has a corrupt GGUF header")
        metadata = {}
        for _ in range(kvs):
            key = string()
            metadata[key] = value(unpack("<I", 4))
        params = 0
        for _ in range(tensors):
            string()  # tensor name
            dims = unpack("<I", 4)
            shape = [unpack("<Q", 8) for _ in range(dims)]
            unpack("<I", 4)  # ggml type
            unpack("<Q", 8)  # offset
            params += math.prod(shape)
    return GgufHeader(version, metadata, params, tensors)


def gguf_quantization(metadata: dict[str, Any]) -> str | None:
    file_type = metadata.get("general.file_type")
    if isinstance(file_type, int):
        return _GGUF_FILE_TYPES.get(file_type, f"ggml-type-{file_type}")
    return None


def analyze_gguf(directory: Path, name: str, files: list[Path], max_context_tokens: int) -> ModelAnalysis:
    if len(files) > 1:
        raise ModelDirectoryError(
            f"{len(files)} GGUF files here ({', '.join(f.name for f in files[:4])}); put one model per directory"
        )
    header = read_gguf_header(files[0])
    meta = header.metadata
    arch = str(meta.get("general.architecture") or "unknown")

    def arch_int(key: str) -> int | None:
        value = meta.get(f"{arch}.{key}")
        return value if isinstance(value, int) and value > 0 else None

    context = arch_int("context_length")
    heads = arch_int("attention.head_count")
    layers = arch_int("block_count")
    width = arch_int("embedding_length")
    kv = None
    if layers and heads and width:
        kv = memory.KvShape(layers, arch_int("attention.head_count_kv") or heads, width // heads, 2)
    weight_bytes = files[0].stat().st_size
    estimates = {
        runtime: memory.estimate(weight_bytes, kv, context, runtime, max_context_tokens=max_context_tokens)
        for runtime in memory.PROFILES
    }
    return ModelAnalysis(
        name=name,
        path=str(directory.resolve()),
        format=ModelFormat.GGUF,
        architecture=arch,
        model_type=arch,
        task=Task.TEXT_GENERATION,
        modality=Modality.TEXT,
        weight_files=[files[0].name],
        weight_bytes=weight_bytes,
        parameter_count=header.parameter_count,
        dtype=None,
        has_tokenizer="tokenizer.ggml.tokens" in meta,
        context_length=context,
        memory_estimate_bytes=estimates["embedded"],
        has_chat_template="tokenizer.chat_template" in meta,
        quantization=gguf_quantization(meta),
        kv_bytes_per_token=kv.bytes_per_token() if kv else None,
        memory_estimates=estimates,
        license=card_str(meta.get("general.license")),
        details={
            "gguf_version": str(header.version),
            "tensors": str(header.tensor_count),
            "model_name": str(meta.get("general.name", "")),
        },
    )
