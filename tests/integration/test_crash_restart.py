"""A runtime process that dies with no request in flight: the node agent notices, the workflow
restarts it after a backoff (the gateway answers 503 with Retry-After meanwhile), and past
`max_restarts` it gives up visibly instead of restarting forever. Nothing is left running."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from temporalio.api.sdk.v1 import WorkflowMetadata
from temporalio.testing import WorkflowEnvironment

from modelium.names import workflow_id
from modelium.runtimes.process import pid_alive
from tests.helpers import make_settings, serving_model, unique, wait_for, wait_phase

pytestmark = pytest.mark.slow


async def test_crashed_runtime_restarts_with_backoff_then_gives_up(
    temporal_env: WorkflowEnvironment, demo_models: dict[str, Path], tmp_path: Path
) -> None:
    settings = make_settings(
        tmp_path,
        node={"id": unique("crashy"), "cpu_memory_budget_bytes": 4 * 2**30, "process_check_seconds": 0.2},
        orchestration={"policies": {"max_restarts": 1, "restart_backoff_seconds": 3}},
    )
    name = unique("crashy")
    client = temporal_env.client
    async with serving_model(settings, client, demo_models["text-generation"], name) as (running, http):
        handle = client.get_workflow_handle(workflow_id(name))
        first = (await http.get(f"/models/{name}")).json()
        pid = first["endpoint"]["pid"]
        os.kill(pid, signal.SIGKILL)

        restarting = await wait_phase(http, name, "restarting", timeout=30)
        assert (
            f"runtime process {pid}" in restarting["last_error"] and "restart 1 of 1 in 3s" in restarting["last_error"]
        )
        busy = await http.post(f"/predict/{name}", json={"prompt": "Hi", "max_tokens": 2})
        assert busy.status_code == 503 and 1 <= int(busy.headers["Retry-After"]) <= 3, busy.text
        assert "is restarting" in busy.json()["error"]["message"]
        meta = await handle.query("__temporal_workflow_metadata", result_type=WorkflowMetadata)
        assert "restarting" in meta.current_details and "restart 1 of 1" in meta.current_details

        again = await wait_phase(http, name, "loaded", timeout=120)
        assert again["endpoint"]["pid"] != pid and again["load_count"] == first["load_count"] + 1
        served = await http.post(f"/predict/{name}", json={"prompt": "Hi", "max_tokens": 2})
        assert served.status_code == 200

        # A second crash within the window is one more than max_restarts: the model fails.
        second = again["endpoint"]["pid"]
        os.kill(second, signal.SIGKILL)
        failed = await wait_phase(http, name, "failed", timeout=60)
        assert "failed 2 times within 10 minutes; not restarted again" in failed["last_error"]
        refused = await http.post(f"/predict/{name}", json={"prompt": "Hi", "max_tokens": 2})
        assert refused.status_code == 503
        assert not pid_alive(pid) and not pid_alive(second)
        assert running.node is not None
        assert running.node.adapters["embedded"].running() == []
        await wait_for(
            lambda: running.node is not None and running.node.ledger.get(name) is None,
            timeout=10,
            what="the booking to be released",
        )

        # Asked to load again, it does.
        response = await http.post(f"/models/{name}/load", json={"wait": True})
        assert response.status_code == 200, response.text
        assert (await http.get(f"/models/{name}")).json()["phase"] == "loaded"
