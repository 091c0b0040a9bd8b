"""Per-model overrides: a `modelium.yaml` beside the model and `models:` in the main config, read
by the control worker and applied by the model's workflow; a bad file fails the model, naming the
file and its keys."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
import yaml
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment

from modelium.config import ModelSettings
from modelium.names import workflow_id
from modelium.overrides import read_overrides
from tests.helpers import copy_model, end_workflows_of, make_settings, running_modelium, unique, wait_for, wait_phase
from workers.serve import serve
from workflows.lifecycle import ModelLifecycleWorkflow

pytestmark = pytest.mark.slow


async def test_overrides_from_the_model_folder_and_the_config(
    temporal_env: WorkflowEnvironment, demo_models: dict[str, Path], tmp_path: Path
) -> None:
    pinned, asks_triton, broken = unique("pinned"), unique("asks-triton"), unique("broken")
    settings = make_settings(
        tmp_path,
        models={
            # The config wins over the file beside the model where both set a key.
            pinned: {"idle_timeout_seconds": 45},
            asks_triton: {"runtime": "triton"},
        },
    )
    incoming = settings.watch_directories[0]
    source = demo_models["text-generation"]
    client = temporal_env.client
    async with running_modelium(settings, client) as running:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{running.gateway_port}", timeout=60) as http:
            staged = copy_model(source, tmp_path / "staging" / pinned)
            (staged / "modelium.yaml").write_text(
                yaml.safe_dump({"pin": True, "idle_timeout_seconds": 5, "devices": ["cpu"]})
            )
            staged.rename(incoming / pinned)
            staged = copy_model(source, tmp_path / "staging" / broken)
            (staged / "modelium.yaml").write_text(yaml.safe_dump({"pin": "maybe", "colour": "red"}))
            staged.rename(incoming / broken)
            copy_model(source, incoming / asks_triton)

            info = await wait_phase(http, pinned, "loaded", timeout=180)
            state = await client.get_workflow_handle(workflow_id(pinned)).query(ModelLifecycleWorkflow.state)
            assert (state.pinned, state.idle_seconds, state.device) == (True, 45.0, "cpu")
            assert info["pinned"] is True

            failed = await wait_phase(http, broken, "failed", timeout=60)
            error = failed["last_error"]
            assert str(incoming / broken / "modelium.yaml") in error
            assert "pin: Input should be a valid boolean" in error and "colour: unknown key" in error

            failed = await wait_phase(http, asks_triton, "failed", timeout=60)
            assert "runtime 'triton' was asked for this model but is not available" in failed["last_error"]


def test_overrides_merge_and_name_their_source(tmp_path: Path) -> None:
    from modelium.config import ModelSettings

    (tmp_path / "modelium.yaml").write_text("runtime: embedded\npin: true\n")
    merged = read_overrides(tmp_path, "m", {"m": ModelSettings(pin=False, node="gpu-1")})
    assert (merged.runtime, merged.pin, merged.node) == ("embedded", False, "gpu-1")
    assert merged.source == f"{tmp_path / 'modelium.yaml'} and models.m in the configuration"
    assert read_overrides(tmp_path / "nothing-here", "m", {}).source == ""


async def test_a_changed_models_entry_reaches_the_workflow_after_a_restart(
    temporal_env: WorkflowEnvironment, demo_models: dict[str, Path], tmp_path: Path
) -> None:
    name = unique("reconfigured")
    first = make_settings(tmp_path, models={name: {"idle_timeout_seconds": 45}})
    # The same machine, state and queues; only the model's entry in the configuration changed.
    second = first.model_copy(update={"models": {name: ModelSettings(idle_timeout_seconds=90)}})
    client = temporal_env.client
    handle = client.get_workflow_handle(workflow_id(name))

    async def idle_is(seconds: float) -> bool:
        try:
            state = await handle.query(ModelLifecycleWorkflow.state)
        except RPCError:  # not started yet
            return False
        return state.phase == "loaded" and state.idle_seconds == seconds

    copy_model(demo_models["text-generation"], first.watch_directories[0] / name)
    try:
        for settings, seconds in ((first, 45.0), (second, 90.0)):
            stop = asyncio.Event()
            task = asyncio.create_task(serve(settings, stop, client=client))
            try:
                await wait_for(lambda s=seconds: idle_is(s), timeout=120, what=f"idle timeout {seconds:g}s applied")
            finally:
                stop.set()
                await asyncio.wait_for(task, timeout=60)
    finally:
        await end_workflows_of(client, first.temporal.control_task_queue)
