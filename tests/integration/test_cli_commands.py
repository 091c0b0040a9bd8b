"""The `modelium` subcommands a user types, run as processes: `config`, `demo-model`, and the
management commands against a running gateway with keys, through $MODELIUM_URL and
$MODELIUM_API_KEY (`models`, `unload`, `load --no-wait`, a per-model idle timeout that then
really unloads the model). `gateway`, `watch`, `worker control` and `worker node` run as
processes in tests/integration/test_topology.py."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from temporalio.testing import WorkflowEnvironment

from modelium.analyzer import analyze_directory
from modelium.keys import digest
from tests.helpers import make_settings, serving_model, unique, wait_phase

pytestmark = pytest.mark.slow

ADMIN_KEY = "mdl_cli-admin-key-for-tests-only"


def modelium(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MODELIUM_")}
    return subprocess.run(
        [sys.executable, "-m", "cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**clean, **(env or {})},
        cwd=cwd,
    )


def test_config_prints_the_effective_settings_without_secrets(tmp_path: Path) -> None:
    env = {
        "MODELIUM_TEMPORAL__ADDRESS": "t.example:7233",
        "MODELIUM_TEMPORAL__API_KEY": "sekrit-value",
        "MODELIUM_GATEWAY__PORT": "8123",
    }
    done = modelium("config", env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert printed["gateway"]["port"] == 8123 and printed["temporal"]["address"] == "t.example:7233"
    assert "sekrit-value" not in done.stdout and printed["temporal"]["api_key"] == "**********"
    bad = modelium("config", env={"MODELIUM_GATEWAY__PORT": "eighty"}, cwd=tmp_path)
    assert bad.returncode == 2 and "gateway.port" in bad.stderr


def test_demo_model_writes_a_model_the_analyzer_reads(tmp_path: Path) -> None:
    done = modelium("demo-model", str(tmp_path / "tiny"))
    assert done.returncode == 0, done.stderr
    analysis = analyze_directory(tmp_path / "tiny", "tiny")
    assert analysis.task == "text-generation" and (analysis.parameter_count or 0) > 0 and analysis.has_tokenizer


async def test_management_commands_through_the_environment(
    temporal_env: WorkflowEnvironment, demo_models: dict[str, Path], tmp_path: Path
) -> None:
    keys = [{"name": "ops", "organization": "acme", "sha256": digest(ADMIN_KEY), "scopes": ["admin"]}]
    settings = make_settings(tmp_path, gateway={"port": 0, "api_keys": keys})
    name = unique("cli")
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}

    async def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        # In a thread: the gateway it talks to runs on this test's event loop.
        return await asyncio.to_thread(modelium, *args, env=env)

    async with serving_model(settings, temporal_env.client, demo_models["text-generation"], name, headers=admin) as (
        running,
        http,
    ):
        env = {"MODELIUM_URL": f"http://127.0.0.1:{running.gateway_port}"}
        refused = await cli("models", env=env)
        assert refused.returncode != 0 and "401" in refused.stderr, refused.stderr
        env["MODELIUM_API_KEY"] = ADMIN_KEY
        listed = await cli("models", env=env)
        assert listed.returncode == 0 and name in listed.stdout and "loaded" in listed.stdout, listed.stderr

        unloaded = await cli("unload", name, env=env)
        assert unloaded.returncode == 0, unloaded.stderr
        await wait_phase(http, name, "unloaded", headers=admin)
        # --no-wait returns before the model serves; with its own idle timeout (2 s) it then
        # unloads by itself once loaded and unused.
        started = await cli("load", name, "--no-wait", "--idle-timeout", "2", env=env)
        assert started.returncode == 0, started.stderr
        info = await wait_phase(http, name, "loaded", headers=admin)
        assert info["idle_timeout_seconds"] == 2
        after = await wait_phase(http, name, "unloaded", headers=admin, timeout=60)
        assert "idle" in (after["unload_reason"] or ""), after
