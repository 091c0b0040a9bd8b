"""The LLM brain end to end: the control worker asks an OpenAI-compatible endpoint where a model
runs, uses a valid answer (source "llm"), and falls back to the rules, saying why, when the
endpoint is too slow or answers something unusable.

The endpoint is a real HTTP server on loopback (uvicorn) that stands in for a hosted chat model:
it answers `POST /v1/chat/completions` in the OpenAI format with the text the test sets. It
records what it was asked, so the test also checks the prompt carries the model and the nodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from temporalio.api.sdk.v1 import WorkflowMetadata
from temporalio.testing import WorkflowEnvironment

from modelium.names import workflow_id
from modelium.runtimes.process import free_port
from tests.helpers import copy_model, make_settings, running_modelium, unique, wait_phase
from workflows.lifecycle import ModelLifecycleWorkflow

pytestmark = pytest.mark.slow


class StandInLlm:
    def __init__(self) -> None:
        self.answer = ""
        self.delay = 0.0
        self.asked: list[dict[str, Any]] = []
        self.app = FastAPI()
        self.app.post("/v1/chat/completions")(self.chat)

    async def chat(self, request: Request) -> dict[str, Any]:
        body = await request.json()
        self.asked.append(body)
        await asyncio.sleep(self.delay)
        message = {"role": "assistant", "content": self.answer}
        return {
            "id": "x",
            "object": "chat.completion",
            "model": body["model"],
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
        }


@contextlib.asynccontextmanager
async def serving(llm: StandInLlm) -> AsyncIterator[str]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(llm.app, host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), "the stand-in LLM server did not start"
        await asyncio.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        await task


async def test_llm_brain_decides_and_rules_take_over_when_it_fails(
    temporal_env: WorkflowEnvironment, demo_models: dict[str, Path], tmp_path: Path
) -> None:
    llm = StandInLlm()
    async with serving(llm) as base_url:
        settings = make_settings(
            tmp_path, brain={"llm": {"enabled": True, "base_url": base_url, "model": "planner", "timeout_seconds": 1.0}}
        )
        node = settings.node.id
        client = temporal_env.client
        async with running_modelium(settings, client) as running:
            base = f"http://127.0.0.1:{running.gateway_port}"
            async with httpx.AsyncClient(base_url=base, timeout=120) as http:

                async def drop(name: str) -> Any:
                    copy_model(demo_models["text-generation"], settings.watch_directories[0] / name)
                    await wait_phase(http, name, "loaded", timeout=180)
                    handle = client.get_workflow_handle(workflow_id(name))
                    state = await handle.query(ModelLifecycleWorkflow.state)
                    assert state.decision is not None
                    # The Temporal UI shows who decided and why (the workflow's current details).
                    meta = await handle.query("__temporal_workflow_metadata", result_type=WorkflowMetadata)
                    assert f"decided by {state.decision.source}: embedded on {node}/cpu" in meta.current_details
                    return state.decision

                llm.answer = (
                    "```json\n"
                    + json.dumps(
                        {"runtime": "embedded", "node": node, "devices": ["cpu"], "reason": "the CPU budget has room"}
                    )
                    + "\n```"
                )
                chosen = await drop(unique("by-llm"))
                assert (chosen.source, chosen.runtime, chosen.node) == ("llm", "embedded", node)
                assert chosen.reason == "LLM brain: the CPU budget has room"
                facts = json.loads(llm.asked[-1]["messages"][1]["content"])
                assert facts["model"]["task"] == "text-generation"
                assert node in [n["node"] for n in facts["nodes"]]

                llm.answer = json.dumps({"runtime": "vllm", "node": node, "devices": ["cpu"]})
                rejected = await drop(unique("rejected"))
                assert rejected.source == "rules"
                assert "LLM brain answer not used: runtime 'vllm' is not enabled" in rejected.reason

                llm.delay = 3.0  # past brain.llm.timeout_seconds
                slow = await drop(unique("too-slow"))
                assert slow.source == "rules"
                assert "did not answer within 1s" in slow.reason

                registry = running.metrics.registry
                by_source = {
                    source: registry.get_sample_value(
                        "modelium_brain_decisions_total", {"runtime": "embedded", "source": source}
                    )
                    for source in ("llm", "rules")
                }
                assert by_source == {"llm": 1.0, "rules": 2.0}
