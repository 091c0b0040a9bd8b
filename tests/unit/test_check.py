"""`modelium check`: what it finds, and the fix it names when something is missing."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from cli.check import check_embedded, check_ray_serve, check_triton, check_vllm, report
from cli.main import main
from modelium.config import load_settings


def _fake_vllm(tmp_path: Path, version: str, code: int = 0) -> str:
    """An executable named vllm that answers `--version` like vLLM's CLI."""
    script = tmp_path / "vllm"
    script.write_text(f"#!/bin/sh\necho '{version}'\nexit {code}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def _dir(path: Path) -> Path:
    path.mkdir()
    return path


def test_vllm_found_missing_or_broken(tmp_path: Path) -> None:
    def settings(command: str) -> object:
        return load_settings(
            environ={}, overrides={"vllm": {"enabled": True, "command": [command, "serve", "{model_dir}"]}}
        )

    found = check_vllm(settings(_fake_vllm(tmp_path, "0.11.0")))  # type: ignore[arg-type]
    assert found.ok and found.summary.startswith("vLLM 0.11.0 at ")
    missing = check_vllm(settings("no-such-vllm"))  # type: ignore[arg-type]
    assert not missing.ok and "'no-such-vllm' (vllm.command) is not on PATH" in missing.summary
    assert missing.fix is not None and "pip install vllm" in missing.fix
    broken = check_vllm(settings(_fake_vllm(_dir(tmp_path / "broken"), "ImportError: libcuda.so.1", code=1)))  # type: ignore[arg-type]
    assert not broken.ok and "exited with 1: ImportError: libcuda.so.1" in broken.summary
    off = check_vllm(load_settings(environ={}))
    assert off.ok and off.skipped


def test_report_and_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = load_settings(environ={}, overrides={"ray_serve": {"enabled": True, "address": "http://127.0.0.1:9"}})
    ray = check_ray_serve(settings)
    text = report([check_embedded(settings), ray], verbose=True)
    assert "  ok  embedded runtime  torch " in text
    assert "FAIL  ray serve" in text and "fix: start the cluster (ray start --head)" in text
    local = check_ray_serve(load_settings(environ={}, overrides={"ray_serve": {"enabled": True}}))
    assert local.ok and "the node agent starts a local cluster" in local.summary
    config = tmp_path / "modelium.yaml"
    config.write_text(f"state_dir: {tmp_path / 'state'}\n")
    assert main(["--config", str(config), "check"]) == 0
    assert "all enabled parts are ready" in capsys.readouterr().out
    config.write_text(f"state_dir: {tmp_path / 'state'}\nvllm: {{enabled: true, command: [no-such-vllm]}}\n")
    assert main(["--config", str(config), "check", "--verbose"]) == 1
    assert "1 problem(s): vllm" in capsys.readouterr().out


def test_triton_found_or_missing(tmp_path: Path) -> None:
    found = check_triton(load_settings(environ={}, overrides={"triton": {"enabled": True}}))
    assert found.ok and "tritonserver at" in found.summary, found
    missing = check_triton(
        load_settings(environ={}, overrides={"triton": {"enabled": True, "binary": "no-such-triton"}})
    )
    assert not missing.ok and missing.fix is not None and "nvidia-pytriton" in missing.fix
    unreachable = check_triton(
        load_settings(environ={}, overrides={"triton": {"enabled": True, "url": "http://127.0.0.1:9"}})
    )
    assert not unreachable.ok and "does not answer" in unreachable.summary
