"""Ways a model directory can be broken, each with words the error must contain."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path


def _no_config(d: Path) -> None:
    (d / "config.json").unlink()


def _malformed_json(d: Path) -> None:
    (d / "config.json").write_text('{"model_type": "gpt2", "architectures": [', encoding="utf-8")


def _unknown_architecture(d: Path) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["FrobnicatorForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))


def _unknown_model_type(d: Path) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "frobnicator"
    (d / "config.json").write_text(json.dumps(cfg))


def _missing_weights(d: Path) -> None:
    (d / "model.safetensors").unlink()


def _truncated_weights(d: Path) -> None:
    weights = d / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])


def _missing_shard(d: Path) -> None:
    weights = d / "model.safetensors"
    shutil.move(weights, d / "model-00001-of-00002.safetensors")
    index = {
        "metadata": {},
        "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"},
    }
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


def _no_tokenizer(d: Path) -> None:
    (d / "tokenizer.json").unlink()


BROKEN: dict[str, tuple[Callable[[Path], None], str]] = {
    "no-config": (_no_config, "no config.json"),
    "malformed-json": (_malformed_json, "config.json is not valid JSON"),
    "unknown-architecture": (_unknown_architecture, "unknown architecture 'FrobnicatorForCausalLM'"),
    "unknown-model-type": (_unknown_model_type, "unknown model_type 'frobnicator'"),
    "missing-weights": (_missing_weights, "no weights found"),
    "truncated-weights": (_truncated_weights, "model.safetensors"),
    "missing-shard": (_missing_shard, "model-00002-of-00002.safetensors"),
    "no-tokenizer": (_no_tokenizer, "needs a tokenizer"),
}
