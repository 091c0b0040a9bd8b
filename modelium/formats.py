"""Model layouts other than a HuggingFace checkout: a GGUF file, an ONNX model, a Triton model
repository entry. Each reader takes what the file's own metadata says, reading headers only, and
raises `ModelDirectoryError` (naming the file) when the layout is broken.
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO


class ModelDirectoryError(ValueError):
    """The directory cannot be served as it is; the message says why and what to fix."""


# -- GGUF ------------------------------------------------------------------------------------
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


# -- ONNX ------------------------------------------------------------------------------------
# Field numbers in onnx.proto: ModelProto and GraphProto, ValueInfoProto, OperatorSetIdProto.
_MODEL_IR_VERSION, _MODEL_PRODUCER, _MODEL_GRAPH, _MODEL_OPSET = 1, 2, 7, 8
_GRAPH_INPUT, _GRAPH_OUTPUT, _GRAPH_INITIALIZER = 11, 12, 5
_VALUE_NAME, _OPSET_VERSION = 1, 2


@dataclass
class OnnxInfo:
    ir_version: int | None = None
    producer: str | None = None
    opset: int | None = None
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    initializers: int = 0


def _varint(fh: BinaryIO) -> int | None:
    shift = result = 0
    while True:
        byte = fh.read(1)
        if not byte:
            return None if shift == 0 else _broken()
        result |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            return result
        shift += 7
        if shift > 63:
            return _broken()


def _broken() -> int:
    raise ModelDirectoryError("the ONNX file is not a valid protobuf; the copy may be incomplete")


def _fields(fh: BinaryIO, end: int, on_field: Callable[[int, int, int], None]) -> None:
    """Walk protobuf fields up to `end`, calling on_field(number, wire_type, value_or_length)
    with the file positioned at a length-delimited value; what it does not read is skipped."""
    while fh.tell() < end:
        key = _varint(fh)
        if key is None:
            return
        number, wire = key >> 3, key & 7
        if wire == 0:
            on_field(number, wire, _varint(fh) or 0)
        elif wire == 1:
            fh.seek(8, 1)
        elif wire == 5:
            fh.seek(4, 1)
        elif wire == 2:
            length = _varint(fh) or 0
            start = fh.tell()
            on_field(number, wire, length)
            fh.seek(start + length)
        else:
            _broken()
    if fh.tell() > end:
        _broken()


def read_onnx_info(path: Path) -> OnnxInfo:
    """Producer, IR version, opset, and graph inputs/outputs, skipping over the weights."""
    info = OnnxInfo()
    size = path.stat().st_size
    with path.open("rb") as fh:

        def name_of(length: int) -> str:
            found: list[str] = []

            def on_value(number: int, wire: int, n: int) -> None:
                if number == _VALUE_NAME and wire == 2:
                    found.append(fh.read(n).decode("utf-8", "replace"))

            _fields(fh, fh.tell() + length, on_value)
            return found[0] if found else "?"

        def on_graph(number: int, wire: int, n: int) -> None:
            if wire != 2:
                return
            if number == _GRAPH_INPUT:
                info.inputs.append(name_of(n))
            elif number == _GRAPH_OUTPUT:
                info.outputs.append(name_of(n))
            elif number == _GRAPH_INITIALIZER:
                info.initializers += 1

        def on_opset(number: int, wire: int, n: int) -> None:
            if number == _OPSET_VERSION and wire == 0:
                info.opset = max(info.opset or 0, n)

        def on_model(number: int, wire: int, n: int) -> None:
            if number == _MODEL_IR_VERSION and wire == 0:
                info.ir_version = n
            elif number == _MODEL_PRODUCER and wire == 2:
                info.producer = fh.read(n).decode("utf-8", "replace")
            elif number == _MODEL_GRAPH and wire == 2:
                _fields(fh, fh.tell() + n, on_graph)
            elif number == _MODEL_OPSET and wire == 2:
                _fields(fh, fh.tell() + n, on_opset)

        _fields(fh, size, on_model)
    if info.ir_version is None or (not info.inputs and not info.outputs):
        raise ModelDirectoryError(f"{path.name} is not an ONNX model (no IR version or graph inputs/outputs)")
    return info


# -- Triton model repository entry -----------------------------------------------------------
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
