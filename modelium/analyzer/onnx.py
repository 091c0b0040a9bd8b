"""An ONNX model: its inputs, outputs and opset, read from the protobuf without onnx installed."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from modelium.analyzer.common import ModelDirectoryError, custom_analysis
from modelium.types import ModelAnalysis, ModelFormat

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


def analyze_onnx(directory: Path, name: str, files: list[Path]) -> ModelAnalysis:
    if len(files) > 1:
        raise ModelDirectoryError(
            f"{len(files)} ONNX files here ({', '.join(f.name for f in files[:4])}); put one model per "
            "directory, or make it a Triton repository entry (config.pbtxt)"
        )
    info = read_onnx_info(files[0])
    # Weights may sit beside the graph as external data files.
    weight_bytes = sum(p.stat().st_size for p in files[0].parent.iterdir() if p.is_file())
    return custom_analysis(
        directory,
        name,
        ModelFormat.ONNX,
        "onnx",
        files[0].name,
        weight_bytes,
        {
            "inputs": ", ".join(info.inputs),
            "outputs": ", ".join(info.outputs),
            "opset": str(info.opset),
            "producer": info.producer or "",
            "ir_version": str(info.ir_version),
        },
    )
