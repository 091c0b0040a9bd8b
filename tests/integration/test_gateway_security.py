"""API keys, organizations, scopes, body limits and name checks at the gateway."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pytest
from temporalio.testing import WorkflowEnvironment

from api.app import create_app
from modelium.keys import digest, new_key
from modelium.names import workflow_id
from tests.helpers import make_settings, metric_value, serving_model, unique, wait_for
from workflows.lifecycle import ModelLifecycleWorkflow

pytestmark = pytest.mark.slow

ADMIN_KEY, USER_KEY, SCOPED_KEY = new_key(), new_key(), new_key()


async def test_keys_scopes_organizations_and_limits(
    temporal_env: WorkflowEnvironment, demo_models: dict[str, Path], tmp_path: Path
) -> None:
    keys = [
        {"name": "ops", "organization": "acme", "sha256": digest(ADMIN_KEY), "scopes": ["admin"]},
        {"name": "app", "organization": "beta", "sha256": digest(USER_KEY)},
        # May see and use only models whose names match; every other model does not exist for it.
        {"name": "narrow", "organization": "gamma", "sha256": digest(SCOPED_KEY), "models": ["only-*"]},
    ]
    settings = make_settings(tmp_path, gateway={"port": 0, "api_keys": keys, "max_body_bytes": 4096})
    name = unique("secure")
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    user = {"X-API-Key": USER_KEY}
    model = demo_models["text-generation"]
    async with serving_model(settings, temporal_env.client, model, name, headers=user) as (running, http):
        url = f"http://127.0.0.1:{running.gateway_port}"
        # Liveness needs no key; everything else does.
        assert (await http.get("/health")).status_code == 200
        missing = await http.get("/models")
        assert missing.status_code == 401 and missing.headers["WWW-Authenticate"] == "Bearer"
        assert "requires an API key" in missing.json()["error"]["message"]
        wrong = await http.post(f"/predict/{name}", json={"prompt": "x"}, headers={"X-API-Key": "mdl-nope"})
        assert wrong.status_code == 401 and "not valid" in wrong.json()["error"]["message"]
        basic = await http.get("/models", headers={"Authorization": "Basic abc"})
        assert basic.status_code == 401 and "Bearer" in basic.json()["error"]["message"]

        # A key without the admin scope may infer but not load or unload.
        ok = await http.post(f"/predict/{name}", json={"prompt": "Hi", "max_tokens": 2}, headers=user)
        assert ok.status_code == 200, ok.text
        for action in ("load", "unload"):
            denied = await http.post(f"/models/{name}/{action}", headers=user)
            assert denied.status_code == 403
            message = denied.json()["error"]["message"]
            assert "'app'" in message and "admin scope" in message and f"{action} models" in message
        assert (await http.post(f"/models/{name}/load", json={"pin": True}, headers=admin)).status_code == 200

        # The official client with a key works; with a wrong one it gets AuthenticationError.
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=USER_KEY, max_retries=0) as client:
            await client.completions.create(model=name, prompt="Hi", max_tokens=2)
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="mdl-wrong", max_retries=0) as bad_client:
            with pytest.raises(openai.AuthenticationError):
                await bad_client.models.list()

        # Requests are attributed to the key's organization: metrics and the workflow.
        metrics = (await http.get(f"http://127.0.0.1:{running.metrics_port}/metrics")).text
        assert metric_value(metrics, "modelium_requests_total", model=name, organizationId="beta", status="200") == 2.0
        handle = temporal_env.client.get_workflow_handle(workflow_id(name))

        async def counted() -> dict[str, int] | None:
            state = await handle.query(ModelLifecycleWorkflow.state)
            return state.requests_by_organization if state.requests_by_organization.get("beta") == 2 else None

        await wait_for(counted, timeout=10, what="usage by organization")

        # Organizations do not see each other: a non-admin key reads its own counts, and no
        # paths, endpoints or error details; an admin key reads everything.
        await http.post(f"/predict/{name}", json={"prompt": "Hi", "max_tokens": 2}, headers=admin)
        await wait_for(lambda: _counted_for(handle, "acme"), timeout=10, what="the admin's request counted")

        async def seen_by_user() -> dict[str, Any] | None:
            info: dict[str, Any] = (await http.get(f"/models/{name}", headers=user)).json()
            return info if info["requests_by_organization"] else None  # the gateway caches states briefly

        seen = await wait_for(seen_by_user, timeout=10, what="the user's counts through the gateway")
        assert seen["path"] == "" and seen["endpoint"] is None
        assert seen["requests_by_organization"] == {"beta": 2} and seen["request_count"] == 2
        listed = (await http.get("/models", headers=user)).json()["models"]
        assert all(m["path"] == "" and set(m["requests_by_organization"]) <= {"beta"} for m in listed)

        async def seen_by_admin() -> dict[str, Any] | None:
            info: dict[str, Any] = (await http.get(f"/models/{name}", headers=admin)).json()
            return info if "acme" in info["requests_by_organization"] else None

        full = await wait_for(seen_by_admin, timeout=10, what="every organization's counts for an admin")
        assert full["path"].endswith(name) and full["endpoint"] is not None
        assert full["requests_by_organization"] == {"beta": 2, "acme": 1}

        # A key scoped to `only-*`: the model is not found for it, and not listed.
        scoped = {"X-API-Key": SCOPED_KEY}
        hidden = await http.post(f"/predict/{name}", json={"prompt": "Hi", "max_tokens": 2}, headers=scoped)
        assert hidden.status_code == 404 and name not in str(hidden.json()["error"].get("known_models"))
        assert (await http.get(f"/models/{name}", headers=scoped)).status_code == 404
        assert (await http.get("/v1/models", headers=scoped)).json()["data"] == []
        assert (await http.get("/models", headers=scoped)).json()["models"] == []

        # Body limits: by Content-Length, and for a chunked body while it is read.
        big = {"prompt": "x" * 5000, "max_tokens": 1}
        too_big = await http.post(f"/predict/{name}", json=big, headers=user)
        assert too_big.status_code == 413 and "gateway.max_body_bytes" in too_big.json()["error"]["message"]

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(10):
                yield b" " * 1000

        chunked = await http.post(
            "/v1/completions", content=chunks(), headers={**user, "content-type": "application/json"}
        )
        assert chunked.status_code == 413

        # Names from paths are checked before they reach workflow ids or metric labels.
        # ".." and "a%2Fb" never reach a model route (the client resolves "..", "%2F" is a path
        # separator to the router): no route (".." resolves to "/", the dashboard's redirect, which
        # takes no POST: 405), an error that names no model.
        for bad_name in ("UPPER", "a b", ".hidden", "x" * 64, "..", "a%2Fb"):
            answer = await http.post(f"/predict/{bad_name}", json={"prompt": "x"}, headers=user)
            if bad_name in ("..", "a%2Fb"):
                assert answer.status_code in (404, 405), (bad_name, answer.text)
                assert "known_models" not in answer.json()["error"], answer.text
            else:
                assert answer.status_code == 400, (bad_name, answer.text)
                assert "invalid model name" in answer.json()["error"]["message"]
        metrics = (await http.get(f"http://127.0.0.1:{running.metrics_port}/metrics")).text
        assert "UPPER" not in metrics and 'model="a b"' not in metrics


async def _counted_for(handle: Any, organization: str) -> bool:
    state = await handle.query(ModelLifecycleWorkflow.state)
    return organization in state.requests_by_organization


def test_public_bind_without_keys_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="api.app"):
        create_app(make_settings(tmp_path, gateway={"host": "0.0.0.0", "port": 0}))
    assert any("without API keys" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="api.app"):
        create_app(make_settings(tmp_path))  # loopback: no warning
        keys = [{"name": "k", "organization": "o", "sha256": digest(new_key())}]
        create_app(make_settings(tmp_path, gateway={"host": "0.0.0.0", "port": 0, "api_keys": keys}))
    assert not caplog.records
