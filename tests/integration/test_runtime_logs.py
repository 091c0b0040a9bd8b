"""`GET /models/{name}/logs`: the end of a model's runtime log, read on its node through a short
Temporal workflow, for admin keys; `follow=true` streams what the runtime writes next."""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.testing import WorkflowEnvironment

from modelium.keys import digest, new_key
from tests.helpers import make_settings, serving_model, unique

pytestmark = pytest.mark.slow

ADMIN_KEY, USER_KEY = new_key(), new_key()
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
USER = {"Authorization": f"Bearer {USER_KEY}"}


async def test_runtime_log_tail_and_follow(
    temporal_env: WorkflowEnvironment, demo_models: dict[str, Path], tmp_path: Path
) -> None:
    keys = [
        {"name": "ops", "organization": "acme", "sha256": digest(ADMIN_KEY), "scopes": ["admin"]},
        {"name": "app", "organization": "acme", "sha256": digest(USER_KEY)},
    ]
    settings = make_settings(tmp_path, gateway={"port": 0, "api_keys": keys})
    name = unique("logged")
    async with serving_model(settings, temporal_env.client, demo_models["text-generation"], name, ADMIN) as (_, http):
        denied = await http.get(f"/models/{name}/logs", headers=USER)
        assert denied.status_code == 403 and "read runtime logs" in denied.json()["error"]["message"]
        assert (await http.get("/models/no-such-model/logs", headers=ADMIN)).status_code == 404
        assert (await http.get(f"/models/{name}/logs?tail=0", headers=ADMIN)).status_code == 422

        answer = await http.get(f"/models/{name}/logs?tail=50", headers=ADMIN)
        assert answer.status_code == 200, answer.text
        log = answer.json()
        assert log["node"] == settings.node.id and log["runtime"] == "embedded"
        # The embedded server says when the model is in memory, before it binds its port.
        assert any(f"loaded {name} (text-generation) on cpu" in line for line in log["lines"]), log["lines"]
        assert len(log["lines"]) <= 50
        one = await http.get(f"/models/{name}/logs?tail=1", headers=ADMIN)
        assert one.json()["lines"] == log["lines"][-1:]

        # Following: the lines so far, then what the runtime writes next.
        received: list[str] = []
        async with http.stream("GET", f"/models/{name}/logs?tail=5&follow=true", headers=ADMIN) as stream:
            assert stream.status_code == 200
            assert stream.headers["content-type"].startswith("text/event-stream")
            lines = stream.aiter_lines()
            async for line in lines:
                if line.startswith(": following"):
                    break
                if line.startswith("data: "):
                    received.append(line[6:])
            assert received == log["lines"][-5:]
            with Path(log["path"]).open("a") as fh:
                fh.write("a line the runtime printed later\n")
            async for line in lines:
                if line.startswith("data: "):
                    received.append(line[6:])
                    break
        assert received[-1] == "a line the runtime printed later"
