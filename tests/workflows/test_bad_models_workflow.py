"""A broken model directory ends in phase `failed` with a reason, crashes nothing, and is tried
again when its files change or a `retry` signal arrives."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from temporalio.testing import WorkflowEnvironment

from modelium.names import workflow_id
from modelium.types import ModelSource, ModelState, Phase
from modelium.watcher import fingerprint
from tests.bad_models import BROKEN
from tests.helpers import make_settings, running_modelium, unique, wait_for
from workers.watch import WorkflowBridge
from workflows.contracts import RetryRequest
from workflows.lifecycle import ModelLifecycleWorkflow

pytestmark = pytest.mark.slow


async def _state(env: WorkflowEnvironment, name: str) -> ModelState:
    handle = env.client.get_workflow_handle(workflow_id(name))
    return await handle.query(ModelLifecycleWorkflow.state)  # type: ignore[no-any-return]


async def test_every_kind_of_broken_directory_fails_clearly_then_recovers(
    temporal_env: WorkflowEnvironment, demo_models: dict[str, Path], tmp_path: Path
) -> None:
    settings = make_settings(tmp_path)
    good = demo_models["text-generation"]
    names = {kind: unique(kind) for kind in BROKEN}
    async with running_modelium(settings, temporal_env.client, gateway=False, watch=False):
        bridge = WorkflowBridge(temporal_env.client, settings)
        for kind, name in names.items():
            directory = tmp_path / "models" / name
            shutil.copytree(good, directory)
            BROKEN[kind][0](directory)
            await bridge.model_ready(ModelSource(name, str(directory), fingerprint(directory)[0]))

        for kind, name in names.items():

            async def failed(name: str = name) -> ModelState | None:
                state = await _state(temporal_env, name)
                return state if state.phase == Phase.FAILED else None

            state = await wait_for(failed, timeout=60, what=f"{kind} to fail")
            assert state.last_error is not None
            assert BROKEN[kind][1] in state.last_error, state.last_error
            assert state.last_error.startswith("analyze failed")
            assert state.endpoint is None and state.booking is None

        # The workers survived all of that: fix one by new files, one by a retry signal.
        by_files, by_retry = names["no-config"], names["malformed-json"]
        for name in (by_files, by_retry):
            directory = tmp_path / "models" / name
            shutil.rmtree(directory)
            shutil.copytree(good, directory)
        directory = tmp_path / "models" / by_files
        await bridge.model_ready(ModelSource(by_files, str(directory), fingerprint(directory)[0]))
        handle = temporal_env.client.get_workflow_handle(workflow_id(by_retry))
        await handle.signal(ModelLifecycleWorkflow.retry, RetryRequest("fixed by hand"))

        for name in (by_files, by_retry):

            async def loaded(name: str = name) -> bool:
                return (await _state(temporal_env, name)).phase == Phase.LOADED

            await wait_for(loaded, timeout=120, what=f"{name} to load after the fix")
            assert (await _state(temporal_env, name)).last_error is None
