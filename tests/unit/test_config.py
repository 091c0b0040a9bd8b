from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from modelium.config import ConfigError, load_settings
from modelium.keys import digest
from tests.helpers import DEPLOY


def test_defaults_need_no_file(tmp_path: Path) -> None:
    s = load_settings(None, environ={})
    assert s.watch_directories == [Path("models/incoming")]
    assert s.idle_seconds == 300
    assert s.metrics.enabled and s.metrics.port == 9090
    assert s.gateway.port == 8000 and s.gateway.host == "127.0.0.1"
    assert s.temporal.address is None and s.temporal.ui_port == 8233
    assert not (s.vllm.enabled or s.triton.enabled or s.ray_serve.enabled)


def test_seed_keys_from_file_and_env_override(tmp_path: Path) -> None:
    cfg = tmp_path / "modelium.yaml"
    cfg.write_text(
        "vllm: {enabled: true}\n"
        "triton: {enabled: false}\n"
        "ray_serve: {enabled: false}\n"
        "orchestration:\n"
        "  model_discovery: {watch_directories: [/srv/models]}\n"
        "  policies: {evict_after_idle_seconds: 120}\n"
        "metrics: {enabled: true, port: 9100}\n"
    )
    s = load_settings(
        cfg,
        environ={"MODELIUM_METRICS__PORT": "9200", "MODELIUM_ORCHESTRATION__POLICIES__EVICT_AFTER_IDLE_SECONDS": "45"},
    )
    assert s.vllm.enabled and s.watch_directories == [Path("/srv/models")]
    assert s.metrics.port == 9200 and s.idle_seconds == 45


@pytest.mark.parametrize(
    ("yaml_text", "env", "words"),
    [
        (
            "orchestration: {policies: {evict_after_idle_seconds: -5}}",
            {},
            "orchestration.policies.evict_after_idle_seconds: Input should be greater than or equal to 1",
        ),
        ("metrics: {port: 99999}", {}, "metrics.port"),
        ("vllm: {enabeld: true}", {}, "vllm.enabeld: unknown key"),
        ("", {"MODELIUM_GATEWAY__PORT": "eighty"}, "gateway.port"),
        ("", {"MODELIUM_NOPE": "1"}, "nope: unknown key"),
        ("node: {id: 'Bad Node!'}", {}, "node.id"),
        ("- a list", {}, "the top level must be a mapping"),
        ("key: [unclosed", {}, "not valid YAML"),
        ("gateway: {api_keys: [{name: k, organization: o, sha256: xyz}]}", {}, "gateway.api_keys.0.sha256"),
        (
            "gateway: {api_keys: [{name: k, organization: o, sha256: " + "a" * 64 + ", scopes: [root]}]}",
            {},
            "gateway.api_keys.0.scopes.0",
        ),
        ("gateway: {max_waiting_requests: -1}", {}, "gateway.max_waiting_requests"),
        # Numbers that would overflow a timer or poison a budget are refused, the key named.
        (
            "orchestration: {policies: {evict_after_idle_seconds: .inf}}",
            {},
            "orchestration.policies.evict_after_idle_seconds: Input should be a finite number",
        ),
        (
            "orchestration: {policies: {evict_after_idle_seconds: 1e308}}",
            {},
            "orchestration.policies.evict_after_idle_seconds: Input should be less than or equal to 31536000",
        ),
        ("", {"MODELIUM_GATEWAY__COLD_START_TIMEOUT_SECONDS": ".nan"}, "gateway.cold_start_timeout_seconds"),
        ("models: {m: {idle_timeout_seconds: .inf}}", {}, "models.m.idle_timeout_seconds"),
        ("node: {cpu_memory_budget_bytes: 1e30}", {}, "node.cpu_memory_budget_bytes"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, yaml_text: str, env: dict[str, str], words: str) -> None:
    cfg = tmp_path / "modelium.yaml"
    cfg.write_text(yaml_text)
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, environ=env)
    assert words in str(info.value)


def test_missing_explicit_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.yaml", environ={})


def test_global_options_may_follow_the_subcommand(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cli.main import main

    cfg = tmp_path / "mine.yaml"
    cfg.write_text("gateway: {port: 18123}\n")
    assert main(["config", "--config", str(cfg), "--log-level", "ERROR"]) == 0
    assert json.loads(capsys.readouterr().out)["gateway"]["port"] == 18123
    # After the subcommand it wins over the same option before it.
    assert main(["--config", str(tmp_path / "nope.yaml"), "config", "--config", str(cfg)]) == 0
    assert json.loads(capsys.readouterr().out)["gateway"]["port"] == 18123


def test_cli_stops_with_the_key_named(tmp_path: Path) -> None:
    cfg = tmp_path / "modelium.yaml"
    cfg.write_text("metrics: {port: -1}\n")
    done = subprocess.run(
        [sys.executable, "-m", "cli", "--config", str(cfg), "serve"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode == 2
    assert "metrics.port" in done.stderr


def test_shipped_deploy_config_is_valid() -> None:
    settings = load_settings(DEPLOY / "modelium.yaml", environ={})
    assert settings.gateway.api_keys == [] and settings.gateway.host == "127.0.0.1"


def test_keys_create_prints_a_key_and_its_digest(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "cli", "keys", "create", "--org", "acme", "--name", "ci", "--admin"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    key = next(line.strip() for line in done.stdout.splitlines() if line.strip().startswith("mdl-"))
    entry_yaml = done.stdout.split("gateway.api_keys:", 1)[1]
    entry = yaml.safe_load(entry_yaml)[0]
    assert entry == {"name": "ci", "organization": "acme", "sha256": digest(key), "scopes": ["admin"]}
    bad = subprocess.run(
        [sys.executable, "-m", "cli", "keys", "create", "--org", "no spaces!", "--name", "x"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert bad.returncode == 2 and "--org" in bad.stderr
