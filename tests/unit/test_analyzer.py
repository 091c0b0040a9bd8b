from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from modelium.analyzer import ModelDirectoryError, analyze_directory
from modelium.types import Task
from tests.bad_models import BROKEN


def test_reads_demo_models_without_loading_weights(demo_models: dict[str, Path]) -> None:
    gen = analyze_directory(demo_models["text-generation"], "gen")
    assert gen.architecture == "GPT2LMHeadModel" and gen.model_type == "gpt2"
    assert gen.task == Task.TEXT_GENERATION and gen.modality == "text"
    assert gen.dtype == "F32" and gen.context_length == 256 and gen.has_tokenizer
    # GPT-2 ties its output layer to the embeddings, so safetensors stores each tensor once:
    # wte 440x32 + wpe 256x32 + 2 layers + final norm.
    assert gen.parameter_count is not None and 40_000 < gen.parameter_count < 60_000
    assert gen.weight_bytes >= gen.parameter_count * 4
    assert gen.memory_estimate_bytes > gen.weight_bytes
    cls = analyze_directory(demo_models["text-classification"], "cls")
    assert cls.task == Task.TEXT_CLASSIFICATION and cls.architecture == "BertForSequenceClassification"


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_broken_directory_is_named(kind: str, demo_models: dict[str, Path], tmp_path: Path) -> None:
    directory = tmp_path / kind
    shutil.copytree(demo_models["text-generation"], directory)
    breaker, words = BROKEN[kind]
    breaker(directory)
    with pytest.raises(ModelDirectoryError, match=None) as info:
        analyze_directory(directory, kind)
    assert words in str(info.value)


def test_copy_in_progress_is_refused(demo_models: dict[str, Path], tmp_path: Path) -> None:
    directory = tmp_path / "copying"
    shutil.copytree(demo_models["text-generation"], directory)
    (directory / "model.safetensors.part").write_bytes(b"\0" * 10)
    with pytest.raises(ModelDirectoryError, match="copy is still in progress"):
        analyze_directory(directory, "copying")


def test_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelDirectoryError, match="is not a directory"):
        analyze_directory(tmp_path / "nothing", "nothing")
