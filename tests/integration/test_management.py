"""The management API and its CLI (`modelium models | load | unload`) against a running gateway."""

from __future__ import annotations

import asyncio
import contextlib
import io
import time
from pathlib import Path

import httpx
import pytest
from temporalio.testing import WorkflowEnvironment

from cli import main as cli
from modelium.names import workflow_id
from modelium.types import ModelSource
from tests.helpers import make_settings, running_modelium, serving_model, unique, wait_for
from workflows.contracts import LifecycleInput
from workflows.lifecycle import ModelLifecycleWorkflow

pytestmark = pytest.mark.slow


async def _cli(*argv: str) -> tuple[int, str, str]:
    """Run the real CLI entry point in a thread (the gateway runs on this event loop)."""
    out, err = io.StringIO(), io.StringIO()

    def run() -> int:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            return cli.main(list(argv))

    code = await asyncio.to_thread(run)
    return code, out.getvalue(), err.getvalue()


async def test_load_pin_unload_through_api_and_cli(
    temporal_env: WorkflowEnvironment, demo_models: dict[str, Path], tmp_path: Path
) -> None:
    settings = make_settings(tmp_path)
    name = unique("managed")
    async with serving_model(settings, temporal_env.client, demo_models["text-generation"], name) as (running, http):
        url = f"http://127.0.0.1:{running.gateway_port}"
        # API: unload, then load pinned with its own idle timeout.
        down = await http.post(f"/models/{name}/unload", json={"reason": "make room"})
        assert down.status_code == 200 and down.json()["phase"] == "unloaded"
        assert "make room" in down.json()["unload_reason"]
        up = await http.post(f"/models/{name}/load", json={"pin": True, "idle_timeout_seconds": 42})
        assert up.status_code == 200, up.text
        info = up.json()
        assert info["phase"] == "loaded" and info["pinned"] and info["idle_timeout_seconds"] == 42
        assert info["load_count"] == 2
        # Bad bodies name the field.
        bad = await http.post(f"/models/{name}/load", json={"idle_timeout_seconds": -1})
        assert bad.status_code == 422 and bad.json()["error"]["param"] == "idle_timeout_seconds"
        unknown = await http.post("/models/no-such-model/load")
        assert unknown.status_code == 404

        # GET /models: everything a user needs to see.
        listed = {m["name"]: m for m in (await http.get("/models")).json()["models"]}
        entry = listed[name]
        for key in (
            "phase",
            "runtime",
            "node",
            "memory_estimate_bytes",
            "booked_bytes",
            "last_used_at",
            "request_count",
            "requests_by_organization",
            "pinned",
        ):
            assert key in entry, key
        assert entry["booked_bytes"] > 0 and entry["node"] == settings.node.id

        # CLI, pointed at this gateway.
        code, out, _ = await _cli("models", "--url", url)
        assert code == 0
        row = next(line for line in out.splitlines() if line.startswith(name))
        assert "loaded" in row and "embedded" in row and "yes" in row  # pinned
        code, out, _ = await _cli("unload", name, "--url", url)
        assert (code, out.strip()) == (0, f"{name}: unloaded")
        code, out, _ = await _cli("load", name, "--idle-timeout", "30", "--url", url)
        assert code == 0 and "loaded (embedded on" in out and "30s idle" in out
        info = (await http.get(f"/models/{name}")).json()
        assert info["phase"] == "loaded" and not info["pinned"] and info["idle_timeout_seconds"] == 30
        code, out, err = await _cli("load", "no-such-model", "--url", url)
        assert code == 1 and "404" in err and "no-such-model" in err
        code, _, err = await _cli("models", "--url", "http://127.0.0.1:9")
        assert code == 1 and "cannot reach the gateway" in err


async def _eq(value: object, expected: str) -> bool:
    return (await value) == expected  # type: ignore[misc]


async def test_model_whose_worker_is_down_is_listed_not_fatal(
    temporal_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    settings = make_settings(tmp_path)
    orphan = unique("orphan")
    client = temporal_env.client
    # A model workflow on a task queue no worker polls: it cannot answer its state query.
    handle = await client.start_workflow(
        ModelLifecycleWorkflow.run,
        LifecycleInput(ModelSource(orphan, "/nowhere", "f")),
        id=workflow_id(orphan),
        task_queue=unique("no-worker"),
    )
    try:
        async with running_modelium(settings, client, watch=False) as running:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{running.gateway_port}", timeout=60) as http:

                async def listed() -> dict[str, object] | None:
                    response = await http.get("/models")
                    assert response.status_code == 200, response.text
                    return next((m for m in response.json()["models"] if m["name"] == orphan), None)

                entry = await wait_for(listed, timeout=30, what="orphan listed (visibility is eventually consistent)")
                # Listed from its search attributes (it never ran, so it has no summary memo),
                # without waiting on a query that nobody would answer.
                assert entry["phase"] == "discovered"
                started = time.perf_counter()
                assert await listed() is not None
                assert time.perf_counter() - started < 1.5
                # Its own page asks the workflow, which cannot answer: a 503 that says so.
                response = await http.get(f"/models/{orphan}")
                assert response.status_code == 503, response.text
    finally:
        await handle.terminate("test over")
