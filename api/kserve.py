"""The KServe v2 tensor codec of `/predict`: plain values (text, named nested lists) to v2
input tensors, and v2 output tensors back to plain values (Triton speaks this protocol)."""

from __future__ import annotations

import json
from typing import Any

from api.errors import BadRequest


def kserve_request(model: str, inputs: Any) -> tuple[str, dict[str, Any]]:
    """`/predict`'s inputs as a KServe v2 inference request: the path and the body."""
    if inputs is None:
        raise BadRequest("inputs is required: text, named tensors or KServe v2 tensors", param="inputs")
    if isinstance(inputs, list) and inputs and all(isinstance(t, dict) for t in inputs):
        tensors = inputs  # KServe v2 tensors already
    elif isinstance(inputs, dict):
        tensors = [_tensor(name, value) for name, value in inputs.items()]
    else:
        texts = [inputs] if isinstance(inputs, str) else inputs
        tensors = [{"name": "TEXT", "shape": [len(texts)], "datatype": "BYTES", "data": texts}]
    return f"/v2/models/{model}/infer", {"inputs": tensors}


def _tensor(name: str, value: Any) -> dict[str, Any]:
    shape: list[int] = []
    probe = value
    while isinstance(probe, list):
        shape.append(len(probe))
        probe = probe[0] if probe else None
    flat = _flatten(value)
    if all(isinstance(v, bool) for v in flat):
        datatype = "BOOL"
    elif all(isinstance(v, int) and not isinstance(v, bool) for v in flat):
        datatype = "INT64"
    elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in flat):
        datatype = "FP32"
    elif all(isinstance(v, str) for v in flat):
        datatype = "BYTES"
    else:
        raise BadRequest(f"input {name!r} mixes types; send numbers, booleans or strings", param="inputs")
    return {"name": name, "shape": shape or [1], "datatype": datatype, "data": flat}


def _flatten(value: Any) -> list[Any]:
    if not isinstance(value, list):
        return [value]
    return [item for part in value for item in _flatten(part)]


def kserve_output(outputs: list[dict[str, Any]]) -> Any:
    """A generated text entry's OUTPUT (JSON per input) as values; other models' outputs by name,
    shaped as nested lists."""
    if len(outputs) == 1 and outputs[0].get("name") == "OUTPUT" and outputs[0].get("datatype") == "BYTES":
        values = [json.loads(v) for v in outputs[0].get("data", [])]
        return values[0] if len(values) == 1 else values
    return {o["name"]: _unflatten(o.get("data", []), o.get("shape", [])) for o in outputs}


def _unflatten(data: list[Any], shape: list[int]) -> Any:
    if len(shape) <= 1:
        return data
    step = len(data) // shape[0] if shape[0] else 0
    return [_unflatten(data[i * step : (i + 1) * step], shape[1:]) for i in range(shape[0])]
