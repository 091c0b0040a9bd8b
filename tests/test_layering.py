"""STYLE.md's one direction of travel, checked in fresh interpreters."""

from __future__ import annotations

import json
import subprocess
import sys


def _modules_after(import_line: str) -> set[str]:
    code = f"import sys, json; {import_line}; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return {m.split(".")[0] for m in json.loads(done.stdout)}


def test_workflows_import_no_side_effect_libraries() -> None:
    loaded = _modules_after("import workflows.lifecycle, workflows.contracts")
    assert not loaded & {"torch", "transformers", "httpx", "pynvml", "fastapi", "uvicorn",
                         "watchdog", "activities", "api", "workers"}  # fmt: skip


def test_domain_library_imports_no_temporal_or_gateway() -> None:
    loaded = _modules_after(
        "import modelium.config, modelium.analyzer, modelium.brain, modelium.ledger, "
        "modelium.watcher, modelium.metrics, modelium.runtimes.embedded, modelium.types"
    )
    assert not loaded & {"temporalio", "fastapi", "workflows", "activities", "api", "workers",
                         "torch"}  # fmt: skip


def test_gateway_imports_no_runtime_or_gpu_code() -> None:
    loaded = _modules_after("import api.app")
    assert not loaded & {"torch", "transformers", "pynvml", "activities", "workers"}
    done = subprocess.run(
        [sys.executable, "-c", "import api.app, sys, json; "
         "print(json.dumps([m for m in sys.modules if m.startswith('modelium.runtimes')]))"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert json.loads(done.stdout) == []
