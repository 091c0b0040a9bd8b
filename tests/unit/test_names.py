from __future__ import annotations

import pytest

from modelium.names import (
    InvalidModelName,
    model_from_workflow_id,
    node_task_queue,
    sanitize_model_name,
    validate_model_name,
    workflow_id,
)


def test_clean_names_pass_through() -> None:
    assert sanitize_model_name("tiny-gpt2") == "tiny-gpt2"
    assert sanitize_model_name("llama-3.1-8b_instruct") == "llama-3.1-8b_instruct"


@pytest.mark.parametrize("raw", ["My Model", "../../etc", "a\"b' OR 1=1", "Ünïcødé", "x" * 200, "..", ""])
def test_unsafe_names_become_safe_and_distinct(raw: str) -> None:
    name = sanitize_model_name(raw)
    assert validate_model_name(name) == name
    assert len(name) <= 63 and "/" not in name and ".." not in name


def test_different_folders_never_collide() -> None:
    assert sanitize_model_name("My Model") != sanitize_model_name("my-model")
    assert sanitize_model_name("a b") != sanitize_model_name("a  b")


def test_case_and_space_variants_are_distinct_and_stable() -> None:
    names = {raw: sanitize_model_name(raw) for raw in ("foo", "Foo", "FOO", " foo", "foo ")}
    assert names["foo"] == "foo"
    assert len(set(names.values())) == len(names), names
    assert sanitize_model_name("Foo") == names["Foo"]  # the same on every start


@pytest.mark.parametrize("bad", ["../x", "A", "a/b", "", "-a", "a" * 64, 'x"y', "tiny-gpt2\n", "a\nb"])
def test_request_names_are_validated(bad: str) -> None:
    with pytest.raises(InvalidModelName):
        validate_model_name(bad)


def test_ids_round_trip() -> None:
    assert model_from_workflow_id(workflow_id("m1")) == "m1"
    assert model_from_workflow_id("other-id") is None
    assert node_task_queue("GPU Box 1") == "modelium-node-gpu-box-1"
